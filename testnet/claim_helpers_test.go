package testnet

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// The single-use tests talk to the nodes the way a chat client does: over
// the HTTP API, with the routes and bodies exactly as issue 9 states them,
// decoded here rather than through httpapi.Client, so that the test pins the
// wire contract and not one implementation of a client.

// claimBody is the 200 answer of POST /v1/keypackages/{device_id}/claim.
type claimBody struct {
	DeviceID    string `json:"device_id"`
	Ref         string `json:"ref"`
	Payload     string `json:"payload"`
	Signature   string `json:"signature"`
	TimestampMS uint64 `json:"timestamp_ms"`
	LastResort  bool   `json:"last_resort"`
}

// countBody is the 200 answer of GET /v1/keypackages/{device_id}/count.
type countBody struct {
	DeviceID            string `json:"device_id"`
	OneTime             int    `json:"one_time"`
	LastResort          int    `json:"last_resort"`
	LastResortHandedOut int64  `json:"last_resort_handed_out"`
}

// listItem is one bundle of GET /v1/keypackages/{device_id}.
type listItem struct {
	Ref        string `json:"ref"`
	LastResort bool   `json:"last_resort"`
	Claimed    bool   `json:"claimed"`
}

// apiClient is one HTTP requester of a node's API. Requesters made with a
// distinct loopback source address count as distinct clients for the
// per-requester claim limit (the node keys it on the client's IP).
type apiClient struct {
	base string
	hc   *http.Client
}

// newAPI returns a requester of n's API from 127.0.0.1.
func newAPI(t testing.TB, n *node.Node) *apiClient { return newAPIFrom(t, n, "") }

// newAPIFrom returns a requester of n's API whose connections come from
// source (a loopback address such as 127.0.0.23; "" for the default).
func newAPIFrom(t testing.TB, n *node.Node, source string) *apiClient {
	t.Helper()
	addr := n.APIAddr()
	if addr == nil {
		t.Fatal("node has no HTTP listener")
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 16}
	if source != "" {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}, Timeout: 5 * time.Second}
		tr.DialContext = d.DialContext
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &apiClient{base: "http://" + addr.String(), hc: &http.Client{Transport: tr, Timeout: 10 * time.Second}}
}

// handlerAPI returns a requester that calls n's API handler in process, as
// a client at remote (host:port) would: for simulated nodes, which have no
// HTTP listener (a socket's accept loop would stop synctest's clock).
func handlerAPI(n *node.Node, remote string) *apiClient {
	return &apiClient{base: "http://node", hc: &http.Client{Transport: remoteTransport{h: n.Handler(), remote: remote}}}
}

// remoteTransport serves every request with h, in process, from remote.
type remoteTransport struct {
	h      http.Handler
	remote string
}

func (t remoteTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	r := req.Clone(req.Context())
	r.RemoteAddr, r.RequestURI = t.remote, req.URL.RequestURI()
	rec := httptest.NewRecorder()
	t.h.ServeHTTP(rec, r)
	return rec.Result(), nil
}

// do sends one request and returns the status, the body (at most 1 MiB)
// and the headers.
func (c *apiClient) do(ctx context.Context, method, path string, body any) (int, []byte, http.Header, error) {
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return 0, nil, nil, err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return 0, nil, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, raw, resp.Header, err
}

// claim posts POST /v1/keypackages/{device_id}/claim (empty body). The
// claim body is decoded on a 200.
func (c *apiClient) claim(ctx context.Context, dev protocol.Key) (int, claimBody, []byte, error) {
	code, raw, _, err := c.do(ctx, http.MethodPost, "/v1/keypackages/"+dev.String()+"/claim", nil)
	var cb claimBody
	if err == nil && code == http.StatusOK {
		err = json.Unmarshal(raw, &cb)
	}
	return code, cb, raw, err
}

// count gets GET /v1/keypackages/{device_id}/count.
func (c *apiClient) count(ctx context.Context, dev protocol.Key) (countBody, error) {
	code, raw, _, err := c.do(ctx, http.MethodGet, "/v1/keypackages/"+dev.String()+"/count", nil)
	var cb countBody
	if err != nil {
		return cb, err
	}
	if code != http.StatusOK {
		return cb, fmt.Errorf("count: http %d: %s", code, raw)
	}
	return cb, json.Unmarshal(raw, &cb)
}

// list gets GET /v1/keypackages/{device_id}.
func (c *apiClient) list(ctx context.Context, dev protocol.Key) ([]listItem, error) {
	code, raw, _, err := c.do(ctx, http.MethodGet, "/v1/keypackages/"+dev.String(), nil)
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("list: http %d: %s", code, raw)
	}
	var body struct {
		Bundles []listItem `json:"bundles"`
	}
	return body.Bundles, json.Unmarshal(raw, &body)
}

var b64 = base64.StdEncoding

// publish posts a bundle to POST /v0/keypackage.
func (c *apiClient) publish(ctx context.Context, b *protocol.Bundle) (int, []byte, error) {
	code, raw, _, err := c.do(ctx, http.MethodPost, "/v0/keypackage", map[string]string{
		"device_id": b.DeviceID.String(), "payload": b64.EncodeToString(b.Payload), "signature": b64.EncodeToString(b.Signature[:])})
	return code, raw, err
}

// consume posts a consume notice to POST /v1/consume.
func (c *apiClient) consume(ctx context.Context, n *protocol.ConsumeNotice) (int, []byte, error) {
	code, raw, _, err := c.do(ctx, http.MethodPost, "/v1/consume", map[string]string{
		"device_id": n.DeviceID.String(), "payload": b64.EncodeToString(n.Payload), "signature": b64.EncodeToString(n.Signature[:])})
	return code, raw, err
}

// errorText is the {"error"} of an error answer, or the raw body.
func errorText(raw []byte) string {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(raw, &e) == nil && e.Error != "" {
		return e.Error
	}
	return string(raw)
}

// pool is one device's published KeyPackages: real MLS KeyPackages (X-Wing)
// whose leaf signature key is the device key, as the chat client makes them.
type pool struct {
	dev        ed25519.PrivateKey
	id         protocol.Key
	oneTime    []protocol.Bundle
	refs       []protocol.Ref // refs[i] is oneTime[i]'s
	lastResort *protocol.Bundle
	lrRef      protocol.Ref
	byRef      map[protocol.Ref]*protocol.Bundle
}

// newPool signs n one-time KeyPackages and, if lastResort, one last-resort
// KeyPackage for a new device (dev nil) or for dev. Timestamps are distinct,
// oldest first, the last-resort one the newest.
func newPool(t testing.TB, dev ed25519.PrivateKey, n int, lastResort bool) *pool {
	t.Helper()
	if dev == nil {
		var err error
		if _, dev, err = ed25519.GenerateKey(rand.Reader); err != nil {
			t.Fatal(err)
		}
	}
	p := &pool{dev: dev, byRef: map[protocol.Ref]*protocol.Bundle{}}
	copy(p.id[:], dev.Public().(ed25519.PublicKey))
	now := uint64(time.Now().UnixMilli())
	sign := func(ts uint64, lr bool) (protocol.Bundle, protocol.Ref) {
		kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: dev, LastResort: lr})
		if err != nil {
			t.Fatal(err)
		}
		b := protocol.SignBundle(dev, ts, kp)
		info, err := protocol.DefaultPolicy().ValidateBundle(&b, time.Now())
		if err != nil {
			t.Fatalf("a generated KeyPackage does not validate: %v", err)
		}
		if info.LastResort != lr {
			t.Fatalf("generated KeyPackage: last_resort %v, want %v", info.LastResort, lr)
		}
		return b, info.Ref
	}
	for i := 0; i < n; i++ {
		b, ref := sign(now-uint64(n+1-i), false)
		p.oneTime = append(p.oneTime, b)
		p.refs = append(p.refs, ref)
	}
	for i := range p.oneTime {
		p.byRef[p.refs[i]] = &p.oneTime[i]
	}
	if lastResort {
		b, ref := sign(now, true)
		p.lastResort, p.lrRef = &b, ref
		p.byRef[ref] = &b
	}
	return p
}

// all returns every bundle of the pool, the last-resort one last.
func (p *pool) all() []*protocol.Bundle {
	out := make([]*protocol.Bundle, 0, len(p.oneTime)+1)
	for i := range p.oneTime {
		out = append(out, &p.oneTime[i])
	}
	if p.lastResort != nil {
		out = append(out, p.lastResort)
	}
	return out
}

// submit stores every bundle of the pool on n (as a POST would).
func (p *pool) submit(t testing.TB, ctx context.Context, n *node.Node) {
	t.Helper()
	for _, b := range p.all() {
		if err := n.SubmitBundle(ctx, b); err != nil {
			t.Fatalf("submit bundle of %s: %v", p.id, err)
		}
	}
}

// waitHeld waits until every node stores all n bundles of the pool.
func (p *pool) waitHeld(t testing.TB, ctx context.Context, nodes []*node.Node) {
	t.Helper()
	want := len(p.all())
	for i, n := range nodes {
		if err := eventually(ctx, func() bool {
			got, _ := n.Bundles(ctx, p.id)
			return len(got) == want
		}); err != nil {
			got, _ := n.Bundles(ctx, p.id)
			t.Fatalf("node %d holds %d of the %d bundles of %s", i, len(got), want, p.id)
		}
	}
}

// checkClaim checks a claim answer against the pool: the device, a ref of
// the pool, and the payload, signature and timestamp of that very bundle.
// It returns the ref.
func (p *pool) checkClaim(t testing.TB, cb claimBody) protocol.Ref {
	t.Helper()
	ref, err := protocol.ParseRef(cb.Ref)
	if err != nil {
		t.Fatalf("claim answer: ref %q: %v", cb.Ref, err)
	}
	if cb.DeviceID != p.id.String() {
		t.Fatalf("claim answer names device %s, want %s", cb.DeviceID, p.id)
	}
	b, ok := p.byRef[ref]
	if !ok {
		t.Fatalf("claim answer: ref %s is not a bundle of the device", ref)
	}
	if cb.Payload != b64.EncodeToString(b.Payload) || cb.Signature != b64.EncodeToString(b.Signature[:]) {
		t.Fatalf("claim answer: payload or signature is not the bundle of ref %s", ref)
	}
	if ts, _, _ := protocol.SplitBundlePayload(b.Payload); cb.TimestampMS != ts {
		t.Fatalf("claim answer: timestamp_ms %d, the bundle's is %d", cb.TimestampMS, ts)
	}
	return ref
}
