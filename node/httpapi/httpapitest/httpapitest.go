// Package httpapitest checks a running server against kpnode's HTTP API
// contract: chat-store's v0 routes byte for byte, the v1 additions, and the
// JSON error answers of every refusal a request's shape or the validation
// rules cause. The same table runs against httpapi over a fake Backend and
// against a real node, so the two cannot drift apart. Fake is the
// in-memory Backend the API's and the CLI's tests serve.
package httpapitest

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// StatusFields are the keys of GET /v1/status, in the order they are served.
var StatusFields = []string{
	"version", "data_dir", "network", "network_id", "peer_id", "addrs", "connected_peers", "ready",
	"peers", "light", "shards", "shard_count", "mls_validation", "devices", "bundles", "accounts",
	"pending_publications",
}

// TestAPI runs the contract against the API at base (a URL). The server
// must start empty, hold every shard (an unknown key is a 404, not a
// lookup), run on the wall clock with protocol.DefaultPolicy's retention and
// skew and MLS validation off, and cap bodies at httpapi.DefaultMaxBodyBytes.
// TestAPI stores records: run it once per server.
//
// The single-use routes' refusals of a request's shape always run; their
// behaviour (claims, counts, consumes, the claim limits) runs only with
// the SingleUse option, which a server passes once it implements them.
func TestAPI(t *testing.T, base string, opts ...Option) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	c := &client{t: t, base: strings.TrimRight(base, "/"), http: &http.Client{Timeout: 10 * time.Second}}
	// Each part uses its own keys; the status part counts what the others
	// stored, so the parts run in this order.
	t.Run("Refusals", c.refusals)
	t.Run("KeyPackage", c.keyPackage)
	t.Run("OlderBundleIsNotLatest", c.olderBundle)
	t.Run("Account", c.account)
	t.Run("Routes", c.routes)
	t.Run("Status", c.status)
	// After Status, which counts what the parts above stored.
	t.Run("SingleUseRefusals", c.singleUseRefusals)
	t.Run("SingleUse", func(t *testing.T) {
		if !o.singleUse {
			t.Skip("claims, counts and consumes are not checked: the server does not declare them (pass httpapitest.SingleUse() once it implements them)")
		}
		// The claim limit part spends the requester's tokens: it runs last.
		t.Run("Claim", c.claim)
		t.Run("Count", c.count)
		t.Run("Consume", c.consume)
		t.Run("AccountClaim", c.accountClaim)
		t.Run("ClaimLimit", c.claimLimit)
	})
}

// Option declares a capability of the server under test.
type Option func(*options)

type options struct{ singleUse bool }

// SingleUse declares that the server implements claims, counts and
// consumes (issue 9), so TestAPI checks them.
func SingleUse() Option { return func(o *options) { o.singleUse = true } }

// Reply is an answer: code, body and the headers the contract pins.
type Reply struct {
	Code        int
	Body        string
	ContentType string
	RetryAfter  string
	Allow       string
}

// Do sends a request and reads the whole answer.
func Do(t testing.TB, hc *http.Client, method, url, contentType, body string) Reply {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return Reply{Code: resp.StatusCode, Body: string(b), ContentType: resp.Header.Get("Content-Type"),
		RetryAfter: resp.Header.Get("Retry-After"), Allow: resp.Header.Get("Allow")}
}

// Expect fails t unless r has code and body ("*": any body), and a body
// other than empty is served as application/json.
func Expect(t testing.TB, r Reply, code int, body string) {
	t.Helper()
	if r.Code != code || (body != "*" && r.Body != body) {
		t.Fatalf("got %d %s, want %d %s", r.Code, r.Body, code, body)
	}
	if r.Body != "" && r.ContentType != "application/json" {
		t.Fatalf("content type %q for body %s", r.ContentType, r.Body)
	}
}

// SeedKey is the Ed25519 key of a 32-byte seed of b, as chat-store's
// vectors use.
func SeedKey(b byte) ed25519.PrivateKey { return ed25519.NewKeyFromSeed(bytes.Repeat([]byte{b}, 32)) }

var b64 = base64.StdEncoding

// BundleJSON is a POST /v0/keypackage body for b.
func BundleJSON(b protocol.Bundle) map[string]string {
	return map[string]string{"device_id": b.DeviceID.String(), "payload": b64.EncodeToString(b.Payload), "signature": b64.EncodeToString(b.Signature[:])}
}

// AccountJSON is a POST /v0/account body for a.
func AccountJSON(a protocol.AccountBundle) map[string]string {
	return map[string]string{"account_pub": a.AccountPub.String(), "payload": b64.EncodeToString(a.Payload), "signature": b64.EncodeToString(a.Signature[:])}
}

// MustJSON marshals v or panics.
func MustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

type client struct {
	t    *testing.T
	base string
	http *http.Client
}

func (c *client) do(t testing.TB, method, path, contentType, body string) Reply {
	t.Helper()
	return Do(t, c.http, method, c.base+path, contentType, body)
}

func (c *client) post(t testing.TB, path string, v any) Reply {
	t.Helper()
	return c.do(t, http.MethodPost, path, "application/json", MustJSON(v))
}

func nowMS() uint64 { return uint64(time.Now().UnixMilli()) }

func keyPackageBody(b protocol.Bundle) string {
	return fmt.Sprintf(`{"payload":"%s","signature":"%s"}`, b64.EncodeToString(b.Payload), b64.EncodeToString(b.Signature[:]))
}

const (
	noKeyPackage = `{"error":"no keypackage for device"}`
	noAccount    = `{"error":"no account bundle for account_pub"}`
	stale        = `{"error":"stale bundle: lamport is not newer than the stored one"}`
)

// refusals: every refusal answers its documented JSON error and stores
// nothing. Keys: seeds 1 (device) and 4 (account), never stored.
func (c *client) refusals(t *testing.T) {
	dev := SeedKey(1)
	good := protocol.SignBundle(dev, nowMS(), []byte("kp"))
	gj := BundleJSON(good)
	with := func(m map[string]string, k, v string) map[string]string {
		out := map[string]string{}
		for kk, vv := range m {
			out[kk] = vv
		}
		out[k] = v
		return out
	}
	sig63 := b64.EncodeToString(good.Signature[:63])
	notPoint := "02" + strings.Repeat("00", 31)
	vectorG := "01" + strings.Repeat("00", 31)
	gSig := b64.EncodeToString(append(append([]byte{1}, make([]byte, 31)...), make([]byte, 32)...))
	short := protocol.Bundle{DeviceID: good.DeviceID, Payload: []byte("1234567")}
	copy(short.Signature[:], ed25519.Sign(dev, short.Payload))
	future := protocol.SignBundle(dev, nowMS()+10*60_000, []byte("kp"))
	old := protocol.SignBundle(dev, 1700000000000, []byte("fake-mls-keypackage-bytes"))
	acct := protocol.SignAccount(SeedKey(4), protocol.EncodeAccountPayload(1, nil))
	noHeader := protocol.SignAccount(SeedKey(4), []byte("libchat:account-device-bundle\x00\x01\x00"))
	wrongSig := with(gj, "signature", b64.EncodeToString(ed25519.Sign(dev, []byte("other"))))

	cases := []struct {
		name, path, ctype, body string
		code                    int
		want                    string
	}{
		{"bad key", "/v0/keypackage", "application/json", MustJSON(with(gj, "device_id", "not-a-key")), 400, `{"error":"device_id: must be hex of a 32-byte key"}`},
		{"short key", "/v0/keypackage", "application/json", MustJSON(with(gj, "device_id", good.DeviceID.String()[:62])), 400, `{"error":"device_id: must be hex of a 32-byte key"}`},
		{"bad base64", "/v0/keypackage", "application/json", MustJSON(with(gj, "payload", "bad")), 400, `{"error":"payload: not valid base64"}`},
		{"base64 newline", "/v0/keypackage", "application/json", MustJSON(with(gj, "payload", gj["payload"][:4]+"\n"+gj["payload"][4:])), 400, `{"error":"payload: not valid base64"}`},
		{"base64 unpadded", "/v0/keypackage", "application/json", MustJSON(with(gj, "payload", "AAA")), 400, `{"error":"payload: not valid base64"}`},
		{"base64 trailing bits", "/v0/keypackage", "application/json", MustJSON(with(gj, "payload", "AB==")), 400, `{"error":"payload: not valid base64"}`},
		{"signature 63 bytes", "/v0/keypackage", "application/json", MustJSON(with(gj, "signature", sig63)), 400, `{"error":"signature: must be base64 of 64 bytes"}`},
		{"signature not base64", "/v0/keypackage", "application/json", MustJSON(with(gj, "signature", "!!")), 400, `{"error":"signature: must be base64 of 64 bytes"}`},
		{"key not a point", "/v0/keypackage", "application/json", MustJSON(with(gj, "device_id", notPoint)), 400, `{"error":"device_id: not a valid ed25519 key"}`},
		{"vector G", "/v0/keypackage", "application/json", MustJSON(with(with(gj, "device_id", vectorG), "signature", gSig)), 400, `{"error":"signature: verification failed"}`},
		{"wrong signature", "/v0/keypackage", "application/json", MustJSON(wrongSig), 400, `{"error":"signature: verification failed"}`},
		{"payload under 8 bytes", "/v0/keypackage", "application/json", MustJSON(BundleJSON(short)), 400, `{"error":"payload: too short to contain a timestamp"}`},
		{"timestamp past retention", "/v0/keypackage", "application/json", MustJSON(BundleJSON(old)), 400, `{"error":"payload: timestamp 1700000000000 is older than the retention of 720h0m0s"}`},
		{"timestamp in future", "/v0/keypackage", "application/json", MustJSON(BundleJSON(future)), 400, "*"},
		{"account bad key", "/v0/account", "application/json", MustJSON(with(AccountJSON(acct), "account_pub", "xyz")), 400, `{"error":"account_pub: must be hex of a 32-byte key"}`},
		{"account not a point", "/v0/account", "application/json", MustJSON(with(AccountJSON(acct), "account_pub", notPoint)), 400, `{"error":"account_pub: not a valid ed25519 key"}`},
		{"account wrong signature", "/v0/account", "application/json", MustJSON(with(AccountJSON(acct), "signature", gj["signature"])), 400, `{"error":"signature: verification failed"}`},
		{"account no header", "/v0/account", "application/json", MustJSON(AccountJSON(noHeader)), 400, `{"error":"payload: too short to contain a lamport header"}`},
		{"no content type", "/v0/keypackage", "", MustJSON(gj), 415, "{\"error\":\"expected request with `Content-Type: application/json`\"}"},
		{"text content type", "/v0/keypackage", "text/plain", MustJSON(gj), 415, "{\"error\":\"expected request with `Content-Type: application/json`\"}"},
		{"malformed JSON", "/v0/keypackage", "application/json", `{"device_id":`, 400, `{"error":"request body is not valid JSON"}`},
		{"trailing garbage", "/v0/keypackage", "application/json", MustJSON(gj) + "x", 400, `{"error":"request body is not valid JSON"}`},
		{"array body", "/v0/keypackage", "application/json", `[1,2]`, 422, `{"error":"request body must be a JSON object"}`},
		{"null body", "/v0/account", "application/json", `null`, 422, `{"error":"request body must be a JSON object"}`},
		{"missing field", "/v0/keypackage", "application/json", `{"device_id":"aa","payload":"AAAA"}`, 422, "{\"error\":\"missing field `signature`\"}"},
		{"wrong field type", "/v0/keypackage", "application/json", `{"device_id":1,"payload":"AAAA","signature":"x"}`, 422, "{\"error\":\"field `device_id` must be a string\"}"},
		{"null field", "/v0/account", "application/json", `{"account_pub":null,"payload":"AAAA","signature":"x"}`, 422, "{\"error\":\"field `account_pub` must be a string\"}"},
		{"field names are case-sensitive", "/v0/keypackage", "application/json", `{"Device_ID":"aa","payload":"AAAA","signature":"x"}`, 422, "{\"error\":\"missing field `device_id`\"}"},
		{"body over 1 MiB", "/v0/keypackage", "application/json", MustJSON(with(gj, "payload", strings.Repeat("A", 1<<20))), 413, `{"error":"request body is larger than 1048576 bytes"}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := c.do(t, http.MethodPost, tc.path, tc.ctype, tc.body)
			Expect(t, r, tc.code, tc.want)
			if tc.want == "*" && !strings.HasPrefix(r.Body, `{"error":"`) {
				t.Fatalf("body %s is not a JSON error", r.Body)
			}
		})
	}
	// Nothing was stored.
	Expect(t, c.do(t, "GET", "/v0/keypackage/"+good.DeviceID.String(), "", ""), 404, noKeyPackage)
	Expect(t, c.do(t, "GET", "/v1/keypackages/"+good.DeviceID.String(), "", ""), 200,
		fmt.Sprintf(`{"device_id":"%s","bundles":[]}`, good.DeviceID))
	Expect(t, c.do(t, "GET", "/v0/account/"+acct.AccountPub.String(), "", ""), 404, noAccount)
}

// keyPackage: a fresh bundle is stored, served byte for byte under any hex
// case, listed, and posting it again is idempotent. Key: seed 2.
func (c *client) keyPackage(t *testing.T) {
	kp := []byte("fake-mls-keypackage-bytes")
	b := protocol.SignBundle(SeedKey(2), nowMS(), kp)
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(b)), 204, "")
	Expect(t, c.do(t, "GET", "/v0/keypackage/"+b.DeviceID.String(), "", ""), 200, keyPackageBody(b))
	Expect(t, c.do(t, "GET", "/v0/keypackage/"+strings.ToUpper(b.DeviceID.String()), "", ""), 200, keyPackageBody(b))
	// Posting what the server holds is idempotent: still one bundle.
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(b)), 204, "")
	ts, _, _ := protocol.SplitBundlePayload(b.Payload)
	Expect(t, c.do(t, "GET", "/v1/keypackages/"+strings.ToUpper(b.DeviceID.String()), "", ""), 200,
		fmt.Sprintf(`{"device_id":"%s","bundles":[{"ref":"%s","timestamp_ms":%d,"last_resort":false,"claimed":false,"payload":"%s","signature":"%s"}]}`,
			b.DeviceID, protocol.KeyPackageRef(kp), ts, b64.EncodeToString(b.Payload), b64.EncodeToString(b.Signature[:])))
	// Unknown fields are ignored, as in chat-store.
	extra := BundleJSON(b)
	extra["extra"] = "whatever"
	Expect(t, c.post(t, "/v0/keypackage", extra), 204, "")
}

// olderBundle: a bundle older than the one held is stored but not served
// as the latest; the list has both, newest first. Key: seed 7.
func (c *client) olderBundle(t *testing.T) {
	dev := SeedKey(7)
	now := nowMS()
	newer := protocol.SignBundle(dev, now, []byte("newer"))
	older := protocol.SignBundle(dev, now-60_000, []byte("older"))
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(newer)), 204, "")
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(older)), 204, "")
	Expect(t, c.do(t, "GET", "/v0/keypackage/"+newer.DeviceID.String(), "", ""), 200, keyPackageBody(newer))
	r := c.do(t, "GET", "/v1/keypackages/"+newer.DeviceID.String(), "", "")
	Expect(t, r, 200, "*")
	var list struct {
		Bundles []struct {
			TimestampMS uint64 `json:"timestamp_ms"`
		} `json:"bundles"`
	}
	if err := json.Unmarshal([]byte(r.Body), &list); err != nil || len(list.Bundles) != 2 ||
		list.Bundles[0].TimestampMS != now || list.Bundles[1].TimestampMS != now-60_000 {
		t.Fatalf("list %s: %v", r.Body, err)
	}
}

// account: chat-store's vectors B and C, byte for byte: 404 before, 204,
// 204, then 409 for both, and the GET serves C with its updated_at.
func (c *client) account(t *testing.T) {
	acct, k1, k2 := SeedKey(4), SeedKey(1), SeedKey(2)
	var d1, d2 protocol.Key
	copy(d1[:], k1.Public().(ed25519.PublicKey))
	copy(d2[:], k2.Public().(ed25519.PublicKey))
	vb := protocol.SignAccount(acct, protocol.EncodeAccountPayload(0, []protocol.Key{d1}))
	vc := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, []protocol.Key{d1, d2}))

	Expect(t, c.do(t, "GET", "/v0/account/"+vb.AccountPub.String(), "", ""), 404, noAccount)
	Expect(t, c.post(t, "/v0/account", AccountJSON(vb)), 204, "")
	Expect(t, c.post(t, "/v0/account", AccountJSON(vc)), 204, "")
	Expect(t, c.post(t, "/v0/account", AccountJSON(vb)), 409, stale)
	Expect(t, c.post(t, "/v0/account", AccountJSON(vc)), 409, stale)

	r := c.do(t, "GET", "/v0/account/"+vc.AccountPub.String(), "", "")
	Expect(t, r, 200, "*")
	wantPrefix := fmt.Sprintf(`{"payload":"%s","signature":"%s","updated_at":`, b64.EncodeToString(vc.Payload), b64.EncodeToString(vc.Signature[:]))
	if !strings.HasPrefix(r.Body, wantPrefix) || !strings.HasSuffix(r.Body, "}") {
		t.Fatalf("GET account: %s", r.Body)
	}
	var got struct {
		UpdatedAt int64 `json:"updated_at"`
	}
	if err := json.Unmarshal([]byte(r.Body), &got); err != nil || got.UpdatedAt <= 0 {
		t.Fatalf("updated_at: %v %d", err, got.UpdatedAt)
	}
	if r2 := c.do(t, "GET", "/v0/account/"+strings.ToUpper(vc.AccountPub.String()), "", ""); r2.Code != 200 || r2.Body != r.Body {
		t.Fatalf("uppercase GET: %d %s", r2.Code, r2.Body)
	}
}

// routes: unknown paths, keys that are not keys, wrong methods (with
// Allow), HEAD, health and metrics.
func (c *client) routes(t *testing.T) {
	zero := strings.Repeat("0", 64)
	Expect(t, c.do(t, "GET", "/v0/nothing", "", ""), 404, `{"error":"not found"}`)
	Expect(t, c.do(t, "GET", "/v0/keypackage/", "", ""), 404, `{"error":"not found"}`)
	Expect(t, c.do(t, "GET", "/v0/keypackage/unknown", "", ""), 404, noKeyPackage)
	Expect(t, c.do(t, "GET", "/v0/keypackage/"+zero, "", ""), 404, noKeyPackage)
	Expect(t, c.do(t, "GET", "/v0/account/unknown", "", ""), 404, noAccount)
	Expect(t, c.do(t, "GET", "/v0/account/"+zero, "", ""), 404, noAccount)
	Expect(t, c.do(t, "GET", "/v1/keypackages/unknown", "", ""), 400, `{"error":"device_id: must be hex of a 32-byte key"}`)
	Expect(t, c.do(t, "GET", "/v1/keypackages/"+zero, "", ""), 200, fmt.Sprintf(`{"device_id":"%s","bundles":[]}`, zero))
	for _, m := range []struct{ method, path, allow string }{
		{"GET", "/v0/keypackage", "POST"},
		{"PUT", "/v0/account", "POST"},
		{"POST", "/v0/keypackage/" + zero, "GET, HEAD"},
		{"DELETE", "/v0/account/" + zero, "GET, HEAD"},
		{"POST", "/v1/keypackages/" + zero, "GET, HEAD"},
		{"POST", "/v1/status", "GET, HEAD"},
		{"POST", "/healthz", "GET, HEAD"},
		{"POST", "/metrics", "GET, HEAD"},
	} {
		r := c.do(t, m.method, m.path, "", "")
		Expect(t, r, 405, `{"error":"method not allowed"}`)
		if r.Allow != m.allow {
			t.Errorf("%s %s: Allow %q, want %q", m.method, m.path, r.Allow, m.allow)
		}
	}
	Expect(t, c.do(t, "GET", "/healthz", "", ""), 200, `{"status":"ok"}`)
	if r := c.do(t, "HEAD", "/healthz", "", ""); r.Code != 200 || r.Body != "" || r.ContentType != "application/json" {
		t.Fatalf("HEAD /healthz: %+v", r)
	}
	m := c.do(t, "GET", "/metrics", "", "")
	if m.Code != 200 || !strings.Contains(m.Body, `kpnode_http_requests_total{code="204",route="POST /v0/keypackage"}`) ||
		!strings.Contains(m.Body, `kpnode_http_request_duration_seconds_bucket{route="GET /v0/account/{account_pub}",le="0.0001"}`) {
		t.Fatalf("metrics: %d\n%s", m.Code, m.Body)
	}
}

// status: GET /v1/status serves every field, in order, and counts what the
// other parts stored: devices 2 and 7, their three bundles, one account.
func (c *client) status(t *testing.T) {
	r := c.do(t, "GET", "/v1/status", "", "")
	Expect(t, r, 200, "*")
	keys, err := objectKeys(r.Body)
	if err != nil || !slices.Equal(keys, StatusFields) {
		t.Fatalf("status fields %v (%v), want %v", keys, err, StatusFields)
	}
	var st struct {
		Devices  int64 `json:"devices"`
		Bundles  int64 `json:"bundles"`
		Accounts int64 `json:"accounts"`
	}
	if err := json.Unmarshal([]byte(r.Body), &st); err != nil || st.Devices != 2 || st.Bundles != 3 || st.Accounts != 1 {
		t.Fatalf("status %s: %v", r.Body, err)
	}
}

// objectKeys returns the keys of a JSON object in the order they appear.
func objectKeys(body string) ([]string, error) {
	dec := json.NewDecoder(strings.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, fmt.Errorf("not an object: %v %v", tok, err)
	}
	var keys []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		keys = append(keys, tok.(string))
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil, err
		}
	}
	return keys, nil
}
