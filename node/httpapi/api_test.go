package httpapi_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// serve starts the API over f on a real loopback HTTP server.
func serve(t *testing.T, f *httpapitest.Fake, mutate func(*httpapi.Config)) (base string, reg *prometheus.Registry) {
	t.Helper()
	cfg := httpapi.Config{Backend: f, Registry: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if mutate != nil {
		mutate(&cfg)
	}
	h, err := httpapi.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL, cfg.Registry
}

var hc = &http.Client{Timeout: 10 * time.Second}

func do(t *testing.T, method, url, contentType, body string) httpapitest.Reply {
	t.Helper()
	return httpapitest.Do(t, hc, method, url, contentType, body)
}

// The contract every server of the API keeps (node/api_test.go runs it
// against a real node), here over the fake.
func TestContract(t *testing.T) {
	base, _ := serve(t, httpapitest.NewFake(nil), nil)
	httpapitest.TestAPI(t, base, httpapitest.SingleUse())
}

// Every Backend error maps to one answer on every route that can return
// it: code, body, Retry-After on a 503 only, errors matched through wraps.
func TestBackendErrors(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, nil)
	b := protocol.SignBundle(httpapitest.SeedKey(1), uint64(time.Now().UnixMilli()), []byte("kp"))
	a := protocol.SignAccount(httpapitest.SeedKey(4), protocol.EncodeAccountPayload(1, nil))
	type route struct{ method, path, body string }
	postKP := route{"POST", "/v0/keypackage", httpapitest.MustJSON(httpapitest.BundleJSON(b))}
	postAcct := route{"POST", "/v0/account", httpapitest.MustJSON(httpapitest.AccountJSON(a))}
	getKP := route{"GET", "/v0/keypackage/" + b.DeviceID.String(), ""}
	getAcct := route{"GET", "/v0/account/" + a.AccountPub.String(), ""}
	listKP := route{"GET", "/v1/keypackages/" + b.DeviceID.String(), ""}
	all := []route{postKP, postAcct, getKP, getAcct, listKP}

	const (
		unavailable = `{"error":"registry network unreachable, try again"}`
		outboxFull  = `{"error":"too many publications waiting for the registry network, try again"}`
		storeFull   = `{"error":"registry store is full, try again later"}`
		internal    = `{"error":"internal error"}`
		stale       = `{"error":"stale bundle: lamport is not newer than the stored one"}`
	)
	validation := &protocol.ValidationError{Rule: protocol.RuleSignature, Field: "signature", Detail: "verification failed"}
	cases := []struct {
		name   string
		err    error
		routes []route
		code   int
		body   string // "" means: by route (404 bodies)
		retry  string
	}{
		{"unavailable", httpapi.ErrUnavailable, all, 503, unavailable, "5"},
		{"unavailable wrapped", fmt.Errorf("lookup: %w", httpapi.ErrUnavailable), all, 503, unavailable, "5"},
		{"outbox full", fmt.Errorf("node: queue publication: %w", httpapi.ErrOutboxFull), []route{postKP, postAcct}, 503, outboxFull, "5"},
		{"store full", fmt.Errorf("put: %w", httpapi.ErrStoreFull), []route{postKP, postAcct}, 507, storeFull, ""},
		{"stale", httpapi.ErrStale, []route{postAcct}, 409, stale, ""},
		{"validation", fmt.Errorf("ingest: %w", validation), []route{postKP, postAcct}, 400, `{"error":"signature: verification failed"}`, ""},
		{"not found", httpapi.ErrNotFound, []route{getKP, listKP}, 404, `{"error":"no keypackage for device"}`, ""},
		{"not found account", httpapi.ErrNotFound, []route{getAcct, postAcct}, 404, `{"error":"no account bundle for account_pub"}`, ""},
		// A miss wins over an outage, as documented on Backend.
		{"not found and unavailable", errors.Join(httpapi.ErrUnavailable, httpapi.ErrNotFound), []route{getKP}, 404, `{"error":"no keypackage for device"}`, ""},
		{"anything else", errors.New("disk on fire"), all, 500, internal, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f.Fail(tc.err)
			defer f.Fail(nil)
			for _, r := range tc.routes {
				ct := ""
				if r.method == "POST" {
					ct = "application/json"
				}
				got := do(t, r.method, base+r.path, ct, r.body)
				httpapitest.Expect(t, got, tc.code, tc.body)
				if got.RetryAfter != tc.retry {
					t.Errorf("%s %s: Retry-After %q, want %q", r.method, r.path, got.RetryAfter, tc.retry)
				}
			}
		})
	}
}

// A request refused for its shape (content type, size, JSON, fields,
// encodings) never reaches the Backend; a key that is not a key is a 404
// without a lookup.
func TestShapeRefusalsNeverReachBackend(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, nil)
	good := httpapitest.BundleJSON(protocol.SignBundle(httpapitest.SeedKey(1), uint64(time.Now().UnixMilli()), []byte("kp")))
	for _, r := range []struct{ method, path, ct, body string }{
		{"POST", "/v0/keypackage", "", httpapitest.MustJSON(good)},
		{"POST", "/v0/keypackage", "application/json", `{"device_id":`},
		{"POST", "/v0/keypackage", "application/json", `{"device_id":"aa","payload":"AAAA"}`},
		{"POST", "/v0/keypackage", "application/json", `{"device_id":"aa","payload":"AAAA","signature":"x"}`},
		{"POST", "/v0/account", "application/json", `{"account_pub":"` + strings.Repeat("0", 64) + `","payload":"AAA","signature":"x"}`},
		{"POST", "/v0/keypackage", "application/json", `{"payload":"` + strings.Repeat("A", 1<<20) + `"}`},
		{"GET", "/v0/keypackage/nothex", "", ""},
		{"GET", "/v0/account/nothex", "", ""},
		{"GET", "/v1/keypackages/nothex", "", ""},
		{"DELETE", "/v0/keypackage/" + good["device_id"], "", ""},
	} {
		if got := do(t, r.method, base+r.path, r.ct, r.body); got.Code/100 != 4 {
			t.Errorf("%s %s: %d %s", r.method, r.path, got.Code, got.Body)
		}
	}
	if n := f.Reached(); n != 0 {
		t.Fatalf("the Backend was called %d times", n)
	}
}

// Vector A of chat-store-compat.md, with the Backend's clock at its own
// time: accepted and served exactly as chat-store serves it.
func TestVectorAAtItsOwnTime(t *testing.T) {
	base, _ := serve(t, httpapitest.NewFake(func() time.Time { return time.UnixMilli(1700000000000 + 1000) }), nil)
	body := `{"device_id":"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c","payload":"AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz","signature":"fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA=="}`
	httpapitest.Expect(t, do(t, "POST", base+"/v0/keypackage", "application/json", body), 204, "")
	httpapitest.Expect(t, do(t, "GET", base+"/v0/keypackage/8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c", "", ""), 200,
		`{"payload":"AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz","signature":"fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA=="}`)
}

// GET /v1/status serves the Backend's Status byte for byte, fields in the
// order of httpapi.Status (the README's, and what dashboards parse).
func TestStatusBytes(t *testing.T) {
	f := httpapitest.NewFake(nil)
	f.SetStatus(&httpapi.Status{Version: "v1.2.3", DataDir: "/data", Network: "main", NetworkID: "main/3f2a", PeerID: "12D3KooWA",
		Addrs: []string{"/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWA"}, ConnectedPeers: 1, Ready: true, Peers: []string{"12D3KooWB"},
		Light: false, Shards: []int{0, 5}, ShardCount: 16, MLSValidation: "strict", Devices: 3, Bundles: 4, Accounts: 5, PendingPublications: 6})
	base, _ := serve(t, f, nil)
	httpapitest.Expect(t, do(t, "GET", base+"/v1/status", "", ""), 200,
		`{"version":"v1.2.3","data_dir":"/data","network":"main","network_id":"main/3f2a","peer_id":"12D3KooWA",`+
			`"addrs":["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWA"],"connected_peers":1,"ready":true,"peers":["12D3KooWB"],`+
			`"light":false,"shards":[0,5],"shard_count":16,"mls_validation":"strict","devices":3,"bundles":4,"accounts":5,`+
			`"pending_publications":6}`)
}

// Every answer carries a Content-Length equal to its body, and JSON bodies
// are application/json (the shape chat-store's clients read).
func TestContentLength(t *testing.T) {
	base, _ := serve(t, httpapitest.NewFake(nil), nil)
	for _, path := range []string{"/healthz", "/v1/status", "/v0/keypackage/" + strings.Repeat("0", 64), "/nothing"} {
		resp, err := hc.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if cl := resp.Header.Get("Content-Length"); cl != strconv.Itoa(len(body)) || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s: Content-Length %q, Content-Type %q for %d bytes", path, cl, resp.Header.Get("Content-Type"), len(body))
		}
	}
}

// MaxBodyBytes caps a body, and the 413 names the cap.
func TestMaxBodyBytes(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, func(c *httpapi.Config) { c.MaxBodyBytes = 100 })
	good := httpapitest.BundleJSON(protocol.SignBundle(httpapitest.SeedKey(1), uint64(time.Now().UnixMilli()), []byte("kp")))
	httpapitest.Expect(t, do(t, "POST", base+"/v0/keypackage", "application/json", httpapitest.MustJSON(good)), 413,
		`{"error":"request body is larger than 100 bytes"}`)
	if n := f.Reached(); n != 0 {
		t.Fatalf("the Backend was called %d times", n)
	}
}

// The HTTP metrics count each answer by route pattern and code, unknown
// paths under "other".
func TestMetrics(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, nil)
	b := protocol.SignBundle(httpapitest.SeedKey(3), uint64(time.Now().UnixMilli()), []byte("kp"))
	httpapitest.Expect(t, do(t, "POST", base+"/v0/keypackage", "application/json", httpapitest.MustJSON(httpapitest.BundleJSON(b))), 204, "")
	bad := httpapitest.BundleJSON(b)
	bad["signature"] = strings.Repeat("A", 86) + "=="
	httpapitest.Expect(t, do(t, "POST", base+"/v0/keypackage", "application/json", httpapitest.MustJSON(bad)), 400, "*")
	httpapitest.Expect(t, do(t, "GET", base+"/v0/keypackage/"+b.DeviceID.String(), "", ""), 200, "*")
	httpapitest.Expect(t, do(t, "GET", base+"/v0/keypackage/"+b.DeviceID.String(), "", ""), 200, "*")
	f.Fail(httpapi.ErrUnavailable)
	httpapitest.Expect(t, do(t, "GET", base+"/v0/account/"+b.DeviceID.String(), "", ""), 503, "*")
	f.Fail(nil)
	httpapitest.Expect(t, do(t, "GET", base+"/nothing", "", ""), 404, "*")
	httpapitest.Expect(t, do(t, "PUT", base+"/healthz", "", ""), 405, "*")

	m := do(t, "GET", base+"/metrics", "", "").Body
	for _, want := range []string{
		`kpnode_http_requests_total{code="204",route="POST /v0/keypackage"} 1`,
		`kpnode_http_requests_total{code="400",route="POST /v0/keypackage"} 1`,
		`kpnode_http_requests_total{code="200",route="GET /v0/keypackage/{device_id}"} 2`,
		`kpnode_http_requests_total{code="503",route="GET /v0/account/{account_pub}"} 1`,
		`kpnode_http_requests_total{code="404",route="other"} 1`,
		`kpnode_http_requests_total{code="405",route="GET /healthz"} 1`,
		`kpnode_http_request_duration_seconds_count{route="GET /v0/keypackage/{device_id}"} 2`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestNewValidatesConfig(t *testing.T) {
	if _, err := httpapi.New(httpapi.Config{}); err == nil {
		t.Fatal("New accepted a Config without a Backend")
	}
	reg := prometheus.NewRegistry()
	if _, err := httpapi.New(httpapi.Config{Backend: httpapitest.NewFake(nil), Registry: reg}); err != nil {
		t.Fatal(err)
	}
	if _, err := httpapi.New(httpapi.Config{Backend: httpapitest.NewFake(nil), Registry: reg}); err == nil {
		t.Fatal("New registered its metrics twice on one registry")
	}
}

// The single-use routes map Backend errors like the others: 409 consumed
// on a re-post, 429 with Retry-After from the error (rounded up to whole
// seconds, 1 without one), 503, 500; validation is a 400 on consume.
func TestSingleUseBackendErrors(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, nil)
	dev := httpapitest.SeedKey(1)
	id := protocol.Key(dev.Public().(ed25519.PublicKey))
	claim := route{"POST", "/v1/keypackages/" + id.String() + "/claim", ""}
	count := route{"GET", "/v1/keypackages/" + id.String() + "/count", ""}
	consume := route{"POST", "/v1/consume", httpapitest.MustJSON(httpapitest.ConsumeJSON(protocol.SignConsume(dev, uint64(time.Now().UnixMilli()), []protocol.Ref{{1}})))}
	postKP := route{"POST", "/v0/keypackage", httpapitest.MustJSON(httpapitest.BundleJSON(protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), []byte("kp"))))}
	validation := &protocol.ValidationError{Rule: protocol.RuleConsumeForeignRef, Field: "payload", Detail: "names a keypackage of another device"}
	for _, tc := range []struct {
		name   string
		err    error
		routes []route
		code   int
		body   string
		retry  string
	}{
		{"consumed", fmt.Errorf("put: %w", httpapi.ErrConsumed), []route{postKP}, 409, `{"error":"keypackage consumed"}`, ""},
		{"rate limited", httpapi.ErrRateLimited, []route{claim}, 429, `{"error":"rate limited"}`, "1"},
		{"rate limited with a wait", &httpapitest.RateLimitedError{Wait: 2500 * time.Millisecond}, []route{claim}, 429, `{"error":"rate limited"}`, "3"},
		{"rate limited under a second", &httpapitest.RateLimitedError{Wait: time.Millisecond}, []route{claim}, 429, `{"error":"rate limited"}`, "1"},
		{"not found", httpapi.ErrNotFound, []route{claim}, 404, `{"error":"no keypackage for device"}`, ""},
		{"validation", validation, []route{consume}, 400, `{"error":"payload: names a keypackage of another device"}`, ""},
		{"unavailable", fmt.Errorf("claim: %w", httpapi.ErrUnavailable), []route{claim, count, consume}, 503, `{"error":"registry network unreachable, try again"}`, "5"},
		{"outbox full", httpapi.ErrOutboxFull, []route{consume}, 503, `{"error":"too many publications waiting for the registry network, try again"}`, "5"},
		{"anything else", errors.New("disk on fire"), []route{claim, count, consume}, 500, `{"error":"internal error"}`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.Fail(tc.err)
			defer f.Fail(nil)
			for _, r := range tc.routes {
				ct := ""
				if r.body != "" {
					ct = "application/json"
				}
				got := do(t, r.method, base+r.path, ct, r.body)
				httpapitest.Expect(t, got, tc.code, tc.body)
				if got.RetryAfter != tc.retry {
					t.Errorf("%s %s: Retry-After %q, want %q", r.method, r.path, got.RetryAfter, tc.retry)
				}
			}
		})
	}
}

type route struct{ method, path, body string }

// mlsBundle is a bundle of a real KeyPackage (suite, last resort or not)
// signed by dev at ts.
func mlsBundle(t *testing.T, dev ed25519.PrivateKey, ts uint64, suite uint16, lastResort bool) protocol.Bundle {
	t.Helper()
	kp, _, err := mlstest.Generate(mlstest.Options{Suite: suite, Signer: dev, LastResort: lastResort})
	if err != nil {
		t.Fatal(err)
	}
	return protocol.SignBundle(dev, ts, kp)
}

// With real KeyPackages: one-time bundles go first, oldest first, then the
// latest last-resort one, flagged and handed out again and again, which
// count reports; cipher_suite picks bundles of that suite only.
func TestClaimLastResortAndSuite(t *testing.T) {
	f := httpapitest.NewFake(nil)
	f.SetMLS(protocol.MLSStrict)
	base, _ := serve(t, f, nil)
	dev := httpapitest.SeedKey(20)
	id := protocol.Key(dev.Public().(ed25519.PublicKey))
	now := uint64(time.Now().UnixMilli())
	ot1 := mlsBundle(t, dev, now-4000, 1, false)
	ot3 := mlsBundle(t, dev, now-3000, 3, false)
	lrOld := mlsBundle(t, dev, now-2000, 1, true)
	lr := mlsBundle(t, dev, now-1000, 1, true)
	for _, b := range []protocol.Bundle{ot1, ot3, lrOld, lr} {
		httpapitest.Expect(t, do(t, "POST", base+"/v0/keypackage", "application/json", httpapitest.MustJSON(httpapitest.BundleJSON(b))), 204, "")
	}
	claimJSON := func(b protocol.Bundle, lastResort bool) string {
		// The ref of an MLS bundle is the inner KeyPackage's; the fake
		// computed it, the list serves it.
		var ref string
		for _, x := range listRefs(t, base, id) {
			if x.payload == httpapitest.BundleJSON(b)["payload"] {
				ref = x.ref
			}
		}
		ts, _, _ := protocol.SplitBundlePayload(b.Payload)
		j := httpapitest.BundleJSON(b)
		return fmt.Sprintf(`{"device_id":"%s","ref":"%s","payload":"%s","signature":"%s","timestamp_ms":%d,"last_resort":%t}`,
			id, ref, j["payload"], j["signature"], ts, lastResort)
	}
	claim := base + "/v1/keypackages/" + id.String() + "/claim"
	countURL := base + "/v1/keypackages/" + id.String() + "/count"
	httpapitest.Expect(t, do(t, "GET", countURL, "", ""), 200, fmt.Sprintf(`{"device_id":"%s","one_time":2,"last_resort":2,"last_resort_handed_out":0}`, id))
	httpapitest.Expect(t, do(t, "POST", claim+"?cipher_suite=3", "", ""), 200, claimJSON(ot3, false))
	// No one-time bundle of suite 3 is left and no last-resort one has it.
	httpapitest.Expect(t, do(t, "POST", claim+"?cipher_suite=3", "", ""), 404, `{"error":"no keypackage for device"}`)
	httpapitest.Expect(t, do(t, "POST", claim+"?cipher_suite=0", "", ""), 200, claimJSON(ot1, false))
	for range 2 {
		httpapitest.Expect(t, do(t, "POST", claim+"?cipher_suite=1", "", ""), 200, claimJSON(lr, true))
	}
	httpapitest.Expect(t, do(t, "GET", countURL, "", ""), 200, fmt.Sprintf(`{"device_id":"%s","one_time":0,"last_resort":2,"last_resort_handed_out":2}`, id))
}

type listed struct{ ref, payload string }

func listRefs(t *testing.T, base string, id protocol.Key) []listed {
	t.Helper()
	r := do(t, "GET", base+"/v1/keypackages/"+id.String(), "", "")
	var list struct {
		Bundles []struct {
			Ref     string `json:"ref"`
			Payload string `json:"payload"`
		} `json:"bundles"`
	}
	if err := json.Unmarshal([]byte(r.Body), &list); err != nil {
		t.Fatalf("list %s: %v", r.Body, err)
	}
	var out []listed
	for _, b := range list.Bundles {
		out = append(out, listed{b.Ref, b.Payload})
	}
	return out
}

// An account claim claims for at most MaxAccountClaimDevices distinct
// devices; a device listed twice and the devices past the cap get error
// elements, in the list's order, and are not claimed.
func TestAccountClaimCapsDevices(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, nil)
	n := httpapi.MaxAccountClaimDevices + 2
	devices := make([]protocol.Key, 0, n+1)
	now := uint64(time.Now().UnixMilli())
	for i := range n {
		k := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{byte(100 + i)}, 32))
		devices = append(devices, protocol.Key(k.Public().(ed25519.PublicKey)))
		httpapitest.Expect(t, do(t, "POST", base+"/v0/keypackage", "application/json",
			httpapitest.MustJSON(httpapitest.BundleJSON(protocol.SignBundle(k, now, []byte("kp"))))), 204, "")
	}
	devices = slices.Insert(devices, 1, devices[0]) // listed twice
	acct := protocol.SignAccount(httpapitest.SeedKey(30), protocol.EncodeAccountPayload(1, devices))
	httpapitest.Expect(t, do(t, "POST", base+"/v0/account", "application/json", httpapitest.MustJSON(httpapitest.AccountJSON(acct))), 204, "")
	c := httpapi.NewClient(base, nil)
	got, err := c.ClaimAccount(t.Context(), acct.AccountPub, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Devices) != len(devices) || got.Lamport != 1 {
		t.Fatalf("%d devices, lamport %d", len(got.Devices), got.Lamport)
	}
	claimed := 0
	for i, d := range got.Devices {
		if d.DeviceID != devices[i] {
			t.Fatalf("element %d is device %s, want %s", i, d.DeviceID, devices[i])
		}
		switch {
		case i == 1:
			if d.Error != "device listed twice in the account bundle" {
				t.Fatalf("duplicate: %+v", d)
			}
		case i > httpapi.MaxAccountClaimDevices:
			if d.Error != fmt.Sprintf("too many devices in one account claim (at most %d)", httpapi.MaxAccountClaimDevices) {
				t.Fatalf("element %d past the cap: %+v", i, d)
			}
			if cnt, _ := c.Count(t.Context(), d.DeviceID); cnt.OneTime != 1 {
				t.Fatalf("device %d past the cap was claimed: %+v", i, cnt)
			}
		default:
			if d.Claim == nil || d.Claim.LastResort {
				t.Fatalf("element %d: %+v", i, d)
			}
			claimed++
		}
	}
	if claimed != httpapi.MaxAccountClaimDevices {
		t.Fatalf("%d devices claimed, want %d", claimed, httpapi.MaxAccountClaimDevices)
	}
}

// The requester of a claim, for the per-requester limit, is the client's
// IP without the port; an account claim's devices report their own
// errors (a rate-limited device says so) in a 200.
func TestClaimRequesterAndDeviceErrors(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, nil)
	dev := protocol.Key(httpapitest.SeedKey(1).Public().(ed25519.PublicKey))
	httpapitest.Expect(t, do(t, "POST", base+"/v1/keypackages/"+dev.String()+"/claim", "", ""), 404, "*")
	if got := f.LastRequester(); got != "127.0.0.1" {
		t.Fatalf("requester %q, want 127.0.0.1", got)
	}
	acct := protocol.SignAccount(httpapitest.SeedKey(4), protocol.EncodeAccountPayload(1, []protocol.Key{dev}))
	httpapitest.Expect(t, do(t, "POST", base+"/v0/account", "application/json", httpapitest.MustJSON(httpapitest.AccountJSON(acct))), 204, "")
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&httpapitest.RateLimitedError{Wait: time.Second}, "rate limited"},
		{httpapi.ErrUnavailable, "registry network unreachable, try again"},
		{errors.New("disk on fire"), "internal error"},
	} {
		f.Fail(nil)
		// Account succeeds, the claim fails: inject through a wrapper.
		ff := &failClaims{Fake: f, err: tc.err}
		b2, _ := serveBackend(t, ff)
		httpapitest.Expect(t, do(t, "POST", b2+"/v1/accounts/"+acct.AccountPub.String()+"/claim", "", ""), 200,
			fmt.Sprintf(`{"account_pub":"%s","lamport":1,"devices":[{"device_id":"%s","error":"%s"}]}`, acct.AccountPub, dev, tc.want))
	}
}

// failClaims is a Fake whose claims fail with err.
type failClaims struct {
	*httpapitest.Fake
	err error
}

func (f *failClaims) Claim(context.Context, string, protocol.Key, uint16) (*httpapi.Claim, error) {
	return nil, f.err
}

func serveBackend(t *testing.T, b httpapi.Backend) (string, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	h, err := httpapi.New(httpapi.Config{Backend: b, Registry: reg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL, reg
}

// The Client's single-use calls against the fake: claims verified under
// the device, ErrNotFound after the pool, counts, consume; its errors
// match the sentinels (429 ErrRateLimited with RetryAfter, 409
// ErrConsumed, not ErrStale).
func TestClientSingleUse(t *testing.T) {
	f := httpapitest.NewFake(nil)
	base, _ := serve(t, f, nil)
	c := httpapi.NewClient(base, nil)
	ctx := t.Context()
	dev := httpapitest.SeedKey(40)
	id := protocol.Key(dev.Public().(ed25519.PublicKey))
	b := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), []byte("client"))
	if err := c.PublishBundle(ctx, &b); err != nil {
		t.Fatal(err)
	}
	if cnt, err := c.Count(ctx, id); err != nil || cnt != (httpapi.ClaimCounts{OneTime: 1}) {
		t.Fatalf("count %+v %v", cnt, err)
	}
	got, err := c.Claim(ctx, id, 0)
	if err != nil || !bytes.Equal(got.Payload, b.Payload) || got.Ref != protocol.KeyPackageRef([]byte("client")) || got.LastResort {
		t.Fatalf("claim %+v %v", got, err)
	}
	if _, err := c.Claim(ctx, id, 0); !errors.Is(err, httpapi.ErrNotFound) {
		t.Fatalf("claim of an empty pool: %v", err)
	}
	n := protocol.SignConsume(dev, uint64(time.Now().UnixMilli()), []protocol.Ref{got.Ref})
	if err := c.Consume(ctx, &n); err != nil {
		t.Fatal(err)
	}
	err = c.PublishBundle(ctx, &b)
	if !errors.Is(err, httpapi.ErrConsumed) || errors.Is(err, httpapi.ErrStale) {
		t.Fatalf("re-post of a consumed bundle: %v", err)
	}
	f.Fail(&httpapitest.RateLimitedError{Wait: 2 * time.Second})
	_, err = c.Claim(ctx, id, 3)
	var ra interface{ RetryAfter() time.Duration }
	if !errors.Is(err, httpapi.ErrRateLimited) || !errors.As(err, &ra) || ra.RetryAfter() != 2*time.Second {
		t.Fatalf("rate limited claim: %v", err)
	}
	f.Fail(nil)
}

// The Client refuses a claim answer that is not a bundle of the device it
// asked for, or whose signature or timestamp does not hold.
func TestClientVerifiesClaims(t *testing.T) {
	dev := httpapitest.SeedKey(41)
	id := protocol.Key(dev.Public().(ed25519.PublicKey))
	b := protocol.SignBundle(dev, 1234567, []byte("kp"))
	other := protocol.SignBundle(httpapitest.SeedKey(42), 1234567, []byte("kp"))
	good := httpapitest.ClaimJSON(b, false)
	for name, body := range map[string]string{
		"another device":    httpapitest.ClaimJSON(other, false),
		"forged signature":  strings.Replace(good, httpapitest.BundleJSON(b)["signature"], httpapitest.BundleJSON(other)["signature"], 1),
		"another timestamp": strings.Replace(good, `"timestamp_ms":1234567`, `"timestamp_ms":1234568`, 1),
		"bad ref":           strings.Replace(good, `"ref":"`, `"ref":"x`, 1),
	} {
		t.Run(name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				io.WriteString(w, body)
			}))
			defer srv.Close()
			if _, err := httpapi.NewClient(srv.URL, nil).Claim(t.Context(), id, 0); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, good)
	}))
	defer srv.Close()
	if _, err := httpapi.NewClient(srv.URL, nil).Claim(t.Context(), id, 0); err != nil {
		t.Fatalf("good answer refused: %v", err)
	}
}

// fixedClaim is a Fake whose claims always hand out c, without limits: the
// HTTP layer's own cost.
type fixedClaim struct {
	*httpapitest.Fake
	c *httpapi.Claim
}

func (f *fixedClaim) Claim(context.Context, string, protocol.Key, uint16) (*httpapi.Claim, error) {
	return f.c, nil
}

// BenchmarkClaimRoute: POST /v1/keypackages/{device_id}/claim over
// loopback with a Backend that answers at once, the ceiling the HTTP layer
// puts on a node's claims/s.
func BenchmarkClaimRoute(b *testing.B) {
	dev := httpapitest.SeedKey(1)
	bundle := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), bytes.Repeat([]byte{7}, 2700))
	c := &httpapi.Claim{Bundle: httpapi.Bundle{Bundle: bundle, BundleInfo: protocol.BundleInfo{Ref: protocol.Ref{1}, TimestampMS: 1}}}
	h, err := httpapi.New(httpapi.Config{Backend: &fixedClaim{Fake: httpapitest.NewFake(nil), c: c}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	url := srv.URL + "/v1/keypackages/" + bundle.DeviceID.String() + "/claim"
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := hc.Post(url, "", nil)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "claims/s")
}
