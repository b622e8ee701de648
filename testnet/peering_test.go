package testnet

import (
	"context"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/kpnode/kpnode/testnet/simnet"
)

// TestShardHoldersFindEachOther: in a network wider than a node's links
// (16 full nodes in a seeded tree, each dialling one peer; 8 shards, 2
// holders each), the holders of a shard need not be neighbours, yet gossip
// and sync run only between connected peers. A light node's publication to
// a shard none of its peers holds reaches the holders (its outbox finds
// them through the DHT), and a holder that was cut off and comes back with
// only its own links finds the other holder of its shard through the DHT
// and catches up.
func TestShardHoldersFindEachOther(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nw, err := simnet.New(simnet.Options{Full: 16, Light: 1, ShardCount: 8, Replication: 2, Degree: 1, Seed: 3, Logger: testLogger()})
		if err != nil {
			t.Fatal(err)
		}
		defer nw.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if err := nw.Start(ctx); err != nil {
			t.Fatal(err)
		}
		// Seed 3's tree leaves some shard's holders apart (the test is void
		// otherwise).
		apart := false
		for s := range 8 {
			hs := nw.HoldersOfShard(s)
			if !slices.Contains(nw.Nodes[hs[0]].ConnectedPeers(), nw.Nodes[hs[1]].PeerID()) {
				apart = true
			}
		}
		if !apart {
			t.Fatal("every shard's holders are neighbours from the start; choose another seed")
		}
		// The light node publishes to a shard whose holders it is not
		// connected to; its outbox finds them.
		light := nw.Nodes[16]
		published := false
		for s := range 8 {
			hs := nw.HoldersOfShard(s)
			if slices.ContainsFunc(hs, func(h int) bool { return slices.Contains(light.ConnectedPeers(), nw.Nodes[h].PeerID()) }) {
				continue
			}
			b, err := nw.NewBundle(s)
			if err != nil {
				t.Fatal(err)
			}
			if err := light.SubmitBundle(ctx, &b); err != nil {
				t.Fatal(err)
			}
			published = true
			if err := nw.WaitFor(ctx, func() bool { return len(nw.Holders(ctx, b.DeviceID)) == len(hs) }); err != nil {
				t.Fatalf("light node's bundle of shard %d held by %v, want %v: %v", s, nw.Holders(ctx, b.DeviceID), hs, err)
			}
			break
		}
		if !published {
			t.Fatal("the light node is connected to a holder of every shard; choose another seed")
		}
		// A holder cut off from everyone, while the other holder of its
		// shard takes a bundle, comes back with only its own links (the
		// seeded tree) and none of them a holder of its shard: it finds
		// the other holder through the DHT and catches up by sync.
		if err := nw.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
		x, s := -1, -1
		for i := range 16 {
			sh := nw.Nodes[i].Shards().List()[0]
			if nw.Nodes[i].TopicPeers(sh) > 0 && len(nw.Nodes[i].Shards().List()) == 1 {
				x, s = i, sh
				break
			}
		}
		if x < 0 {
			t.Fatal("no holder of exactly one shard with a topic peer")
		}
		var rest []int
		for i := range 17 {
			if i != x {
				rest = append(rest, i)
			}
		}
		nw.Partition([]int{x}, rest)
		if err := nw.WaitFor(ctx, func() bool { return len(nw.Nodes[x].ConnectedPeers()) == 0 }); err != nil {
			t.Fatalf("node %d still connected: %v", x, err)
		}
		b, err := nw.NewBundle(s)
		if err != nil {
			t.Fatal(err)
		}
		others := slices.DeleteFunc(nw.HoldersOfShard(s), func(h int) bool { return h == x })
		if err := nw.Nodes[others[0]].SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		if err := nw.WaitFor(ctx, func() bool { return len(nw.Holders(ctx, b.DeviceID)) == len(others) }); err != nil {
			t.Fatal(err)
		}
		if err := nw.Heal(ctx); err != nil {
			t.Fatal(err)
		}
		for _, h := range others {
			if slices.Contains(nw.Nodes[x].ConnectedPeers(), nw.Nodes[h].PeerID()) {
				t.Fatalf("node %d is a neighbour of holder %d again at once; choose another seed", x, h)
			}
		}
		healed := time.Now()
		if err := nw.WaitFor(ctx, func() bool { return slices.Contains(nw.Holders(ctx, b.DeviceID), x) }); err != nil {
			t.Fatalf("rejoined node %d never caught up: %v", x, err)
		}
		t.Logf("node %d (shard %d) caught up %v of virtual time after the heal", x, s, time.Since(healed))
	})
}
