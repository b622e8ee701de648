// Package testnet starts clusters of real kpnode nodes in one process, on
// loopback TCP, for tests and benchmarks: node 0 is the bootstrap node and
// every other node bootstraps from it.
package testnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
)

// Options configure a cluster.
type Options struct {
	// Nodes is how many nodes to start (at least 1).
	Nodes int
	// Dir holds one data directory per node (node-0, node-1, …).
	Dir string
	// Network names the network; default "testnet".
	Network string
	// MLS is the validation mode; default strict.
	MLS protocol.MLSMode
	// Configure, if set, adjusts node i's config before it starts (shards,
	// light mode, clocks, …).
	Configure func(i int, c *node.Config)
	// Logger receives the nodes' logs; default: discarded.
	Logger *slog.Logger
}

// Cluster is a running set of nodes.
type Cluster struct {
	Nodes   []*node.Node
	opts    Options
	configs []node.Config // each node's config, for Restart
}

// Config returns the config node i of a cluster with opts would start with.
func Config(opts Options, i int) node.Config {
	c := node.DefaultConfig()
	c.DataDir = filepath.Join(opts.Dir, fmt.Sprintf("node-%d", i))
	c.APIAddr = "127.0.0.1:0"
	c.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	c.Network = opts.Network
	c.NoSync = true
	if opts.MLS != "" {
		c.Policy.MLS = opts.MLS
	}
	c.Logger = opts.Logger.With("node", i)
	return c
}

// Start starts opts.Nodes nodes; node 0 first, the rest bootstrapping from
// it. It returns when every node has started, not when the network has
// formed: use WaitReady.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	if opts.Nodes < 1 {
		return nil, errors.New("testnet: at least one node")
	}
	if opts.Dir == "" {
		return nil, errors.New("testnet: Dir is required")
	}
	if opts.Network == "" {
		opts.Network = "testnet"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	c := &Cluster{opts: opts}
	var bootstrap []string
	for i := 0; i < opts.Nodes; i++ {
		cfg := Config(opts, i)
		cfg.Bootstrap = bootstrap
		if opts.Configure != nil {
			opts.Configure(i, &cfg)
		}
		n, err := c.startNode(ctx, cfg)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("testnet: node %d: %w", i, err)
		}
		if i == 0 {
			if bootstrap, err = n.P2PAddrs(); err != nil {
				c.Close()
				return nil, err
			}
		}
	}
	return c, nil
}

// startNode creates and starts a node, closing it if it cannot start.
func startNode(ctx context.Context, cfg node.Config) (*node.Node, error) {
	n, err := node.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := n.Start(ctx); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

func (c *Cluster) startNode(ctx context.Context, cfg node.Config) (*node.Node, error) {
	n, err := startNode(ctx, cfg)
	if err != nil {
		return nil, err
	}
	c.Nodes = append(c.Nodes, n)
	c.configs = append(c.configs, cfg)
	return n, nil
}

// Stop closes node i; Restart brings it back on the same data dir (so the
// same peer ID) with the same config, bootstrapping from node 0.
func (c *Cluster) Stop(i int) error { return c.Nodes[i].Close() }

// Restart starts node i again after Stop.
func (c *Cluster) Restart(ctx context.Context, i int) (*node.Node, error) {
	cfg := c.configs[i]
	if i != 0 {
		cfg.Bootstrap = c.Bootstrap()
	}
	n, err := startNode(ctx, cfg)
	if err != nil {
		return nil, err
	}
	c.Nodes[i] = n
	return n, nil
}

// Bootstrap returns node 0's full multiaddrs.
func (c *Cluster) Bootstrap() []string {
	a, _ := c.Nodes[0].P2PAddrs()
	return a
}

// Add starts one more node bootstrapping from node 0, configured by
// configure (may be nil), and returns it.
func (c *Cluster) Add(ctx context.Context, configure func(*node.Config)) (*node.Node, error) {
	cfg := Config(c.opts, len(c.Nodes))
	cfg.Bootstrap = c.Bootstrap()
	if configure != nil {
		configure(&cfg)
	}
	return c.startNode(ctx, cfg)
}

// Ready reports whether node n can take part: a peer in the gossip topics
// of every shard some other node holds, a non-empty DHT routing table and,
// for a full node, its shards announced in the DHT.
func Ready(n *node.Node, shardsHeldElsewhere []int) bool {
	if n.DHTPeers() == 0 || !n.Provided() {
		return false
	}
	for _, s := range shardsHeldElsewhere {
		if n.TopicPeers(s) == 0 {
			return false
		}
	}
	return true
}

// WaitReady polls until every node is Ready or ctx ends.
func (c *Cluster) WaitReady(ctx context.Context) error {
	for {
		notReady := -1
		for i, n := range c.Nodes {
			if len(c.Nodes) > 1 && !Ready(n, c.heldElsewhere(i)) {
				notReady = i
				break
			}
		}
		if notReady < 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("testnet: node %d not ready: %w", notReady, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// heldElsewhere lists the shards some node other than i holds.
func (c *Cluster) heldElsewhere(i int) []int {
	seen := map[int]bool{}
	var out []int
	for j, n := range c.Nodes {
		if j == i {
			continue
		}
		for _, s := range n.Shards().List() {
			if !seen[s] {
				seen[s] = true
				out = append(out, s)
			}
		}
	}
	return out
}

// Close stops every node.
func (c *Cluster) Close() error {
	var errs []error
	for i := len(c.Nodes) - 1; i >= 0; i-- {
		if err := c.Nodes[i].Close(); err != nil {
			errs = append(errs, fmt.Errorf("node %d: %w", i, err))
		}
	}
	return errors.Join(errs...)
}
