package node

import (
	"context"
	"sync"
	"time"
)

// Shard peering. Gossip and sync run only between connected peers, and in a
// network larger than a node's connections the holders of a shard are not
// neighbours by chance (the 250- and 1,000-node simulations of cmd/kpsim
// showed shards whose holders never met). So a full node keeps at least
// minShardPeers peers in the topics of every shard it holds, dialling
// holders it finds through the DHT's provider records; and the outbox dials
// holders of a shard it must publish to and has no peer in (a light node's
// case). A shard for which a search connected nobody is searched again
// after twice the wait, up to maxPeeringWait (in a small network every
// holder is already a neighbour and the DHT query is wasted), unless the
// node has lost every peer in it.
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
// how long to wait before the next look, and whether one is running.
type shardPeering struct {
	mu   sync.Mutex
	last map[int]time.Time
	wait map[int]time.Duration
	busy map[int]bool
}

// begin reports whether a holder search for shard may start now, and marks
// it running. An urgent search (the node has no peer at all in the shard's
// topics) waits only urgentPeeringWait since the last one, not the backoff.
func (p *shardPeering) begin(shard int, now time.Time, urgent bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.last == nil {
		p.last, p.wait, p.busy = map[int]time.Time{}, map[int]time.Duration{}, map[int]bool{}
	}
	wait := p.wait[shard]
	if urgent {
		wait = min(wait, urgentPeeringWait)
	}
	if last, ok := p.last[shard]; p.busy[shard] || (ok && now.Before(last.Add(wait))) {
		return false
	}
	p.busy[shard] = true
	return true
}

// end records a finished search: the next one waits peeringInterval after
// a search that connected someone, twice the last wait after one that did
// not (up to maxPeeringWait).
func (p *shardPeering) end(shard int, now time.Time, connected int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	w := peeringInterval
	if connected == 0 && p.wait[shard] > 0 {
		w = min(2*p.wait[shard], maxPeeringWait)
	}
	p.wait[shard], p.last[shard], p.busy[shard] = w, now, false
}

// dialShardHolders connects up to want holders of shard, unless a search
// for it ran recently or is running.
func (n *Node) dialShardHolders(ctx context.Context, shard, want int, urgent bool) int {
	if n.dht == nil || !n.peering.begin(shard, n.cfg.Now(), urgent) {
		return 0
	}
	k := n.dht.ConnectHolders(ctx, shard, want)
	n.peering.end(shard, n.cfg.Now(), k)
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
	// Look every urgentPeeringWait: a shard with some peers is searched
	// only when its backoff allows, one with none at once.
	for sleep(ctx, urgentPeeringWait) {
		if n.dht.RoutingTableSize() == 0 {
			continue
		}
		for _, s := range n.cfg.Shards.List() {
			if have := n.gossip.TopicPeers(s); have < minShardPeers {
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
	n.goTracked(func(ctx context.Context) { n.dialShardHolders(ctx, shard, outboxDialHolders, true) })
}
