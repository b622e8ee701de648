package claim

import (
	"testing"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/protocol/pb"
)

// A subscriber of kp/{shard} (an owner in the holders' view) that holds
// nothing and answers every owner request NOT_FOUND, with no proof that
// the refs are taken, cannot withhold them: the holder treats it as failed
// and hands its refs out by fallback, so every one-time bundle goes out
// before the last resort.
func TestSubscriberAnsweringNotFoundCannotWithholdPool(t *testing.T) {
	c := newCluster(t)
	a := c.add(1, false, nil)
	_, _, sybil := nodeIdentity(t, 9)
	a.pipes.Handle(sybil, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		var req pb.FetchRequest
		if err := pbio.NewDelimitedReader(s, fetch.MaxRequest).ReadMsg(&req); err != nil {
			return
		}
		_ = pbio.NewDelimitedWriter(s).WriteMsg(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND})
	})
	a.view.holders = []peer.ID{a.id, sybil}
	p := newPool(t, c.clock, 64, 20)
	p.storeIn(t, a)
	for i := range len(p.oneTime) {
		r := mustClaim(t, a, p.dev)
		if r.LastResort {
			cnt, _ := a.store.ClaimCounts(t.Context(), p.dev)
			t.Fatalf("claim %d: last resort while a (the only real holder) counts %d one-time bundles unclaimed", i, cnt.OneTime)
		}
	}
	if r := mustClaim(t, a, p.dev); !r.LastResort {
		t.Fatalf("after the pool: %s, not the last resort", r.Bundle.Ref)
	}
}
