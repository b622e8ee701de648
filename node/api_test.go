package node

import (
	"context"
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

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
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

// do sends a request to the node's API and reads the whole answer.
func do(t testing.TB, method, url, contentType, body string) httpapitest.Reply {
	t.Helper()
	return httpapitest.Do(t, http.DefaultClient, method, url, contentType, body)
}

func postJSON(t testing.TB, url string, v any) httpapitest.Reply {
	t.Helper()
	return do(t, http.MethodPost, url, "application/json", httpapitest.MustJSON(v))
}

var b64 = base64.StdEncoding

func nowMS() uint64 { return uint64(time.Now().UnixMilli()) }

// Vector A: signed in 2023, so past the retention and refused; the same
// key_package signed by the same key now is accepted and served byte for
// byte. (Hex case, idempotent reposts and the listing are httpapitest's.)
func TestKeyPackageVectorAAndFreshSigning(t *testing.T) {
	n, base := testNode(t, nil)
	dev1 := nodetest.SeedKey(1)
	va := protocol.SignBundle(dev1, 1700000000000, []byte("fake-mls-keypackage-bytes"))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(va)), 400,
		`{"error":"payload: timestamp 1700000000000 is older than the retention of 720h0m0s"}`)

	fresh := protocol.SignBundle(dev1, nowMS(), []byte("fake-mls-keypackage-bytes"))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(fresh)), 204, "")
	want := fmt.Sprintf(`{"payload":"%s","signature":"%s"}`, b64.EncodeToString(fresh.Payload), b64.EncodeToString(fresh.Signature[:]))
	httpapitest.Expect(t, do(t, "GET", base+"/v0/keypackage/"+fresh.DeviceID.String(), "", ""), 200, want)
	if c := n.store.Counts(); c.Bundles != 1 {
		t.Fatalf("counts %+v", c)
	}
}

// With the node's clock at vector A's own time, vector A is accepted and
// served exactly as chat-store serves it.
func TestKeyPackageVectorAAtItsOwnTime(t *testing.T) {
	_, base := testNode(t, func(c *Config) { c.Now = func() time.Time { return time.UnixMilli(1700000000000 + 1000) } })
	body := `{"device_id":"8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c","payload":"AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz","signature":"fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA=="}`
	httpapitest.Expect(t, do(t, "POST", base+"/v0/keypackage", "application/json", body), 204, "")
	httpapitest.Expect(t, do(t, "GET", base+"/v0/keypackage/8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c", "", ""), 200,
		`{"payload":"AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz","signature":"fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA=="}`)
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
			codes[i] = postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)).Code
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

func TestStatusHealthAndMetrics(t *testing.T) {
	_, base := testNode(t, nil)
	b := protocol.SignBundle(nodetest.SeedKey(3), nowMS(), []byte("kp"))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)), 204, "")
	bad := httpapitest.BundleJSON(b)
	bad["signature"] = b64.EncodeToString(make([]byte, 64))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", bad), 400, "*")
	httpapitest.Expect(t, postJSON(t, base+"/v0/account", httpapitest.AccountJSON(protocol.SignAccount(nodetest.SeedKey(4), protocol.EncodeAccountPayload(0, nil)))), 204, "")

	httpapitest.Expect(t, do(t, "GET", base+"/healthz", "", ""), 200, `{"status":"ok"}`)
	r := do(t, "GET", base+"/v1/status", "", "")
	var st Status
	if err := json.Unmarshal([]byte(r.Body), &st); err != nil || r.Code != 200 {
		t.Fatalf("status %d %s %v", r.Code, r.Body, err)
	}
	if st.Devices != 1 || st.Bundles != 1 || st.Accounts != 1 || st.DataDir == "" || st.Version == "" {
		t.Fatalf("status %+v", st)
	}
	r = do(t, "GET", base+"/v1/keypackages/"+b.DeviceID.String(), "", "")
	if r.Code != 200 || !strings.Contains(r.Body, `"ref":"`+protocol.KeyPackageRef([]byte("kp")).String()+`"`) {
		t.Fatalf("list: %d %s", r.Code, r.Body)
	}
	m := do(t, "GET", base+"/metrics", "", "").Body
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
	httpapitest.TestAPI(t, base, httpapitest.SingleUse())
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
		{fmt.Errorf("put: %w", storage.ErrConsumed), httpapi.ErrConsumed},
		{fmt.Errorf("node: %w", storage.ErrConsumeQuota), httpapi.ErrRateLimited},
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
		for _, s := range []error{httpapi.ErrStale, httpapi.ErrNotFound, httpapi.ErrStoreFull, httpapi.ErrOutboxFull, httpapi.ErrConsumed, httpapi.ErrRateLimited} {
			if s != tc.want && errors.Is(got, s) {
				t.Errorf("%v: also matches %v", tc.err, s)
			}
		}
	}
	if apiError(nil) != nil {
		t.Error("nil mapped to an error")
	}
	// A consume notice over the device's tombstone quota says when to try
	// again (the API's Retry-After of its 429).
	var ra interface{ RetryAfter() time.Duration }
	if err := apiError(storage.ErrConsumeQuota); !errors.As(err, &ra) || ra.RetryAfter() != time.Minute {
		t.Errorf("consume quota: %v carries no one-minute RetryAfter", err)
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
