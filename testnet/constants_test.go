package testnet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
)

// Problem 7: configuration never splits a network into peers that punish
// each other. Two strict nodes and two nodes with --mls-validation=off
// run on one network name, all connected to the first strict node. Each
// side publishes bundles valid under its own settings (opaque KeyPackages
// on the "off" side, which a strict node would Reject if it saw them).
// Each side's bundles reach its same-config peer; no node's score of a
// peer of the other configuration ever goes below zero; and each side
// counts the other as mismatched.
func TestConfigSplitCostsNoScore(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, Network: "split", Logger: testLogger()}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	boards := make([]*scoreBoard, 4)
	var nodes []*node.Node
	var bootstrap []string
	for i := 0; i < 4; i++ {
		cfg := Config(opts, i)
		cfg.Bootstrap = bootstrap
		if i >= 2 {
			cfg.Policy.MLS = protocol.MLSOff
		}
		if i == 3 {
			addrs, _ := nodes[2].P2PAddrs()
			cfg.Bootstrap = append(cfg.Bootstrap, addrs...)
		}
		boards[i] = newScoreBoard()
		cfg.PeerScoreInspect = boards[i].inspect
		n, err := startNode(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		nodes = append(nodes, n)
		if i == 0 {
			bootstrap, _ = n.P2PAddrs()
		}
	}
	strict, off := nodes[:2], nodes[2:]
	if strict[0].NetworkID() == off[0].NetworkID() {
		t.Fatalf("both configurations run network %q", strict[0].NetworkID())
	}
	// Each pair forms its own mesh on every shard.
	if err := eventually(ctx, func() bool {
		for _, n := range nodes {
			for s := 0; s < protocol.DefaultShardCount; s++ {
				if n.TopicPeers(s) == 0 {
					return false
				}
			}
		}
		return true
	}); err != nil {
		t.Fatal("same-config peers never met on every topic")
	}

	const each = 8
	var strictBundles, offBundles []protocol.Bundle
	for i := 0; i < each; i++ {
		b, _ := newBundle(t) // a real KeyPackage: valid on both sides
		if err := strict[0].SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		strictBundles = append(strictBundles, b)
		_, dev, _ := ed25519.GenerateKey(rand.Reader)
		kp := make([]byte, 2850)
		rand.Read(kp)
		o := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp) // opaque: valid with MLS off only
		if err := off[0].SubmitBundle(ctx, &o); err != nil {
			t.Fatal(err)
		}
		offBundles = append(offBundles, o)
	}
	for _, b := range strictBundles {
		if err := waitServed(ctx, strict[1], b); err != nil {
			t.Fatalf("strict peer: %v", err)
		}
	}
	for _, b := range offBundles {
		if err := waitServed(ctx, off[1], b); err != nil {
			t.Fatalf("off peer: %v", err)
		}
	}
	// Keep watching the scores for 20 more inspections (2 s) after the
	// last delivery: a Reject would show by then.
	seen := 0
	if err := eventually(ctx, func() bool {
		boards[0].mu.Lock()
		defer boards[0].mu.Unlock()
		seen++
		return seen >= 200
	}); err != nil {
		t.Fatal(err)
	}
	lowest := func(i int, others []*node.Node) {
		t.Helper()
		for _, o := range others {
			if s, ok := boards[i].min(o.PeerID()); ok && s < 0 {
				t.Errorf("node %d scored %s (%s) at %v", i, o.PeerID(), o.NetworkID(), s)
			}
		}
	}
	for i := range strict {
		lowest(i, off)
	}
	for i := range off {
		lowest(2+i, strict)
	}
	// The split is impossible to miss: each strict node that met an "off"
	// node counted it.
	if got := metricValue(t, strict[0], "kpnode_peers_mismatched_total"); got < 1 {
		t.Errorf("strict node 0 counted %v mismatched peers", got)
	}
	if got := metricValue(t, off[0], "kpnode_peers_mismatched_total"); got < 1 {
		t.Errorf("off node 0 counted %v mismatched peers", got)
	}
}
