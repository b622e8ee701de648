package httpapi_test

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
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
