package node

import (
	"context"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"

	kpsync "github.com/kpnode/kpnode/node/sync"
	"github.com/kpnode/kpnode/protocol"
)

// DefaultSyncInterval is how often a node reconciles each shard it holds
// with a random peer that holds it too.
const DefaultSyncInterval = kpsync.DefaultInterval

// startSync wires the sync service: the node's store is its set, the
// ingest path and the peer guard its ingester and penalizer, the gossip
// service (the peers of a shard's bundle topic) the holders it picks from.
// Gossip must have started.
func startSync(ctx context.Context, n *Node, h host.Host) (*kpsync.Service, error) {
	cfg := kpsync.DefaultConfig()
	cfg.Protocol = p2pprotocol.ID(protocol.SyncProtocol(n.netID))
	cfg.Shards = n.cfg.Shards
	cfg.MLS = n.cfg.Policy.MLS
	cfg.Interval = n.cfg.SyncInterval
	cfg.RoundTimeout = n.cfg.StreamTimeout
	cfg.Retention = n.cfg.Policy.Retention
	cfg.Now = n.cfg.Now
	cfg.Logger = n.log
	cfg.Registerer = n.registry
	s, err := kpsync.New(cfg, h, n.store, nodeIngester{n}, n.guard, n.gossip)
	if err != nil {
		return nil, err
	}
	if err := s.Start(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// SyncNow reconciles shard's bundle, account and notice sets with peer p
// now and returns how many records it stored (operators' tools and tests).
func (n *Node) SyncNow(ctx context.Context, p peer.ID, shard int) (int, error) {
	return n.sync.SyncNow(ctx, p, shard)
}
