package testnet

import (
	"context"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// partitionScenario runs 20 full nodes (4 shards, 5 holders each, spread
// so that both halves hold every shard) through publish, partition,
// publish on both sides, heal, and returns the deterministic event log.
// Each step ends on a condition of the network's state, never on a fixed
// time, so the log depends on the seed alone.
func partitionScenario(t *testing.T, seed int64) []string {
	t.Helper()
	var log []string
	synctest.Test(t, func(t *testing.T) {
		nw := startSim(t, simnet.Options{Full: 20, ShardCount: 4, Replication: 5, Seed: seed})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		left, right := indexes(0, 10), indexes(10, 20)
		bundle := func(shard int) protocol.Bundle {
			b, err := nw.NewBundle(shard)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		submit := func(i int, b protocol.Bundle) {
			if err := nw.Nodes[i].SubmitBundle(ctx, &b); err != nil {
				t.Fatalf("node %d: submit: %v", i, err)
			}
		}
		// heldBy waits until exactly want hold b's device.
		heldBy := func(b protocol.Bundle, want []int) {
			t.Helper()
			if err := nw.WaitFor(ctx, func() bool { return slices.Equal(nw.Holders(ctx, b.DeviceID), want) }); err != nil {
				t.Fatalf("bundle held by %v, want %v: %v", nw.Holders(ctx, b.DeviceID), want, err)
			}
		}

		nw.Step("publish")
		a := bundle(0)
		submit(0, a)
		heldBy(a, nw.HoldersOfShard(0))

		nw.Step("partition")
		nw.Partition(left, right)
		if err := nw.WaitFor(ctx, func() bool { return !connectedAcross(nw, left, right) }); err != nil {
			t.Fatalf("connections across the partition never closed: %v", err)
		}

		// Each publication goes to a holder of its shard: a node that holds
		// other shards publishes through its outbox, which waits for a
		// connected peer in the shard's topic, and the partition may have
		// cut every such peer off.
		nw.Step("publish on both sides")
		b, c := bundle(1), bundle(2)
		submit(intersect(nw.HoldersOfShard(1), left)[0], b)
		submit(intersect(nw.HoldersOfShard(2), right)[0], c)
		heldBy(b, intersect(nw.HoldersOfShard(1), left))
		heldBy(c, intersect(nw.HoldersOfShard(2), right))

		nw.Step("heal")
		syncedBefore := syncStored(nw)
		if err := nw.Heal(ctx); err != nil {
			t.Fatal(err)
		}
		heldBy(b, nw.HoldersOfShard(1))
		heldBy(c, nw.HoldersOfShard(2))
		// Gossip does not resend what it delivered before the heal: sync
		// carried the bundles across.
		if got := syncStored(nw) - syncedBefore; got < 1 {
			t.Fatalf("bundles stored through sync after the heal: %v, want at least 1", got)
		}
		t.Logf("seed %d: converged at %v of virtual time", seed, nw.Events()[len(nw.Events())-1].At)
		log = nw.Log()
	})
	return log
}

func indexes(from, to int) []int {
	var out []int
	for i := from; i < to; i++ {
		out = append(out, i)
	}
	return out
}

func intersect(a, b []int) []int {
	var out []int
	for _, x := range a {
		if slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}

// connectedAcross reports whether a node of left has a connection to a
// node of right.
func connectedAcross(nw *simnet.Network, left, right []int) bool {
	for _, i := range left {
		for _, p := range nw.Nodes[i].ConnectedPeers() {
			for _, j := range right {
				if nw.Nodes[j].Host.ID() == p {
					return true
				}
			}
		}
	}
	return false
}

func syncStored(nw *simnet.Network) float64 {
	var sum float64
	for i := range nw.Nodes {
		sum += nw.Metric(i, `kpnode_bundles_accepted_total{outcome="stored",source="sync"}`)
	}
	return sum
}

// TestPartitionHealConvergesDeterministically: 20 nodes in virtual time
// are split in two halves, each side takes a publication the other cannot
// see, and after the heal both sides converge through sync; the same seed
// gives the same event log twice, another seed another log. The log's order
// is the order of the scenario's steps; within a step it is the set of
// (node, event, key), since gossipsub picks paths with Go's unseeded global
// math/rand and the order of arrivals within a step varies between runs
// (simnet.Network.Log).
func TestPartitionHealConvergesDeterministically(t *testing.T) {
	first := partitionScenario(t, 1)
	if t.Failed() {
		return
	}
	if len(first) < 4 {
		t.Fatalf("event log %q is too short", first)
	}
	t.Logf("event log of seed 1:\n%s", strings.Join(first, "\n"))
	if again := partitionScenario(t, 1); !slices.Equal(first, again) {
		t.Fatalf("same seed, different event logs:\n%q\n%q", first, again)
	}
	if other := partitionScenario(t, 2); slices.Equal(first, other) {
		t.Fatalf("seeds 1 and 2 gave the same event log %q", first)
	}
}
