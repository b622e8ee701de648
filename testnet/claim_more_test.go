package testnet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
)

// A light node beside a chat client claims through the holders (fetch
// KIND_CLAIM): distinct one-time bundles, validated, then the last-resort
// one flagged; its count (fetch KIND_COUNT) agrees with the holders'.
func TestLightNodeClaimsThroughHolders(t *testing.T) {
	c := startCluster(t, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	light, err := c.Add(ctx, func(cfg *node.Config) {
		cfg.Light = true
		cfg.Shards = protocol.NoShards(protocol.DefaultShardCount)
	})
	if err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "the light node to join the DHT", 20*time.Second, func() bool { return light.DHTPeers() > 0 })
	p := newPool(t, nil, 3, true)
	p.submit(t, ctx, c.Nodes[0])
	p.waitHeld(t, ctx, c.Nodes[:2])

	api := newAPI(t, light)
	seen := map[protocol.Ref]bool{}
	for k := 0; k < 3; k++ {
		code, cb, raw, err := api.claim(ctx, p.id)
		if err != nil || code != http.StatusOK {
			t.Fatalf("claim %d through the light node: http %d %s (%v)", k+1, code, raw, err)
		}
		ref := p.checkClaim(t, cb)
		if cb.LastResort || seen[ref] {
			t.Fatalf("claim %d through the light node: ref %s last_resort %v, already handed out %v", k+1, ref, cb.LastResort, seen[ref])
		}
		seen[ref] = true
	}
	code, cb, raw, err := api.claim(ctx, p.id)
	if err != nil || code != http.StatusOK || !cb.LastResort || p.checkClaim(t, cb) != p.lrRef {
		t.Fatalf("4th claim through the light node: http %d %s (%v), want the last-resort bundle, flagged", code, raw, err)
	}
	want := countBody{DeviceID: p.id.String(), OneTime: 0, LastResort: 1, LastResortHandedOut: 1}
	for i, n := range []*node.Node{light, c.Nodes[0], c.Nodes[1]} {
		a := newAPI(t, n)
		var got countBody
		nodetest.WaitFor(t, fmt.Sprintf("node %d to count %+v (has %+v)", i, want, &got), 2*time.Second, func() bool {
			got, err = a.count(ctx, p.id)
			return err == nil && got == want
		})
	}
	// Nothing for an unknown device: 404, not 503 (the holders answered).
	unknown := newPool(t, nil, 0, false)
	if code, _, raw, err := api.claim(ctx, unknown.id); err != nil || code != http.StatusNotFound {
		t.Fatalf("claim of an unknown device through the light node: http %d %s (%v), want 404", code, raw, err)
	}
}

// POST /v1/accounts/{account_pub}/claim claims one KeyPackage per device of
// the account's latest device list: a claim object for a device with
// bundles, {"device_id","error"} for one without; 404 for an unknown
// account.
func TestAccountClaim(t *testing.T) {
	c := startCluster(t, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	withBundles := newPool(t, nil, 2, true)
	empty := newPool(t, nil, 0, false)
	withBundles.submit(t, ctx, c.Nodes[0])
	withBundles.waitHeld(t, ctx, c.Nodes)
	_, acct, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	a := protocol.SignAccount(acct, protocol.EncodeAccountPayload(4, []protocol.Key{withBundles.id, empty.id}))
	if err := c.Nodes[0].SubmitAccount(ctx, &a); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "the account bundle on node 1", 10*time.Second, func() bool {
		got, err := c.Nodes[1].Account(ctx, a.AccountPub)
		return err == nil && got.Lamport == 4
	})
	api := newAPI(t, c.Nodes[1])
	code, raw, _, err := api.do(ctx, http.MethodPost, "/v1/accounts/"+a.AccountPub.String()+"/claim", nil)
	if err != nil || code != http.StatusOK {
		t.Fatalf("account claim: http %d %s (%v)", code, raw, err)
	}
	var body struct {
		AccountPub string            `json:"account_pub"`
		Lamport    uint64            `json:"lamport"`
		Devices    []json.RawMessage `json:"devices"`
	}
	if err := json.Unmarshal(raw, &body); err != nil {
		t.Fatal(err)
	}
	if body.AccountPub != a.AccountPub.String() || body.Lamport != 4 || len(body.Devices) != 2 {
		t.Fatalf("account claim: %s, want account %s, lamport 4, 2 devices", raw, a.AccountPub)
	}
	var claimed, failed int
	for _, d := range body.Devices {
		var el struct {
			claimBody
			Error string `json:"error"`
		}
		if err := json.Unmarshal(d, &el); err != nil {
			t.Fatal(err)
		}
		switch el.DeviceID {
		case withBundles.id.String():
			if el.Error != "" || el.LastResort {
				t.Fatalf("device with bundles: %s, want a one-time claim", d)
			}
			withBundles.checkClaim(t, el.claimBody)
			claimed++
		case empty.id.String():
			if el.Error == "" || el.Ref != "" {
				t.Fatalf("device without bundles: %s, want {device_id, error}", d)
			}
			failed++
		default:
			t.Fatalf("account claim names device %s of no listed device", el.DeviceID)
		}
	}
	if claimed != 1 || failed != 1 {
		t.Fatalf("account claim: %d claims and %d errors, want one each: %s", claimed, failed, raw)
	}
	if got := mustCount(t, ctx, api, withBundles.id); got.OneTime != 1 {
		t.Fatalf("after the account claim the device counts %+v, want one_time 1", got)
	}
	unknown := newPool(t, nil, 0, false)
	if code, raw, _, err := api.do(ctx, http.MethodPost, "/v1/accounts/"+unknown.id.String()+"/claim", nil); err != nil || code != http.StatusNotFound {
		t.Fatalf("account claim of an unknown account: http %d %s (%v), want 404", code, raw, err)
	}
}

// Claims are limited per requester (the client's IP) at a burst of 40 and
// 20/s: past it a 429 {"error":"rate limited"} with Retry-After, counted as
// outcome "limited"; another client is served meanwhile.
func TestClaimRateLimits(t *testing.T) {
	c := startCluster(t, 1, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	n := c.Nodes[0]
	// Six devices, each with only a last-resort bundle (every claim is
	// served, nothing runs out) and claimed 25 times, under the per-device
	// burst: only the requester's limit can refuse. 150 claims from one
	// client, 8 at a time.
	devs := make([]*pool, 6)
	for i := range devs {
		devs[i] = newPool(t, nil, 0, true)
		devs[i].submit(t, ctx, n)
	}
	greedy := newAPIFrom(t, n, "127.0.0.41")
	var mu sync.Mutex
	ok, limited := 0, 0
	var retryAfter string
	var failure error
	var wg sync.WaitGroup
	next := make(chan int)
	start := time.Now()
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range next {
				code, raw, hdr, err := greedy.do(ctx, http.MethodPost, "/v1/keypackages/"+devs[k%len(devs)].id.String()+"/claim", nil)
				mu.Lock()
				switch {
				case err != nil:
					failure = err
				case code == http.StatusOK:
					ok++
				case code == http.StatusTooManyRequests && errorText(raw) == "rate limited":
					limited++
					retryAfter = hdr.Get("Retry-After")
				default:
					failure = fmt.Errorf("claim %d: http %d %s", k, code, raw)
				}
				mu.Unlock()
			}
		}()
	}
	for k := 0; k < 150; k++ {
		next <- k
	}
	close(next)
	wg.Wait()
	if failure != nil {
		t.Fatal(failure)
	}
	elapsed := time.Since(start)
	t.Logf("150 claims from one client in %v: %d served, %d limited, Retry-After %q", elapsed.Round(time.Millisecond), ok, limited, retryAfter)
	if allowed := 40 + int(20*elapsed.Seconds()) + 1; ok > allowed || limited == 0 {
		t.Fatalf("%d of 150 claims served in %v, want at most %d (burst 40, 20/s) and some refused", ok, elapsed, allowed)
	}
	if s, err := strconv.Atoi(retryAfter); err != nil || s < 1 {
		t.Fatalf("Retry-After %q, want whole seconds ≥ 1", retryAfter)
	}
	if code, _, raw, err := newAPIFrom(t, n, "127.0.0.42").claim(ctx, devs[0].id); err != nil || code != http.StatusOK {
		t.Fatalf("another client meanwhile: http %d %s (%v)", code, raw, err)
	}
	if got := nodetest.Scrape(t, n.Handler(), "kpnode_claims_total", `outcome="limited"`); got != float64(limited) {
		t.Fatalf("kpnode_claims_total{outcome=limited} %v, want %d", got, limited)
	}
}
