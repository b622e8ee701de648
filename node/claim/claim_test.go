package claim

import (
	"context"
	"crypto/ed25519"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	dto "github.com/prometheus/client_model/go"

	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

func claimAt(t testing.TB, n *testNode, requester string, dev protocol.Key) (Result, error) {
	t.Helper()
	return n.svc.Claim(context.Background(), Request{Requester: requester, Device: dev, Source: ingest.SourceHTTP})
}

func mustClaim(t testing.TB, n *testNode, dev protocol.Key) Result {
	t.Helper()
	r, err := claimAt(t, n, "client", dev)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func poolHistogram(t testing.TB, s *Service) (count uint64, sum float64) {
	t.Helper()
	var m dto.Metric
	if err := s.pool.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

// A lone holder hands out each one-time bundle once, oldest first, then
// the last-resort bundle, flagged, as often as asked; the store counts
// what is left and the last-resort hand-outs, and the metrics say so.
func TestHolderHandsOutDistinctThenLastResort(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, nil)
	c.agree()
	p := newPool(t, c.clock, 50, 5)
	p.storeIn(t, a)

	seen := map[protocol.Ref]bool{}
	for i := range 5 {
		r := mustClaim(t, a, p.dev)
		if r.LastResort || !p.isOneTime(r.Bundle.Ref) || seen[r.Bundle.Ref] {
			t.Fatalf("claim %d: ref %s last_resort=%v; want a one-time ref not handed out before", i, r.Bundle.Ref, r.LastResort)
		}
		if r.Bundle.Ref != p.oneTime[i].Ref {
			t.Errorf("claim %d handed out %s; want the oldest left, %s", i, r.Bundle.Ref, p.oneTime[i].Ref)
		}
		if r.Notice == nil || deviceOf(r.Notice) != p.dev {
			t.Fatalf("claim %d: no claim notice of the device", i)
		}
		seen[r.Bundle.Ref] = true
	}
	for i := range 2 {
		r := mustClaim(t, a, p.dev)
		if !r.LastResort || r.Bundle.Ref != p.lastResort.Ref {
			t.Fatalf("claim %d after the pool ran out: ref %s last_resort=%v; want the last-resort bundle, flagged", 5+i, r.Bundle.Ref, r.LastResort)
		}
	}
	counts, err := a.store.ClaimCounts(context.Background(), p.dev)
	if err != nil {
		t.Fatal(err)
	}
	if counts.OneTime != 0 || counts.LastResort != 1 || counts.LastResortHandedOut != 2 {
		t.Fatalf("counts %+v; want 0 one-time, 1 last-resort handed out twice", counts)
	}
	for outcome, want := range map[string]float64{"one_time": 5, "last_resort": 2, "none": 0, "limited": 0} {
		if got := counter(t, a, "kpnode_claims_total", "outcome", outcome); got != want {
			t.Errorf("kpnode_claims_total{outcome=%s} = %v, want %v", outcome, got, want)
		}
	}
	// Left after each claim: 4, 3, 2, 1, 0, then 0 twice.
	if n, sum := poolHistogram(t, a.svc); n != 7 || sum != 10 {
		t.Errorf("kpnode_claim_pool_one_time: %d samples summing to %v; want 7 summing to 10", n, sum)
	}
	if got := a.gossip.published.Load(); got != 7 {
		t.Errorf("published %d claim notices, want 7 (one per hand-out)", got)
	}
	// A device with nothing: not found, counted as none.
	other := newPool(t, c.clock, 51, 0)
	if _, err := claimAt(t, a, "client", other.dev); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("claim of an unknown device: %v; want storage.ErrNotFound", err)
	}
	if got := counter(t, a, "kpnode_claims_total", "outcome", "none"); got != 1 {
		t.Errorf("kpnode_claims_total{outcome=none} = %v, want 1", got)
	}
}

// Rendezvous ownership: every view of the same holders, in any order,
// names the same owner for a ref; each ref has one owner; the refs spread
// over the holders; a holder leaving moves only its own refs.
func TestOwnerDeterministicAndDisjoint(t *testing.T) {
	var ids []peer.ID
	for i := range 3 {
		_, _, id := nodeIdentity(t, byte(10+i))
		ids = append(ids, id)
	}
	reversed := []peer.ID{ids[2], ids[1], ids[0]}
	owned := map[peer.ID]int{}
	const refs = 3000
	for i := range refs {
		var ref protocol.Ref
		ref[0], ref[1], ref[31] = byte(i), byte(i>>8), 7
		o := Owner(ids, ref)
		if o2 := Owner(reversed, ref); o2 != o {
			t.Fatalf("ref %d: owner %s in one order, %s in another", i, o, o2)
		}
		owned[o]++
		// Without ids[0], refs it did not own keep their owner.
		if o != ids[0] {
			if o3 := Owner(ids[1:], ref); o3 != o {
				t.Fatalf("ref %d moved from %s to %s when another holder left", i, o, o3)
			}
		}
	}
	for _, id := range ids {
		if owned[id] < refs/5 {
			t.Errorf("holder %s owns %d of %d refs; want about a third", id, owned[id], refs)
		}
	}
	if Owner(nil, protocol.Ref{}) != "" {
		t.Error("no holders: want no owner")
	}
}

// Two holders with the same view claim disjoint refs at home: each hands
// out only the refs it owns while it has some, so their hand-outs never
// collide, and together they hand out the whole pool once.
func TestOwnersClaimDisjointRefs(t *testing.T) {
	c := newCluster(t)
	a, b := c.add(1, false, nil), c.add(2, false, nil)
	hs := c.agree()
	p := newPool(t, c.clock, 52, 12)
	p.storeIn(t, a, b)
	ownedBy := map[peer.ID]int{}
	for _, bd := range p.oneTime {
		ownedBy[Owner(hs, bd.Ref)]++
	}
	// Each claims as many as it owns: all at home, no owner asked.
	seen := map[protocol.Ref]peer.ID{}
	for _, n := range []*testNode{a, b} {
		for range ownedBy[n.id] {
			r := mustClaim(t, n, p.dev)
			if o := Owner(hs, r.Bundle.Ref); o != n.id {
				t.Fatalf("%s handed out %s, owned by %s", n.id, r.Bundle.Ref, o)
			}
			if prev, dup := seen[r.Bundle.Ref]; dup {
				t.Fatalf("ref %s handed out by %s and %s", r.Bundle.Ref, prev, n.id)
			}
			seen[r.Bundle.Ref] = n.id
		}
	}
	if len(seen) != len(p.oneTime) || a.srv.Inflight() != 0 {
		t.Fatalf("%d distinct refs handed out, want %d", len(seen), len(p.oneTime))
	}
	// Both have the pool used up (each still knows only its own claims,
	// and the other's NOT_FOUND keeps it off the other's refs).
	for _, n := range []*testNode{a, b} {
		if r := mustClaim(t, n, p.dev); !r.LastResort {
			t.Fatalf("%s handed out one-time %s after the pool ran out", n.id, r.Bundle.Ref)
		}
		if got := counter(t, n, "kpnode_claim_owner_fallbacks_total"); got != 0 {
			t.Fatalf("%s fell back %v times with every owner reachable", n.id, got)
		}
	}
}

// An owner-only request (fetch KIND_CLAIM owned_only) hands out only refs
// the responder owns, never the last-resort bundle, and NOT_FOUND once it
// owns nothing unclaimed.
func TestOwnedOnlyHandsOutOnlyOwnedRefs(t *testing.T) {
	c := newCluster(t)
	a, b := c.add(1, false, nil), c.add(2, false, nil)
	hs := c.agree()
	p := newPool(t, c.clock, 53, 10)
	p.storeIn(t, a, b)
	owned := 0
	for _, bd := range p.oneTime {
		if Owner(hs, bd.Ref) == b.id {
			owned++
		}
	}
	if owned == 0 || owned == len(p.oneTime) {
		t.Fatalf("b owns %d of %d refs; the test needs some on each side", owned, len(p.oneTime))
	}
	cli := a.svc.cfg.Client
	for i := range owned {
		got, lastResort, n, err := cli.Claim(context.Background(), b.id, p.dev, 0, true)
		if err != nil {
			t.Fatalf("owner-only claim %d: %v", i, err)
		}
		if lastResort || Owner(hs, got.Ref) != b.id {
			t.Fatalf("owner-only claim %d: ref %s (owner %s) last_resort=%v; want one b owns", i, got.Ref, Owner(hs, got.Ref), lastResort)
		}
		if _, _, ref, _ := protocol.DecodeClaimPayload(n.Payload); ref != got.Ref || n.NodeKey != protocol.Key(b.key.Public().(ed25519.PublicKey)) {
			t.Fatalf("owner-only claim %d: the notice names %s or another node", i, ref)
		}
	}
	if _, _, _, err := cli.Claim(context.Background(), b.id, p.dev, 0, true); !errors.Is(err, fetch.ErrNoRecord) {
		t.Fatalf("owner-only claim with nothing owned left: %v; want NOT_FOUND (fetch.ErrNoRecord)", err)
	}
}

// When the owner of the refs left cannot be reached, the holder falls back
// to claiming them itself (counted), one at a time, then the last resort.
func TestFallbackWhenOwnerUnreachable(t *testing.T) {
	c := newCluster(t)
	a, b := c.add(1, false, func(cfg *Config) { cfg.OwnerTimeout = 200 * time.Millisecond }), c.add(2, false, nil)
	hs := c.agree()
	p := newPool(t, c.clock, 54, 8)
	p.storeIn(t, a)
	a.pipes.Handle(b.id, nil) // b is down
	var ownA, ownB int
	for _, bd := range p.oneTime {
		if Owner(hs, bd.Ref) == a.id {
			ownA++
		} else {
			ownB++
		}
	}
	seen := map[protocol.Ref]bool{}
	for i := range len(p.oneTime) {
		r := mustClaim(t, a, p.dev)
		if r.LastResort || seen[r.Bundle.Ref] {
			t.Fatalf("claim %d: ref %s last_resort=%v; want a one-time ref not handed out before", i, r.Bundle.Ref, r.LastResort)
		}
		seen[r.Bundle.Ref] = true
		if i < ownA && Owner(hs, r.Bundle.Ref) != a.id {
			t.Fatalf("claim %d: handed out b's ref %s while a still owned some", i, r.Bundle.Ref)
		}
	}
	if got := counter(t, a, "kpnode_claim_owner_fallbacks_total"); got != float64(ownB) {
		t.Fatalf("kpnode_claim_owner_fallbacks_total = %v, want %d (b's refs)", got, ownB)
	}
	if r := mustClaim(t, a, p.dev); !r.LastResort {
		t.Fatalf("after the pool: %s not the last resort", r.Bundle.Ref)
	}
}

// An owner that is up and answers it owns nothing unclaimed is believed:
// the holder does not take its refs over (the owner handed them out, and
// gossip has not told the holder yet).
func TestOwnerNotFoundIsNoFallback(t *testing.T) {
	c := newCluster(t)
	a, b := c.add(1, false, nil), c.add(2, false, nil)
	hs := c.agree()
	p := newPool(t, c.clock, 55, 8)
	p.storeIn(t, a, b)
	// b hands out everything it owns; a does not hear of it (no gossip).
	var ownA int
	for _, bd := range p.oneTime {
		if Owner(hs, bd.Ref) == b.id {
			mustClaim(t, b, p.dev)
		} else {
			ownA++
		}
	}
	for range ownA {
		if r := mustClaim(t, a, p.dev); r.LastResort || Owner(hs, r.Bundle.Ref) != a.id {
			t.Fatalf("a handed out %s (last_resort=%v); want its own refs first", r.Bundle.Ref, r.LastResort)
		}
	}
	if r := mustClaim(t, a, p.dev); !r.LastResort {
		t.Fatalf("a handed out b's ref %s, which b had handed out; want the last resort", r.Bundle.Ref)
	}
	if got := counter(t, a, "kpnode_claim_owner_fallbacks_total"); got != 0 {
		t.Fatalf("fallbacks %v, want 0", got)
	}
}

// Rate limits: per requester, then per device, each a token bucket; a
// refused claim says when to come back, costs no candidate, and is
// counted as limited. The limiters remember a bounded number of keys.
func TestRateLimits(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, func(cfg *Config) {
		cfg.RequesterRate, cfg.RequesterBurst = 1, 3
		cfg.DeviceRate, cfg.DeviceBurst = 2, 5
		cfg.MaxRequesters = 16
	})
	c.agree()
	p := newPool(t, c.clock, 56, 20)
	p.storeIn(t, a)
	for range 3 {
		if _, err := claimAt(t, a, "10.0.0.1", p.dev); err != nil {
			t.Fatal(err)
		}
	}
	_, err := claimAt(t, a, "10.0.0.1", p.dev)
	var rl *RateLimitError
	if !errors.As(err, &rl) || !errors.Is(err, ErrRateLimited) || rl.Scope != "requester" {
		t.Fatalf("4th claim of one requester: %v; want a requester RateLimitError", err)
	}
	if ra := rl.RetryAfter(); ra <= 0 || ra > time.Second {
		t.Fatalf("retry after %v; want within the 1 s a token takes", ra)
	}
	// Other requesters share the device's bucket: 2 more, then the device
	// is over its limit whoever asks: the last-resort bundle, flagged
	// (TestDeviceLimitAnswersLastResort).
	for _, who := range []string{"10.0.0.2", "10.0.0.3"} {
		if _, err := claimAt(t, a, who, p.dev); err != nil {
			t.Fatal(err)
		}
	}
	if r, err := claimAt(t, a, "10.0.0.4", p.dev); err != nil || !r.LastResort {
		t.Fatalf("6th claim of one device: %v (last_resort %v); want the last-resort bundle", err, r.LastResort)
	}
	if got := counter(t, a, "kpnode_claims_total", "outcome", "limited"); got != 1 {
		t.Fatalf("kpnode_claims_total{outcome=limited} = %v, want 1", got)
	}
	counts, _ := a.store.ClaimCounts(context.Background(), p.dev)
	if counts.OneTime != 15 {
		t.Fatalf("%d one-time left; want 15 (limited claims take none)", counts.OneTime)
	}
	// Tokens come back with time.
	c.clock.Advance(time.Second)
	if _, err := claimAt(t, a, "10.0.0.1", p.dev); err != nil {
		t.Fatalf("after a second: %v", err)
	}
	// Over fetch, the peer is the requester: RATE_LIMITED with a retry.
	b := c.add(2, true, nil)
	for range 3 {
		if _, _, _, err := b.svc.cfg.Client.Claim(context.Background(), a.id, newPool(t, c.clock, 57, 0).dev, 0, false); err != nil && !errors.Is(err, fetch.ErrNoRecord) {
			t.Fatal(err)
		}
	}
	_, _, _, err = b.svc.cfg.Client.Claim(context.Background(), a.id, p.dev, 0, false)
	var frl *fetch.RateLimitError
	if !errors.As(err, &frl) || frl.RetryAfter() <= 0 || frl.RetryAfter() > time.Second {
		t.Fatalf("4th fetch claim of one peer: %v; want RATE_LIMITED with a retry within 1 s", err)
	}
	// A light node relays the holder's refusal as its own.
	if _, err := claimAt(t, b, "client", p.dev); !errors.As(err, &rl) || rl.Scope != "holder" {
		t.Fatalf("claim through a limiting holder: %v; want a holder RateLimitError", err)
	}
	// A flood of requesters costs a bounded map.
	for i := range 100 {
		_, _ = claimAt(t, a, string(rune('a'+i)), protocol.Key{byte(i)})
	}
	if n := a.svc.requesters.len(); n > 16 {
		t.Fatalf("the requester limiter remembers %d keys, over its 16", n)
	}
}

// A node signs no more claim notices than its sign budget, all devices
// together (what peers accept from one origin on gossip): past it a claim
// is rate limited with scope node, and no notice is signed.
func TestSignBudget(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, func(cfg *Config) { cfg.SignRate, cfg.SignBurst = 1, 4 })
	c.agree()
	var devs []*pool
	for i := range 5 {
		p := newPool(t, c.clock, byte(80+i), 1)
		p.storeIn(t, a)
		devs = append(devs, p)
	}
	for _, p := range devs[:4] {
		if _, err := claimAt(t, a, "client", p.dev); err != nil {
			t.Fatal(err)
		}
	}
	var rl *RateLimitError
	if _, err := claimAt(t, a, "client", devs[4].dev); !errors.As(err, &rl) || rl.Scope != "node" {
		t.Fatalf("5th claim over a sign burst of 4: %v; want a node RateLimitError", err)
	}
	if got := a.gossip.published.Load(); got != 4 {
		t.Fatalf("published %d claim notices, want 4", got)
	}
}

// A light node (holding no shard) claims through holders it finds: the
// holder runs the claim, the light node validates the bundle; counts come
// from the holder; with no holder reachable the claim is unavailable.
func TestLightNodeClaimsThroughHolder(t *testing.T) {
	c := newCluster(t)
	h := c.add(1, false, nil)
	c.agree()
	l := c.add(2, true, nil)
	p := newPool(t, c.clock, 58, 3)
	p.storeIn(t, h)
	seen := map[protocol.Ref]bool{}
	for i := range 3 {
		r := mustClaim(t, l, p.dev)
		if r.LastResort || !p.isOneTime(r.Bundle.Ref) || seen[r.Bundle.Ref] {
			t.Fatalf("claim %d through the holder: %s last_resort=%v", i, r.Bundle.Ref, r.LastResort)
		}
		seen[r.Bundle.Ref] = true
	}
	if r := mustClaim(t, l, p.dev); !r.LastResort || r.Bundle.Ref != p.lastResort.Ref {
		t.Fatalf("4th claim through the holder: %s last_resort=%v; want the last resort", r.Bundle.Ref, r.LastResort)
	}
	want, _ := h.store.ClaimCounts(context.Background(), p.dev)
	got, err := l.svc.Count(context.Background(), p.dev)
	if err != nil || got != want || got.LastResortHandedOut != 1 {
		t.Fatalf("count through the holder: %+v, %v; want the holder's %+v", got, err, want)
	}
	if _, err := claimAt(t, l, "client", newPool(t, c.clock, 59, 0).dev); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("claim of a device the holder lacks: %v; want storage.ErrNotFound", err)
	}
	l.pipes.Handle(h.id, nil)
	if _, err := claimAt(t, l, "client", p.dev); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("claim with no holder reachable: %v; want ErrUnavailable", err)
	}
	if _, err := l.svc.Count(context.Background(), p.dev); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("count with no holder reachable: %v; want ErrUnavailable", err)
	}
}

// Concurrent claims of one device at two holders with the same view never
// hand out one ref twice, with or without gossip between them.
func TestConcurrentClaimsNeverShareARef(t *testing.T) {
	for _, gossip := range []bool{false, true} {
		c := newCluster(t)
		a, b := c.add(1, false, nil), c.add(2, false, nil)
		a.gossip.on, b.gossip.on = gossip, gossip
		c.agree()
		p := newPool(t, c.clock, 60, 40)
		p.storeIn(t, a, b)
		var mu sync.Mutex
		handed := map[protocol.Ref]int{}
		lastResort := 0
		var wg sync.WaitGroup
		for w := range 8 {
			n := []*testNode{a, b}[w%2]
			wg.Go(func() {
				for range 6 {
					r, err := claimAt(t, n, "client", p.dev)
					if err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					if r.LastResort {
						lastResort++
					} else {
						handed[r.Bundle.Ref]++
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		for ref, k := range handed {
			if k > 1 {
				t.Errorf("gossip=%v: ref %s handed out %d times", gossip, ref, k)
			}
		}
		if len(handed) != 40 || lastResort != 8 {
			t.Errorf("gossip=%v: %d one-time refs and %d last-resort hand-outs; want 40 and 8", gossip, len(handed), lastResort)
		}
		for _, n := range []*testNode{a, b} {
			if got := counter(t, n, "kpnode_claim_owner_fallbacks_total"); got != 0 {
				t.Errorf("gossip=%v: %s fell back %v times", gossip, n.id, got)
			}
		}
	}
}

// Config: defaults fill zero limits and timeouts; missing parts, a key of
// the wrong size, negative rates and empty limiters are refused.
func TestConfigValidate(t *testing.T) {
	c := newCluster(t)
	n := c.add(1, false, nil)
	good := n.svc.cfg
	good.RequesterRate, good.RequesterBurst, good.DeviceRate, good.DeviceBurst = 0, 0, 0, 0
	good.OwnerTimeout, good.HolderTimeout, good.MaxRequesters, good.MaxDevices = 0, 0, 0, 0
	if err := good.Validate(); err != nil {
		t.Fatalf("zero limits take the defaults: %v", err)
	}
	d := good.withDefaults()
	if d.RequesterRate != DefaultRequesterRate || d.RequesterBurst != DefaultRequesterBurst || d.DeviceRate != DefaultDeviceRate ||
		d.DeviceBurst != DefaultDeviceBurst || d.OwnerTimeout != DefaultOwnerTimeout || d.HolderTimeout != DefaultHolderTimeout {
		t.Fatalf("defaults %+v", d)
	}
	for name, mutate := range map[string]func(*Config){
		"no store":      func(c *Config) { c.Store = nil },
		"no client":     func(c *Config) { c.Client = nil },
		"no publisher":  func(c *Config) { c.Publisher = nil },
		"no self":       func(c *Config) { c.Self = "" },
		"short key":     func(c *Config) { c.Key = c.Key[:32] },
		"negative rate": func(c *Config) { c.DeviceRate = -1 },
		"negative sign": func(c *Config) { c.SignRate = -1 },
		"negative size": func(c *Config) { c.MaxDevices = -1 },
		"no shards":     func(c *Config) { c.Shards = protocol.ShardSet{} },
	} {
		bad := good
		mutate(&bad)
		if err := bad.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// An owner that takes the request and never answers costs the claim one
// owner timeout, then the holder falls back.
func TestStallingOwnerCostsOneTimeout(t *testing.T) {
	const timeout = 100 * time.Millisecond
	c := newCluster(t)
	a, b := c.add(1, false, func(cfg *Config) { cfg.OwnerTimeout = timeout }), c.add(2, false, nil)
	hs := c.agree()
	p := newPool(t, c.clock, 61, 12)
	p.storeIn(t, a)
	// a's own refs go first; claim them.
	for _, bd := range p.oneTime {
		if Owner(hs, bd.Ref) == a.id {
			mustClaim(t, a, p.dev)
		}
	}
	release := make(chan struct{})
	defer close(release)
	a.pipes.Handle(b.id, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		<-release
	})
	start := time.Now()
	r := mustClaim(t, a, p.dev)
	d := time.Since(start)
	if Owner(hs, r.Bundle.Ref) != b.id || r.LastResort {
		t.Fatalf("handed out %s (last_resort=%v); want one of b's, by fallback", r.Bundle.Ref, r.LastResort)
	}
	if d < timeout || d > 10*timeout {
		t.Fatalf("the claim took %v; want about the %v owner timeout", d, timeout)
	}
	if got := counter(t, a, "kpnode_claim_owner_fallbacks_total"); got != 1 {
		t.Fatalf("fallbacks %v, want 1", got)
	}
}

// A claim over the device's limit alone (its requester within its own)
// gets the device's last-resort bundle, flagged, not 429, so requesters
// that keep a device's bucket empty never lock out an honest one adding
// the device; with no last-resort bundle it is 429 (scope device). A
// requester over its own limit is 429 whatever the device has. Nothing
// one-time is handed out over the device limit.
func TestDeviceLimitAnswersLastResort(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, func(cfg *Config) {
		cfg.RequesterRate, cfg.RequesterBurst = 0.001, 2
		cfg.DeviceRate, cfg.DeviceBurst = 0.001, 2
	})
	c.agree()
	p := newPool(t, c.clock, 58, 10)
	p.storeIn(t, a)
	// An attacker spends the device's bucket from many addresses.
	for _, who := range []string{"evil-1", "evil-2"} {
		if r, err := claimAt(t, a, who, p.dev); err != nil || r.LastResort {
			t.Fatalf("claim within the limits: %v (last_resort %v)", err, r.LastResort)
		}
	}
	// The honest requester, within its own limit, gets the last resort.
	r, err := claimAt(t, a, "honest", p.dev)
	if err != nil || !r.LastResort || r.Bundle.Ref != p.lastResort.Ref {
		t.Fatalf("claim over the device limit only: %v (%+v); want the last-resort bundle, flagged", err, r)
	}
	if r.Notice == nil {
		t.Fatal("no claim notice for the requester with the last-resort hand-out")
	}
	// Over the device limit the hand-out is neither recorded nor gossiped:
	// a notice per such claim would let anyone push this node past the
	// per-origin notice limit its peers apply.
	if cnt, _ := a.store.ClaimCounts(t.Context(), p.dev); cnt.OneTime != 8 || cnt.LastResortHandedOut != 0 {
		t.Fatalf("counts %+v; want 8 one-time left and no recorded last-resort hand-out", cnt)
	}
	if got := counter(t, a, "kpnode_claims_total", "outcome", "last_resort"); got != 1 {
		t.Fatalf("kpnode_claims_total{outcome=last_resort} = %v, want 1", got)
	}
	// A requester over its own limit is refused, device limit or not.
	var rl *RateLimitError
	_, _ = claimAt(t, a, "honest", p.dev) // its 2nd token
	if _, err := claimAt(t, a, "honest", p.dev); !errors.As(err, &rl) || rl.Scope != "requester" {
		t.Fatalf("3rd claim of one requester: %v; want a requester RateLimitError", err)
	}
	// A device without a last-resort bundle: 429.
	q := newPool(t, c.clock, 59, 4)
	for _, b := range q.oneTime {
		cp := *b
		if _, err := a.store.PutBundle(t.Context(), &cp); err != nil {
			t.Fatal(err)
		}
	}
	for _, who := range []string{"evil-3", "evil-4"} {
		if _, err := claimAt(t, a, who, q.dev); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := claimAt(t, a, "honest-2", q.dev); !errors.As(err, &rl) || rl.Scope != "device" || rl.RetryAfter() <= 0 {
		t.Fatalf("claim over the device limit, no last resort: %v; want a device RateLimitError", err)
	}
}

// At a node that does not hold the device's shard, a claim over the
// device's limit alone gets the device's last-resort bundle from a holder
// (its latest bundle, when that is a last-resort one), flagged; 429 when
// the device has none.
func TestDeviceLimitAnswersLastResortThroughHolder(t *testing.T) {
	c := newCluster(t)
	h := c.add(1, false, nil)
	c.agree()
	l := c.add(2, true, func(cfg *Config) { cfg.DeviceRate, cfg.DeviceBurst = 0.001, 1 })
	p := newPool(t, c.clock, 69, 3)
	p.storeIn(t, h)
	c.lastResort.Store(p.lastResort.Ref, true)
	if r, err := claimAt(t, l, "evil", p.dev); err != nil || r.LastResort {
		t.Fatalf("claim within the limits: %v (last_resort %v)", err, r.LastResort)
	}
	r, err := claimAt(t, l, "honest", p.dev)
	if err != nil || !r.LastResort || r.Bundle.Ref != p.lastResort.Ref {
		t.Fatalf("claim over the device limit at a light node: %v (%+v); want the last-resort bundle, flagged", err, r)
	}
	if cnt, _ := h.store.ClaimCounts(t.Context(), p.dev); cnt.OneTime != 2 {
		t.Fatalf("holder counts %+v; want 2 one-time left", cnt)
	}
	q := newPool(t, c.clock, 70, 2)
	for _, b := range q.oneTime {
		cp := *b
		if _, err := h.store.PutBundle(t.Context(), &cp); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := claimAt(t, l, "evil", q.dev); err != nil {
		t.Fatal(err)
	}
	var rl *RateLimitError
	if _, err := claimAt(t, l, "honest", q.dev); !errors.As(err, &rl) || rl.Scope != "device" {
		t.Fatalf("over the device limit, no last resort: %v; want a device RateLimitError", err)
	}
}
