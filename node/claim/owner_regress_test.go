package claim

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// An owner request of a holder (a peer in the owner's topic) is not
// charged to the owner's per-requester bucket for that peer: an owner
// whose requester limit is spent still answers it, with proof of the refs
// it handed out itself, so the holder hands out none of them again (it
// used to fall back on RATE_LIMITED and take the owner's oldest refs, the
// ones the owner had just handed out).
func TestOwnerRequestOfHolderNotRateLimited(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, nil)
	// b: the owner, its per-requester bucket all but empty.
	b := c.add(2, false, func(cfg *Config) { cfg.RequesterRate, cfg.RequesterBurst = 0.001, 1 })
	hs := c.agree()
	p := newPool(t, c.clock, 60, 8)
	q := newPool(t, c.clock, 61, 8)
	p.storeIn(t, a, b)
	q.storeIn(t, a, b)
	// b hands out all it owns of p to its own clients; a has not heard yet.
	byB := map[protocol.Ref]bool{}
	for _, bd := range p.oneTime {
		if Owner(hs, bd.Ref) == b.id {
			r, err := claimAt(t, b, "bclient-"+bd.Ref.String(), p.dev)
			if err != nil {
				t.Fatal(err)
			}
			byB[r.Bundle.Ref] = true
		}
	}
	if len(byB) == 0 {
		t.Fatal("b owns none of p; the test needs some")
	}
	// a's other traffic (claims of q) asks b as an owner, more than b's
	// requester burst would allow.
	for range q.oneTime {
		if _, err := claimAt(t, a, "qclient", q.dev); err != nil {
			t.Fatal(err)
		}
	}
	if got := counter(t, b, "kpnode_claims_total", "outcome", "limited"); got != 0 {
		t.Fatalf("b refused %v owner requests of a holder as over a limit", got)
	}
	// a's clients claim p: a's own refs, then none of b's (b proves them
	// taken), then the last resort.
	for i := 0; i < len(p.oneTime)+1; i++ {
		r, err := claimAt(t, a, "client2", p.dev)
		if err != nil {
			t.Fatal(err)
		}
		if byB[r.Bundle.Ref] {
			t.Fatalf("claim %d at a: ref %s was already handed out by its owner b (fallbacks %v)",
				i, r.Bundle.Ref, counter(t, a, "kpnode_claim_owner_fallbacks_total"))
		}
		if r.LastResort {
			break
		}
	}
	if got := counter(t, a, "kpnode_claim_owner_fallbacks_total"); got != 0 {
		t.Fatalf("fallbacks %v, want 0", got)
	}
}

// Views that differ (a sees {a,b}; b also sees c, to which a is not
// connected) do not starve a pool: b tries exactly the refs a names, so a
// hands out every one-time bundle before the last resort (b used to answer
// NOT_FOUND for refs it thought c owned, and a believed it).
func TestDivergentViewsDoNotStarvePool(t *testing.T) {
	c := newCluster(t)
	a, b, cc := c.add(1, false, nil), c.add(2, false, nil), c.add(3, false, nil)
	a.view.holders = []peer.ID{a.id, b.id}
	b.view.holders = []peer.ID{a.id, b.id, cc.id}
	cc.view.holders = []peer.ID{b.id, cc.id}
	p := newPool(t, c.clock, 62, 16)
	p.storeIn(t, a, b, cc)
	seen := map[protocol.Ref]bool{}
	for i := range p.oneTime {
		r := mustClaim(t, a, p.dev)
		if r.LastResort || seen[r.Bundle.Ref] {
			cnt, _ := a.store.ClaimCounts(t.Context(), p.dev)
			t.Fatalf("claim %d at a: %s last_resort=%v after %d one-time bundles; a's own count says %d one-time left",
				i, r.Bundle.Ref, r.LastResort, len(seen), cnt.OneTime)
		}
		seen[r.Bundle.Ref] = true
	}
	if r := mustClaim(t, a, p.dev); !r.LastResort {
		t.Fatalf("after the pool: %s, not the last resort", r.Bundle.Ref)
	}
	if got := counter(t, a, "kpnode_claim_owner_fallbacks_total"); got != 0 {
		t.Fatalf("fallbacks %v, want 0 (b was up and answered)", got)
	}
}

// An owner's answer for a ref already claimed here under another notice
// is not handed out again: a ref a took over by fallback while b was
// unreachable is not handed out a second time when b, back and unaware
// (gossip lost), hands it to a.
func TestOwnerAnswerForRefAlreadyClaimedHere(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, func(cfg *Config) { cfg.OwnerTimeout = 200 * time.Millisecond })
	b := c.add(2, false, nil)
	hs := c.agree()
	p := newPool(t, c.clock, 63, 8)
	p.storeIn(t, a, b)
	ownA := 0
	for _, bd := range p.oneTime {
		if Owner(hs, bd.Ref) == a.id {
			ownA++
		}
	}
	if ownA == len(p.oneTime) {
		t.Skip("b owns nothing")
	}
	a.pipes.Handle(b.id, nil) // b unreachable
	seen := map[protocol.Ref]int{}
	for range ownA + 1 {
		seen[mustClaim(t, a, p.dev).Bundle.Ref]++
	}
	a.pipes.Handle(b.id, b.handler()) // b is back; it never heard of a's fallback claim
	r := mustClaim(t, a, p.dev)
	seen[r.Bundle.Ref]++
	if seen[r.Bundle.Ref] > 1 {
		t.Errorf("a handed out %s twice: once by fallback, then again as b's owner answer (a's store held the claim)", r.Bundle.Ref)
	}
}

// The check itself: an owner's answer naming a ref that was claimed here
// between reading the candidates and the answer (a concurrent fallback)
// is refused whether the owner's notice wins the store (Refreshed) or
// loses (Duplicate): the owner counts as failed and the claim goes on
// with another ref.
func TestOwnerAnswerRefusedWhenClaimedHereMeanwhile(t *testing.T) {
	for _, tc := range []struct {
		name  string
		shift time.Duration // of the owner's notice against this node's
	}{{"owner notice wins", -time.Second}, {"owner notice loses", time.Second}} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t)
			a := c.add(1, false, nil)
			liarKey, _, liar := nodeIdentity(t, 9)
			a.view.holders = []peer.ID{a.id, liar}
			p := newPool(t, c.clock, 65, 8)
			p.storeIn(t, a)
			byRef := map[protocol.Ref]*pb.Bundle{}
			for _, bd := range p.oneTime {
				byRef[bd.Ref] = pb.FromBundle(&bd.Bundle)
			}
			var raced protocol.Ref
			a.pipes.Handle(liar, func(s network.Stream, _ peer.ID) {
				defer s.Close()
				var req pb.FetchRequest
				if err := pbio.NewDelimitedReader(s, fetch.MaxRequest).ReadMsg(&req); err != nil || len(req.Refs) == 0 {
					return
				}
				raced = protocol.Ref(req.Refs[0])
				now := c.clock.Now()
				mine := protocol.SignClaim(a.key, uint64(now.UnixMilli()), p.dev, raced)
				if _, _, err := a.ing.IngestClaim(context.Background(), &mine, ingest.SourceHTTP); err != nil {
					t.Error(err)
				}
				theirs := protocol.SignClaim(liarKey, uint64(now.Add(tc.shift).UnixMilli()), p.dev, raced)
				_ = pbio.NewDelimitedWriter(s).WriteMsg(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK,
					Bundles: []*pb.Bundle{byRef[raced]}, Claim: pb.FromClaim(&theirs)})
			})
			for range p.oneTime {
				r := mustClaim(t, a, p.dev)
				if raced != (protocol.Ref{}) {
					if r.Bundle.Ref == raced {
						t.Fatalf("a handed out %s, claimed here meanwhile, as the owner's answer", raced)
					}
					if r.LastResort {
						t.Fatal("last resort while the owner's other refs were free")
					}
					return
				}
			}
			t.Fatal("a never asked the owner")
		})
	}
}

// An owner that is alive but busy (BUSY, RATE_LIMITED) keeps its refs:
// the holder does not take them over (the owner may be handing them out),
// it answers the last resort; the fallback is for owners that fail.
func TestBusyOwnerIsNoFallback(t *testing.T) {
	for _, st := range []pb.FetchResponse_Status{pb.FetchResponse_STATUS_BUSY, pb.FetchResponse_STATUS_RATE_LIMITED} {
		t.Run(st.String(), func(t *testing.T) {
			c := newCluster(t)
			a := c.add(1, false, nil)
			_, _, busy := nodeIdentity(t, 9)
			a.view.holders = []peer.ID{a.id, busy}
			asked := 0
			a.pipes.Handle(busy, func(s network.Stream, _ peer.ID) {
				defer s.Close()
				var req pb.FetchRequest
				if err := pbio.NewDelimitedReader(s, fetch.MaxRequest).ReadMsg(&req); err != nil {
					return
				}
				asked++
				_ = pbio.NewDelimitedWriter(s).WriteMsg(&pb.FetchResponse{Status: st, RetryAfterMs: 100})
			})
			p := newPool(t, c.clock, 66, 12)
			p.storeIn(t, a)
			ownA := 0
			for _, bd := range p.oneTime {
				if Owner(a.view.holders, bd.Ref) == a.id {
					ownA++
				}
			}
			if ownA == len(p.oneTime) {
				t.Skip("the busy owner owns nothing")
			}
			for i := range ownA {
				if r := mustClaim(t, a, p.dev); r.LastResort || Owner(a.view.holders, r.Bundle.Ref) != a.id {
					t.Fatalf("claim %d: %s last_resort=%v; want a's own refs first", i, r.Bundle.Ref, r.LastResort)
				}
			}
			if r := mustClaim(t, a, p.dev); !r.LastResort {
				t.Fatalf("a handed out the busy owner's ref %s; want the last resort", r.Bundle.Ref)
			}
			if asked != 1 {
				t.Fatalf("the busy owner was asked %d times, want 1", asked)
			}
			if got := counter(t, a, "kpnode_claim_owner_fallbacks_total"); got != 0 {
				t.Fatalf("fallbacks %v, want 0", got)
			}
		})
	}
}

// An owner that proves every ref it was asked for taken is asked for its
// next refs (within the requests a claim may make), so a holder whose view
// lags the owner's hand-outs by more than one request's refs still gets a
// one-time bundle.
func TestOwnerAskedForNextRefsAfterProof(t *testing.T) {
	c := newCluster(t)
	a, b := c.add(1, false, nil), c.add(2, false, nil)
	hs := c.agree()
	p := newPool(t, c.clock, 67, 56)
	p.storeIn(t, a, b)
	var ofB []protocol.Ref
	for _, bd := range p.oneTime {
		if Owner(hs, bd.Ref) == b.id {
			ofB = append(ofB, bd.Ref)
		}
	}
	if len(ofB) <= fetch.MaxOwnerRefs+1 {
		t.Skipf("b owns %d refs; the test needs more than %d", len(ofB), fetch.MaxOwnerRefs+1)
	}
	// b hands out all but its last ref to its own clients; a never hears.
	for range len(ofB) - 1 {
		mustClaim(t, b, p.dev)
	}
	for range len(p.oneTime) - len(ofB) {
		mustClaim(t, a, p.dev) // a's own
	}
	r := mustClaim(t, a, p.dev)
	if r.LastResort || r.Bundle.Ref != ofB[len(ofB)-1] {
		t.Fatalf("a handed out %s (last_resort=%v); want b's last free ref %s", r.Bundle.Ref, r.LastResort, ofB[len(ofB)-1])
	}
}

// An owner request of a peer that is not a holder in this node's view is
// charged like any claim, to the peer's requester bucket.
func TestOwnerRequestOfNonHolderIsCharged(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, func(cfg *Config) { cfg.RequesterRate, cfg.RequesterBurst = 0.001, 1 })
	b := c.add(2, false, nil)
	a.view.holders = []peer.ID{a.id} // b is not in a's topic
	p := newPool(t, c.clock, 68, 4)
	p.storeIn(t, a)
	refs := []protocol.Ref{p.oneTime[0].Ref}
	if _, err := b.svc.cfg.Client.OwnerClaim(t.Context(), a.id, p.dev, 0, refs); err != nil {
		t.Fatal(err)
	}
	refs = []protocol.Ref{p.oneTime[1].Ref}
	if _, err := b.svc.cfg.Client.OwnerClaim(t.Context(), a.id, p.dev, 0, refs); !errors.Is(err, fetch.ErrRateLimited) {
		t.Fatalf("2nd owner request of a non-holder over a requester burst of 1: %v; want RATE_LIMITED", err)
	}
	a.view.mu.Lock()
	a.view.holders = []peer.ID{a.id, b.id}
	a.view.mu.Unlock()
	if _, err := b.svc.cfg.Client.OwnerClaim(t.Context(), a.id, p.dev, 0, refs); err != nil {
		t.Fatalf("owner request of a holder: %v; want its own budget", err)
	}
}

// An owner that keeps answering BUSY or RATE_LIMITED is believed only a few
// times (busyBurst, refilled slowly): after that its refs are taken over as
// a failed owner's, so a subscriber cannot withhold the refs it owns by
// claiming to be busy.
func TestOwnerAlwaysBusyIsTakenOver(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, nil)
	_, _, busy := nodeIdentity(t, 9)
	a.view.holders = []peer.ID{a.id, busy}
	a.pipes.Handle(busy, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		var req pb.FetchRequest
		if err := pbio.NewDelimitedReader(s, fetch.MaxRequest).ReadMsg(&req); err != nil {
			return
		}
		_ = pbio.NewDelimitedWriter(s).WriteMsg(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_RATE_LIMITED, RetryAfterMs: 100})
	})
	p := newPool(t, c.clock, 66, 12)
	p.storeIn(t, a)
	ownA := 0
	for _, bd := range p.oneTime {
		if Owner(a.view.holders, bd.Ref) == a.id {
			ownA++
		}
	}
	if ownA == len(p.oneTime) {
		t.Skip("the busy owner owns nothing")
	}
	for range ownA {
		mustClaim(t, a, p.dev)
	}
	for i := range busyBurst {
		if r := mustClaim(t, a, p.dev); !r.LastResort {
			t.Fatalf("busy answer %d: a took over the owner's ref %s; want the last resort while it is believed", i, r.Bundle.Ref)
		}
	}
	r := mustClaim(t, a, p.dev)
	if r.LastResort || Owner(a.view.holders, r.Bundle.Ref) != busy {
		t.Fatalf("after %d busy answers a handed out %s (last_resort=%v); want one of the busy owner's refs", busyBurst, r.Bundle.Ref, r.LastResort)
	}
	if got := counter(t, a, "kpnode_claim_owner_fallbacks_total"); got != 1 {
		t.Fatalf("fallbacks %v, want 1", got)
	}
}

// One holder's owner requests for one device are bounded at the device's
// rate with a burst of ownerDeviceBurst, so a subscriber cannot drain a
// pool through owner requests at the owner budget's pace.
func TestOwnerRequestsPerDeviceBounded(t *testing.T) {
	c := newCluster(t)
	b := c.add(2, false, func(cfg *Config) { cfg.DeviceRate = 0.001 })
	_, _, asker := nodeIdentity(t, 8)
	b.view.holders = []peer.ID{b.id, asker}
	p := newPool(t, c.clock, 67, 1)
	p.storeIn(t, b)
	limited := 0
	for range ownerDeviceBurst + 10 {
		_, err := b.svc.Claim(t.Context(), Request{Device: p.dev, OwnedOnly: true, Peer: asker, Requester: "peer:" + asker.String(), Source: ingest.SourceFetch})
		var rl *RateLimitError
		if errors.As(err, &rl) {
			limited++
		}
	}
	if limited != 10 {
		t.Fatalf("%d of %d owner requests of one holder for one device were limited, want 10", limited, ownerDeviceBurst+10)
	}
}
