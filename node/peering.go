package node

import (
	"context"
	"sync"
	"time"

	"github.com/kpnode/kpnode/node/internal/pause"
)

// Shard peering. Gossip and sync run only between connected peers, and in a
// network larger than a node's connections the holders of a shard are not
// neighbours by chance (the 250- and 1,000-node simulations of cmd/kpsim
// showed shards whose holders never met). So a full node keeps at least
// minShardPeers peers in the topics of every shard it holds, dialling
// holders it finds through the DHT's provider records; and the outbox dials
// holders of a shard it must publish to and has no peer in (a light node's
// case). A shard with some peers is searched every peeringInterval, one with
// none every urgentPeeringWait; each time a search connects nobody its wait
// doubles, up to maxPeeringWait (in a small network every holder is already
// a neighbour; a lone holder has nobody to find), and a search that connects
// someone resets it.
const (
	minShardPeers   = 4
	peeringInterval = 30 * time.Second
	maxPeeringWait  = 10 * time.Minute
	// urgentPeeringWait is the least time between two searches for a shard
	// the node has no peer in at all (it rejoined, or its peers left).
	urgentPeeringWait = 5 * time.Second
	// outboxDialHolders is how many holders the outbox dials for a shard it
	// has no peer in.
	outboxDialHolders = 2
)

// shardPeering remembers, per shard, when holders were last looked up,
// how long to wait before the next look (one backoff for a shard with too
// few peers, one for a shard with none), and whether a look is running. It
// paces on the wall clock, not Config.Now (a validation clock tests freeze).
type shardPeering struct {
	mu     sync.Mutex
	last   map[int]time.Time
	wait   map[int]time.Duration
	urgent map[int]time.Duration
	busy   map[int]bool
}

// begin reports whether a holder search for shard may start now, and marks
// it running. An urgent search (the node has no peer at all in the shard's
// topics) follows its own backoff, which starts at urgentPeeringWait.
func (p *shardPeering) begin(shard int, now time.Time, urgent bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.last == nil {
		p.last, p.wait, p.urgent, p.busy = map[int]time.Time{}, map[int]time.Duration{}, map[int]time.Duration{}, map[int]bool{}
	}
	wait := p.wait[shard]
	if urgent {
		wait = p.urgent[shard]
	}
	if last, ok := p.last[shard]; p.busy[shard] || (ok && now.Before(last.Add(wait))) {
		return false
	}
	p.busy[shard] = true
	return true
}

// end records a finished search. A search that connected someone resets
// both backoffs (peeringInterval, urgentPeeringWait); one that did not
// doubles the backoff of its kind, up to maxPeeringWait, so a node that is
// the only reachable holder of a shard asks the DHT ever less often.
func (p *shardPeering) end(shard int, now time.Time, urgent bool, connected int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	backoff := func(w, first time.Duration) time.Duration {
		if connected > 0 || w == 0 {
			return first
		}
		return min(2*w, maxPeeringWait)
	}
	if urgent {
		p.urgent[shard] = backoff(p.urgent[shard], urgentPeeringWait)
	} else {
		p.wait[shard] = backoff(p.wait[shard], peeringInterval)
	}
	if connected > 0 {
		p.wait[shard], p.urgent[shard] = peeringInterval, urgentPeeringWait
	}
	p.last[shard], p.busy[shard] = now, false
}

// settled records that shard has peers again: the next time it has none,
// the urgent backoff starts over.
func (p *shardPeering) settled(shard int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.urgent != nil {
		delete(p.urgent, shard)
	}
}

// dialShardHolders connects up to want holders of shard, unless a search
// for it ran recently or is running.
func (n *Node) dialShardHolders(ctx context.Context, shard, want int, urgent bool) int {
	if n.dht == nil || !n.peering.begin(shard, time.Now(), urgent) {
		return 0
	}
	return n.searchShardHolders(ctx, shard, want, urgent)
}

// searchShardHolders runs a search begin allowed, and records its end.
func (n *Node) searchShardHolders(ctx context.Context, shard, want int, urgent bool) int {
	k := n.dht.ConnectHolders(ctx, shard, want)
	n.peering.end(shard, time.Now(), urgent, k)
	if k > 0 {
		n.log.Debug("connected holders of a shard", "shard", shard, "count", k)
	}
	return k
}

// peeringLoop keeps minShardPeers peers in every held shard's topics.
func (n *Node) peeringLoop(ctx context.Context) {
	if n.cfg.Shards.Empty() || n.gossip == nil || n.dht == nil {
		return
	}
	// Look every urgentPeeringWait; each shard is searched when its
	// backoff allows.
	for pause.For(ctx, urgentPeeringWait) {
		if n.dht.RoutingTableSize() == 0 {
			continue
		}
		for _, s := range n.cfg.Shards.List() {
			have := n.gossip.TopicPeers(s)
			if have > 0 {
				n.peering.settled(s)
			}
			if have < minShardPeers {
				n.dialShardHolders(ctx, s, minShardPeers-have, have == 0)
			}
			if ctx.Err() != nil {
				return
			}
		}
	}
}

// outboxNeedsHolders starts a search for holders of shard in the
// background (the outbox found no peer in its topic); the topic watcher
// wakes the outbox once one joins.
func (n *Node) outboxNeedsHolders(shard int) {
	// Pace first, so an outbox round starts no goroutine for a shard whose
	// search ran moments ago.
	if n.dht == nil || !n.peering.begin(shard, time.Now(), true) {
		return
	}
	if !n.goTracked(func(ctx context.Context) { n.searchShardHolders(ctx, shard, outboxDialHolders, true) }) {
		n.peering.end(shard, time.Now(), true, 0) // closing: no search ran
	}
}
