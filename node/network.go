package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/kpnode/kpnode/node/discovery"
	"github.com/kpnode/kpnode/node/gossip"
	"github.com/kpnode/kpnode/node/internal/pause"
	"github.com/kpnode/kpnode/protocol"
)

// startNetwork brings up the libp2p host, gossip, fetch and the DHT, and
// starts dialling the bootstrap peers.
func (n *Node) startNetwork(ctx context.Context) error {
	h := n.cfg.Host
	if h == nil {
		var err error
		if h, err = newHost(n.cfg, n.identity, n.guard, n.registry); err != nil {
			return fmt.Errorf("node: %w", err)
		}
	}
	n.host = h
	n.guard.host = h
	if err := n.startFetch(ctx, h); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	var err error
	if n.dht, err = discovery.New(discovery.Config{NetworkID: n.netID, Shards: n.cfg.Shards, Light: n.cfg.Light,
		Logger: n.log.With("component", "dht"), Registerer: n.registry}, h); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if err := n.dht.Start(ctx); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if n.gossip, err = gossip.New(gossip.Config{NetworkID: n.netID, Shards: n.cfg.Shards, Logger: n.log.With("component", "gossip"),
		Registerer: n.registry, PeerScoreInspect: n.cfg.PeerScoreInspect}, h, nodeIngester{n}, n.guard); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if err := n.gossip.Start(ctx); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if n.watch, err = startMismatchWatch(ctx, n, h); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if err := n.startLookup(ctx); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if err := n.startClaim(h); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if n.sync, err = startSync(ctx, n, h); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	n.goTracked(n.bootstrapLoop)
	n.goTracked(n.peeringLoop)
	addrs, _ := n.P2PAddrs()
	n.log.Info("p2p host started", "peer_id", h.ID(), "network", n.netID, "shards", n.cfg.Shards.String(),
		"light", n.cfg.Light, "addrs", addrs)
	return nil
}

// stopNetwork closes what startNetwork started, in reverse order.
func (n *Node) stopNetwork() error {
	var errs []error
	if n.lookup != nil {
		n.lookup.Close()
	}
	if n.watch != nil {
		n.watch.close()
	}
	if n.gossip != nil {
		n.gossip.Close()
	}
	if n.dht != nil {
		if err := n.dht.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if n.fetchServer != nil {
		n.fetchServer.Close()
	}
	if n.sync != nil {
		_ = n.sync.Close()
	}
	if n.host != nil && n.cfg.Host == nil { // an injected host is the caller's to close
		if err := n.host.Close(); err != nil {
			errs = append(errs, fmt.Errorf("host close: %w", err))
		}
	}
	return errors.Join(errs...)
}

// bootstrapLoop dials the bootstrap peers at start and again whenever the
// node has lost all its peers, then refreshes the DHT's routing table.
func (n *Node) bootstrapLoop(ctx context.Context) {
	if len(n.cfg.Bootstrap) == 0 {
		return
	}
	var infos []peer.AddrInfo
	for _, a := range n.cfg.Bootstrap {
		ai, err := peer.AddrInfoFromString(a)
		if err != nil || ai.ID == n.host.ID() {
			continue // validated in Config; a bootstrap node may list itself
		}
		infos = append(infos, *ai)
	}
	if len(infos) == 0 {
		return
	}
	backoff := time.Second
	for {
		if len(n.host.Network().Peers()) == 0 {
			connected := n.dialAll(ctx, infos)
			if connected > 0 {
				if err := n.dht.Bootstrap(ctx); err != nil {
					n.log.Debug("dht bootstrap", "err", err)
				}
				backoff = time.Second
			} else {
				backoff = min(2*backoff, 30*time.Second)
			}
		}
		if !pause.For(ctx, backoff) {
			return
		}
	}
}

func (n *Node) dialAll(ctx context.Context, infos []peer.AddrInfo) int {
	var wg sync.WaitGroup
	var mu sync.Mutex
	connected := 0
	for _, ai := range infos {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			if err := n.host.Connect(dctx, ai); err != nil {
				n.log.Warn("bootstrap dial failed", "peer", ai.ID, "err", err)
				return
			}
			mu.Lock()
			connected++
			mu.Unlock()
			n.log.Info("connected to bootstrap peer", "peer", ai.ID)
		}()
	}
	wg.Wait()
	return connected
}

// PeerID returns the node's libp2p peer ID (valid after Start).
func (n *Node) PeerID() peer.ID { return n.host.ID() }

// P2PAddrs returns the node's full multiaddrs (with /p2p/), the form other
// nodes pass to --bootstrap.
func (n *Node) P2PAddrs() ([]string, error) {
	if n.host == nil {
		return nil, errors.New("node: not started")
	}
	p2p, err := ma.NewComponent("p2p", n.host.ID().String())
	if err != nil {
		return nil, err
	}
	var out []string
	for _, a := range n.host.Addrs() {
		out = append(out, a.Encapsulate(p2p.Multiaddr()).String())
	}
	return out, nil
}

// ConnectedPeers returns the peers the node has open connections to.
func (n *Node) ConnectedPeers() []peer.ID {
	var out []peer.ID
	for _, p := range n.host.Network().Peers() {
		if n.host.Network().Connectedness(p) == network.Connected {
			out = append(out, p)
		}
	}
	return out
}

// TopicPeers returns how many peers the node knows subscribe to the bundle
// and account topics of shard (the lower of the two).
func (n *Node) TopicPeers(shard int) int {
	if n.gossip == nil {
		return 0
	}
	return n.gossip.TopicPeers(shard)
}

// DHTPeers returns the size of the node's DHT routing table.
func (n *Node) DHTPeers() int {
	if n.dht == nil {
		return 0
	}
	return n.dht.RoutingTableSize()
}

// Shards returns the shards the node holds.
func (n *Node) Shards() protocol.ShardSet { return n.cfg.Shards }

// Provided reports whether the node has announced every shard it holds in
// the DHT at least once (always true for a light node).
func (n *Node) Provided() bool {
	if n.cfg.Light || n.cfg.Shards.Empty() {
		return true
	}
	return n.dht != nil && n.dht.Provided()
}

// NetworkID returns the network name with the constants' tag, as topics,
// protocol IDs and DHT keys embed it (protocol.Constants.NetworkID).
func (n *Node) NetworkID() string { return n.netID }
