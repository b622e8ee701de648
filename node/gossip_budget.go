package node

import (
	"errors"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Per-peer inbound gossip budget. Each peer has a bucket of message bytes:
// gossipPeerBurst, refilled at gossipPeerRate per second. Every message an
// RPC carries costs its data's length, at least gossipMinCharge (so a
// stream of tiny messages pays for the per-message work: decoding, the
// seen-cache, a signature check). An RPC that does not fit is dropped
// unread, which bounds the bytes a peer can queue in this node; the peer is
// not banned for it, since an honest node forwards whatever the network
// publishes and a burst of valid records (anyone can mint devices and POST
// to some node) would otherwise cut honest forwarders off. What is dropped
// arrives from other mesh peers or through sync. The burst is ten 1,000-bundle bursts of
// real KeyPackages (2.9 KB each) at once, and the rate over a thousand such
// bundles a second for ever, from one peer; honest peers forward at most
// what the network publishes on the topics both hold, which is far below.
const (
	gossipPeerBurst = 32 << 20
	gossipPeerRate  = 4 << 20
	gossipMinCharge = 1 << 10
	// maxBudgetPeers bounds the buckets kept (peers come and go; a peer
	// forgotten starts again with a full bucket).
	maxBudgetPeers = 4096
)

var errGossipBudget = errors.New("gossip: peer over its inbound byte budget")

type bucket struct {
	tokens float64
	last   time.Time
}

// inboundBudget is gossipsub's app-specific RPC inspector. gossipsub calls
// it from its event loop, one RPC at a time; the mutex is for tests.
type inboundBudget struct {
	mu      sync.Mutex
	peers   *simplelru.LRU[peer.ID, *bucket]
	now     func() time.Time
	guard   *peerGuard
	metrics *metrics
}

func newInboundBudget(guard *peerGuard, m *metrics, now func() time.Time) *inboundBudget {
	l, _ := simplelru.NewLRU[peer.ID, *bucket](maxBudgetPeers, nil)
	return &inboundBudget{peers: l, now: now, guard: guard, metrics: m}
}

// charge is what an RPC's messages cost.
func charge(rpc *pubsub.RPC) float64 {
	var n int
	for _, m := range rpc.GetPublish() {
		n += max(len(m.GetData()), gossipMinCharge)
	}
	return float64(n)
}

// inspect takes an RPC's cost from its sender's bucket, or drops the RPC
// when the bucket cannot pay.
func (b *inboundBudget) inspect(from peer.ID, rpc *pubsub.RPC) error {
	cost := charge(rpc)
	if cost == 0 {
		return nil
	}
	b.mu.Lock()
	now := b.now()
	bk, ok := b.peers.Get(from)
	if !ok {
		bk = &bucket{tokens: gossipPeerBurst, last: now}
		b.peers.Add(from, bk)
	}
	bk.tokens = min(gossipPeerBurst, bk.tokens+now.Sub(bk.last).Seconds()*gossipPeerRate)
	bk.last = now
	over := bk.tokens < cost
	if !over {
		bk.tokens -= cost
	}
	b.mu.Unlock()
	if over {
		b.metrics.gossipRPCRefused("inbound_bytes")
		return errGossipBudget
	}
	return nil
}
