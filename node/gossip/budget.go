package gossip

import (
	"errors"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Per-peer inbound gossip budget. Each peer has a bucket of message bytes:
// Config.PeerBurst, refilled at Config.PeerRate per second. Every message
// an RPC carries costs its data's length, at least Config.MinCharge (so a
// stream of tiny messages pays for the per-message work: decoding, the
// seen-cache, a signature check). An RPC that does not fit is dropped
// unread, which bounds the bytes a peer can queue in this node; the peer is
// not banned for it, since an honest node forwards whatever the network
// publishes and a burst of valid records (anyone can mint devices and POST
// to some node) would otherwise cut honest forwarders off. What is dropped
// arrives from other mesh peers or through sync.

// maxBudgetPeers bounds the buckets kept (peers come and go; a peer
// forgotten starts again with a full bucket).
const maxBudgetPeers = 4096

// errBudget is what the inspector answers for an RPC over its sender's
// budget; gossipsub then drops the RPC unread.
var errBudget = errors.New("gossip: peer over its inbound byte budget")

type bucket struct {
	tokens float64
	last   time.Time
}

// inboundBudget is gossipsub's app-specific RPC inspector. gossipsub calls
// it from its event loop, one RPC at a time; the mutex is for tests.
type inboundBudget struct {
	burst, rate, minCharge float64
	mu                     sync.Mutex
	peers                  *simplelru.LRU[peer.ID, *bucket]
	now                    func() time.Time
	metrics                *metrics
}

func newInboundBudget(burst, rate, minCharge int, m *metrics, now func() time.Time) *inboundBudget {
	l, _ := simplelru.NewLRU[peer.ID, *bucket](maxBudgetPeers, nil)
	return &inboundBudget{burst: float64(burst), rate: float64(rate), minCharge: float64(minCharge), peers: l, now: now, metrics: m}
}

// charge is what an RPC's messages cost.
func (b *inboundBudget) charge(rpc *pubsub.RPC) float64 {
	var n float64
	for _, m := range rpc.GetPublish() {
		n += max(float64(len(m.GetData())), b.minCharge)
	}
	return n
}

// inspect takes an RPC's cost from its sender's bucket, or drops the RPC
// when the bucket cannot pay.
func (b *inboundBudget) inspect(from peer.ID, rpc *pubsub.RPC) error {
	cost := b.charge(rpc)
	if cost == 0 {
		return nil
	}
	b.mu.Lock()
	now := b.now()
	bk, ok := b.peers.Get(from)
	if !ok {
		bk = &bucket{tokens: b.burst, last: now}
		b.peers.Add(from, bk)
	}
	bk.tokens = min(b.burst, bk.tokens+max(0, now.Sub(bk.last).Seconds())*b.rate) // a clock that steps back refills nothing
	bk.last = now
	over := bk.tokens < cost
	if !over {
		bk.tokens -= cost
	}
	b.mu.Unlock()
	if over {
		b.metrics.rpcRefused("inbound_bytes")
		return errBudget
	}
	return nil
}
