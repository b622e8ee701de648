package node

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/node/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// testNode starts a real node (Badger in a temp dir, HTTP on loopback).
func testNode(t testing.TB, mutate func(*Config)) (*Node, string) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.APIAddr = "127.0.0.1:0"
	cfg.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.NoSync = true
	cfg.Policy.MLS = protocol.MLSOff
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	if mutate != nil {
		mutate(&cfg)
	}
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n, "http://" + n.APIAddr().String()
}

type reply struct {
	code int
	body string
	ct   string
}

func do(t testing.TB, method, url, contentType, body string) reply {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return reply{resp.StatusCode, string(b), resp.Header.Get("Content-Type")}
}

func postJSON(t testing.TB, url string, v any) reply {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return do(t, http.MethodPost, url, "application/json", string(b))
}

var b64 = base64.StdEncoding

func bundleJSON(b protocol.Bundle) map[string]string {
	return map[string]string{"device_id": b.DeviceID.String(), "payload": b64.EncodeToString(b.Payload), "signature": b64.EncodeToString(b.Signature[:])}
}

func accountJSON(a protocol.AccountBundle) map[string]string {
	return map[string]string{"account_pub": a.AccountPub.String(), "payload": b64.EncodeToString(a.Payload), "signature": b64.EncodeToString(a.Signature[:])}
}

func nowMS() uint64 { return uint64(time.Now().UnixMilli()) }

func expect(t testing.TB, r reply, code int, body string) {
	t.Helper()
	if r.code != code || (body != "*" && r.body != body) {
		t.Fatalf("got %d %s, want %d %s", r.code, r.body, code, body)
	}
	if r.body != "" && r.ct != "application/json" {
		t.Fatalf("content type %q for body %s", r.ct, r.body)
	}
}

// Vectors B and C of chat-store-compat.md, byte for byte.
func TestAccountVectorsBC(t *testing.T) {
	_, base := testNode(t, nil)
	acct, k1, k2 := nodetest.SeedKey(4), nodetest.SeedKey(1), nodetest.SeedKey(2)
	var d1, d2 protocol.Key
	copy(d1[:], k1.Public().(ed25519.PublicKey))
	copy(d2[:], k2.Public().(ed25519.PublicKey))
	vb := protocol.SignAccount(acct, protocol.EncodeAccountPayload(0, []protocol.Key{d1}))
	vc := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, []protocol.Key{d1, d2}))

	expect(t, do(t, "GET", base+"/v0/account/"+vb.AccountPub.String(), "", ""), 404, `{"error":"no account bundle for account_pub"}`)
	expect(t, postJSON(t, base+"/v0/account", accountJSON(vb)), 204, "")
	expect(t, postJSON(t, base+"/v0/account", accountJSON(vc)), 204, "")
	expect(t, postJSON(t, base+"/v0/account", accountJSON(vb)), 409, `{"error":"stale bundle: lamport is not newer than the stored one"}`)
	expect(t, postJSON(t, base+"/v0/account", accountJSON(vc)), 409, `{"error":"stale bundle: lamport is not newer than the stored one"}`)

	r := do(t, "GET", base+"/v0/account/"+vc.AccountPub.String(), "", "")
	wantPrefix := fmt.Sprintf(`{"payload":"%s","signature":"%s","updated_at":`, b64.EncodeToString(vc.Payload), b64.EncodeToString(vc.Signature[:]))
	if r.code != 200 || !strings.HasPrefix(r.body, wantPrefix) || !strings.HasSuffix(r.body, "}") {
		t.Fatalf("GET account: %d %s", r.code, r.body)
	}
	var got struct {
		UpdatedAt int64 `json:"updated_at"`
	}
	if err := json.Unmarshal([]byte(r.body), &got); err != nil || got.UpdatedAt <= 0 {
		t.Fatalf("updated_at: %v %d", err, got.UpdatedAt)
	}
	// Uppercase hex finds the same record.
	if r2 := do(t, "GET", base+"/v0/account/"+strings.ToUpper(vc.AccountPub.String()), "", ""); r2.body != r.body {
		t.Fatalf("uppercase GET: %d %s", r2.code, r2.body)
	}
}

// Vector A: signed in 2023, so past the retention and refused; the same
// key_package signed by the same key now is accepted and served byte for byte.
func TestKeyPackageVectorAAndFreshSigning(t *testing.T) {
	n, base := testNode(t, nil)
	dev1 := nodetest.SeedKey(1)
	va := protocol.SignBundle(dev1, 1700000000000, []byte("fake-mls-keypackage-bytes"))
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(va)), 400,
		`{"error":"payload: timestamp 1700000000000 is older than the retention of 720h0m0s"}`)

	fresh := protocol.SignBundle(dev1, nowMS(), []byte("fake-mls-keypackage-bytes"))
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(fresh)), 204, "")
	want := fmt.Sprintf(`{"payload":"%s","signature":"%s"}`, b64.EncodeToString(fresh.Payload), b64.EncodeToString(fresh.Signature[:]))
	expect(t, do(t, "GET", base+"/v0/keypackage/"+fresh.DeviceID.String(), "", ""), 200, want)
	expect(t, do(t, "GET", base+"/v0/keypackage/"+strings.ToUpper(fresh.DeviceID.String()), "", ""), 200, want)
	// Posting what the node holds is idempotent.
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(fresh)), 204, "")
	if c := n.store.Counts(); c.Bundles != 1 {
		t.Fatalf("counts %+v", c)
	}
}

// With the node's clock at vector A's own time, vector A is accepted and
// served exactly as chat-store serves it.
func TestKeyPackageVectorAAtItsOwnTime(t *testing.T) {
	_, base := testNode(t, func(c *Config) { c.Now = func() time.Time { return time.UnixMilli(1700000000000 + 1000) } })
	body := `{"device_id":"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c","payload":"AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz","signature":"fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA=="}`
	expect(t, do(t, "POST", base+"/v0/keypackage", "application/json", body), 204, "")
	expect(t, do(t, "GET", base+"/v0/keypackage/8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c", "", ""), 200,
		`{"payload":"AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz","signature":"fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA=="}`)
}

func TestOlderBundleDoesNotBecomeLatest(t *testing.T) {
	_, base := testNode(t, nil)
	dev := nodetest.SeedKey(7)
	now := nowMS()
	newer := protocol.SignBundle(dev, now, []byte("newer"))
	older := protocol.SignBundle(dev, now-60_000, []byte("older"))
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(newer)), 204, "")
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(older)), 204, "")
	want := fmt.Sprintf(`{"payload":"%s","signature":"%s"}`, b64.EncodeToString(newer.Payload), b64.EncodeToString(newer.Signature[:]))
	expect(t, do(t, "GET", base+"/v0/keypackage/"+newer.DeviceID.String(), "", ""), 200, want)
}

// chat-store answers 500 to two submissions for one device in one
// millisecond; kpnode keeps both.
func TestSameMillisecondSubmissions(t *testing.T) {
	n, base := testNode(t, nil)
	dev := nodetest.SeedKey(8)
	ts := nowMS()
	var wg sync.WaitGroup
	codes := make([]int, 8)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := protocol.SignBundle(dev, ts, []byte(fmt.Sprintf("kp-%d", i)))
			codes[i] = postJSON(t, base+"/v0/keypackage", bundleJSON(b)).code
		}()
	}
	wg.Wait()
	for i, c := range codes {
		if c != 204 {
			t.Fatalf("submission %d: %d", i, c)
		}
	}
	if c := n.store.Counts(); c.Bundles != 8 || c.Devices != 1 {
		t.Fatalf("counts %+v", c)
	}
}

// Every refusal answers the documented JSON error and stores nothing.
func TestRefusalsStoreNothing(t *testing.T) {
	n, base := testNode(t, nil)
	dev := nodetest.SeedKey(1)
	good := protocol.SignBundle(dev, nowMS(), []byte("kp"))
	gj := bundleJSON(good)
	with := func(m map[string]string, k, v string) map[string]string {
		c := map[string]string{}
		for kk, vv := range m {
			c[kk] = vv
		}
		c[k] = v
		return c
	}
	sig63 := b64.EncodeToString(good.Signature[:63])
	notPoint := "02" + strings.Repeat("00", 31)
	vectorG := "01" + strings.Repeat("00", 31)
	gSig := b64.EncodeToString(append(append([]byte{1}, make([]byte, 31)...), make([]byte, 32)...))
	short := protocol.Bundle{DeviceID: good.DeviceID, Payload: []byte("1234567")}
	copy(short.Signature[:], ed25519.Sign(dev, short.Payload))
	future := protocol.SignBundle(dev, nowMS()+10*60_000, []byte("kp"))
	acct := protocol.SignAccount(nodetest.SeedKey(4), protocol.EncodeAccountPayload(1, nil))
	noHeader := protocol.SignAccount(nodetest.SeedKey(4), []byte("libchat:account-device-bundle\x00\x01\x00"))
	wrongSig := with(gj, "signature", b64.EncodeToString(ed25519.Sign(dev, []byte("other"))))

	cases := []struct {
		name, path, ctype, body string
		code                    int
		want                    string
	}{
		{"bad key", "/v0/keypackage", "application/json", mustJSON(with(gj, "device_id", "not-a-key")), 400, `{"error":"device_id: must be hex of a 32-byte key"}`},
		{"short key", "/v0/keypackage", "application/json", mustJSON(with(gj, "device_id", good.DeviceID.String()[:62])), 400, `{"error":"device_id: must be hex of a 32-byte key"}`},
		{"bad base64", "/v0/keypackage", "application/json", mustJSON(with(gj, "payload", "bad")), 400, `{"error":"payload: not valid base64"}`},
		{"base64 newline", "/v0/keypackage", "application/json", mustJSON(with(gj, "payload", gj["payload"][:4]+"\n"+gj["payload"][4:])), 400, `{"error":"payload: not valid base64"}`},
		{"base64 unpadded", "/v0/keypackage", "application/json", mustJSON(with(gj, "payload", "AAA")), 400, `{"error":"payload: not valid base64"}`},
		{"base64 trailing bits", "/v0/keypackage", "application/json", mustJSON(with(gj, "payload", "AB==")), 400, `{"error":"payload: not valid base64"}`},
		{"signature 63 bytes", "/v0/keypackage", "application/json", mustJSON(with(gj, "signature", sig63)), 400, `{"error":"signature: must be base64 of 64 bytes"}`},
		{"signature not base64", "/v0/keypackage", "application/json", mustJSON(with(gj, "signature", "!!")), 400, `{"error":"signature: must be base64 of 64 bytes"}`},
		{"key not a point", "/v0/keypackage", "application/json", mustJSON(with(gj, "device_id", notPoint)), 400, `{"error":"device_id: not a valid ed25519 key"}`},
		{"vector G", "/v0/keypackage", "application/json", mustJSON(with(with(gj, "device_id", vectorG), "signature", gSig)), 400, `{"error":"signature: verification failed"}`},
		{"wrong signature", "/v0/keypackage", "application/json", mustJSON(wrongSig), 400, `{"error":"signature: verification failed"}`},
		{"payload under 8 bytes", "/v0/keypackage", "application/json", mustJSON(bundleJSON(short)), 400, `{"error":"payload: too short to contain a timestamp"}`},
		{"timestamp in future", "/v0/keypackage", "application/json", mustJSON(bundleJSON(future)), 400, "*"},
		{"account bad key", "/v0/account", "application/json", mustJSON(with(accountJSON(acct), "account_pub", "xyz")), 400, `{"error":"account_pub: must be hex of a 32-byte key"}`},
		{"account not a point", "/v0/account", "application/json", mustJSON(with(accountJSON(acct), "account_pub", notPoint)), 400, `{"error":"account_pub: not a valid ed25519 key"}`},
		{"account wrong signature", "/v0/account", "application/json", mustJSON(with(accountJSON(acct), "signature", gj["signature"])), 400, `{"error":"signature: verification failed"}`},
		{"account no header", "/v0/account", "application/json", mustJSON(accountJSON(noHeader)), 400, `{"error":"payload: too short to contain a lamport header"}`},
		{"no content type", "/v0/keypackage", "", mustJSON(gj), 415, "*"},
		{"text content type", "/v0/keypackage", "text/plain", mustJSON(gj), 415, "*"},
		{"malformed JSON", "/v0/keypackage", "application/json", `{"device_id":`, 400, `{"error":"request body is not valid JSON"}`},
		{"trailing garbage", "/v0/keypackage", "application/json", mustJSON(gj) + "x", 400, `{"error":"request body is not valid JSON"}`},
		{"array body", "/v0/keypackage", "application/json", `[1,2]`, 422, `{"error":"request body must be a JSON object"}`},
		{"missing field", "/v0/keypackage", "application/json", `{"device_id":"aa","payload":"AAAA"}`, 422, "{\"error\":\"missing field `signature`\"}"},
		{"wrong field type", "/v0/keypackage", "application/json", `{"device_id":1,"payload":"AAAA","signature":"x"}`, 422, "{\"error\":\"field `device_id` must be a string\"}"},
		{"null field", "/v0/account", "application/json", `{"account_pub":null,"payload":"AAAA","signature":"x"}`, 422, "{\"error\":\"field `account_pub` must be a string\"}"},
		{"field names are case-sensitive", "/v0/keypackage", "application/json", `{"Device_ID":"aa","payload":"AAAA","signature":"x"}`, 422, "{\"error\":\"missing field `device_id`\"}"},
		{"body over 1 MiB", "/v0/keypackage", "application/json", mustJSON(with(gj, "payload", strings.Repeat("A", 1<<20))), 413, `{"error":"request body is larger than 1048576 bytes"}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			expect(t, do(t, http.MethodPost, base+c.path, c.ctype, c.body), c.code, c.want)
		})
	}
	expect(t, do(t, "GET", base+"/v0/nothing", "", ""), 404, `{"error":"not found"}`)
	expect(t, do(t, "GET", base+"/v0/keypackage/", "", ""), 404, `{"error":"not found"}`)
	expect(t, do(t, "GET", base+"/v0/keypackage/unknown", "", ""), 404, `{"error":"no keypackage for device"}`)
	expect(t, do(t, "GET", base+"/v0/keypackage/"+strings.Repeat("0", 64), "", ""), 404, `{"error":"no keypackage for device"}`)
	expect(t, do(t, "GET", base+"/v0/account/"+strings.Repeat("0", 64), "", ""), 404, `{"error":"no account bundle for account_pub"}`)
	expect(t, do(t, "GET", base+"/v0/keypackage", "", ""), 405, `{"error":"method not allowed"}`)
	expect(t, do(t, "DELETE", base+"/v0/account/"+strings.Repeat("0", 64), "", ""), 405, `{"error":"method not allowed"}`)

	if c := n.store.Counts(); c.Bundles != 0 || c.Accounts != 0 || c.Devices != 0 {
		t.Fatalf("a refused request stored something: %+v", c)
	}
	// Unknown fields are ignored, as in chat-store.
	extra := with(gj, "extra", "whatever")
	expect(t, postJSON(t, base+"/v0/keypackage", extra), 204, "")
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

func TestStatusHealthAndMetrics(t *testing.T) {
	_, base := testNode(t, nil)
	b := protocol.SignBundle(nodetest.SeedKey(3), nowMS(), []byte("kp"))
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(b)), 204, "")
	bad := bundleJSON(b)
	bad["signature"] = b64.EncodeToString(make([]byte, 64))
	expect(t, postJSON(t, base+"/v0/keypackage", bad), 400, "*")
	expect(t, postJSON(t, base+"/v0/account", accountJSON(protocol.SignAccount(nodetest.SeedKey(4), protocol.EncodeAccountPayload(0, nil)))), 204, "")

	expect(t, do(t, "GET", base+"/healthz", "", ""), 200, `{"status":"ok"}`)
	r := do(t, "GET", base+"/v1/status", "", "")
	var st Status
	if err := json.Unmarshal([]byte(r.body), &st); err != nil || r.code != 200 {
		t.Fatalf("status %d %s %v", r.code, r.body, err)
	}
	if st.Devices != 1 || st.Bundles != 1 || st.Accounts != 1 || st.DataDir == "" || st.Version == "" {
		t.Fatalf("status %+v", st)
	}
	r = do(t, "GET", base+"/v1/keypackages/"+b.DeviceID.String(), "", "")
	if r.code != 200 || !strings.Contains(r.body, `"ref":"`+protocol.KeyPackageRef([]byte("kp")).String()+`"`) {
		t.Fatalf("list: %d %s", r.code, r.body)
	}
	m := do(t, "GET", base+"/metrics", "", "").body
	for _, want := range []string{
		`kpnode_http_requests_total{code="204",route="POST /v0/keypackage"} 1`,
		`kpnode_http_requests_total{code="400",route="POST /v0/keypackage"} 1`,
		`kpnode_bundles_accepted_total{outcome="stored",source="http"} 1`,
		`kpnode_bundles_rejected_total{reason="signature",source="http"} 1`,
		`kpnode_accounts_accepted_total{outcome="stored",source="http"} 1`,
		`kpnode_store_bundles 1`,
		`kpnode_store_accounts 1`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// The API contract httpapi's tests run over a fake, here over a real node:
// Badger, the real ingest path and validation, the adapter's mapping.
func TestAPIContract(t *testing.T) {
	_, base := testNode(t, nil)
	httpapitest.TestAPI(t, base)
}

// The adapter maps each storage and lookup error to the httpapi sentinel
// the API answers by, keeps the cause in the chain and its text, and passes
// any other error (a validation error, a failure that is a 500) through.
func TestAPIErrorMapping(t *testing.T) {
	validation := &protocol.ValidationError{Rule: protocol.RuleSignature, Field: "signature", Detail: "verification failed"}
	other := errors.New("disk on fire")
	for _, tc := range []struct {
		err  error
		want error // nil: returned as it is
	}{
		{fmt.Errorf("put: %w", storage.ErrStale), httpapi.ErrStale},
		{storage.ErrNotFound, httpapi.ErrNotFound},
		{fmt.Errorf("lookup: %w", ErrUnavailable), httpapi.ErrUnavailable},
		{fmt.Errorf("budget: %w", storage.ErrStoreFull), httpapi.ErrStoreFull},
		{fmt.Errorf("node: queue publication: %w", storage.ErrOutboxFull), httpapi.ErrOutboxFull},
		{validation, nil},
		{other, nil},
		{storage.ErrClosed, nil},
	} {
		got := apiError(tc.err)
		if tc.want == nil {
			if got != tc.err {
				t.Errorf("%v: mapped to %v", tc.err, got)
			}
			continue
		}
		if !errors.Is(got, tc.want) || !errors.Is(got, tc.err) || got.Error() != tc.err.Error() {
			t.Errorf("%v: got %v, want %v wrapping the cause", tc.err, got, tc.want)
		}
		for _, s := range []error{httpapi.ErrStale, httpapi.ErrNotFound, httpapi.ErrStoreFull, httpapi.ErrOutboxFull} {
			if s != tc.want && errors.Is(got, s) {
				t.Errorf("%v: also matches %v", tc.err, s)
			}
		}
	}
	if apiError(nil) != nil {
		t.Error("nil mapped to an error")
	}
}

func TestConfigValidate(t *testing.T) {
	for name, mutate := range map[string]func(*Config){
		"no data dir":     func(c *Config) { c.DataDir = "" },
		"bad api":         func(c *Config) { c.APIAddr = "localhost" },
		"zero per device": func(c *Config) { c.MaxPerDevice = 0 },
		"bad mls mode":    func(c *Config) { c.Policy.MLS = "lenient" },
		"zero retention":  func(c *Config) { c.Policy.Retention = 0 },
	} {
		cfg := DefaultConfig()
		mutate(&cfg)
		if err := cfg.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("defaults invalid: %v", err)
	}
}
