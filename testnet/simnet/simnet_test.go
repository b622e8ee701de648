package simnet

import (
	"bytes"
	"context"
	"runtime"
	"slices"
	"testing"
	"testing/synctest"
	"time"
)

// started builds a network with o in the caller's synctest bubble, starts
// it and waits until it is ready. It returns the network, which t's cleanup
// closes, and a context that ends after d of virtual time.
func started(t *testing.T, o Options, d time.Duration) (*Network, context.Context) {
	t.Helper()
	nw, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nw.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	if err := nw.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := nw.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return nw, ctx
}

// TestSmoke: three full nodes on the simulated network form a network in
// virtual time and a bundle published on one reaches the others.
func TestSmoke(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nw, ctx := started(t, Options{Full: 3, ShardCount: 2, Replication: 3, Seed: 1}, 2*time.Minute)
		b, err := nw.NewBundle(0)
		if err != nil {
			t.Fatal(err)
		}
		nw.Step("publish")
		if err := nw.Nodes[1].SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		if err := nw.WaitFor(ctx, func() bool { return len(nw.Holders(ctx, b.DeviceID)) == 3 }); err != nil {
			t.Fatalf("holders %v: %v", nw.Holders(ctx, b.DeviceID), err)
		}
		for i, n := range nw.Nodes {
			got, err := n.LatestBundle(ctx, b.DeviceID)
			if err != nil || !bytes.Equal(got.Payload, b.Payload) {
				t.Fatalf("node %d serves %v, %v", i, got, err)
			}
			if tr := nw.Traffic(i); tr.BytesSent == 0 || tr.BytesRcvd == 0 {
				t.Fatalf("node %d traffic %+v, want some both ways", i, tr)
			}
		}
		t.Logf("virtual time %v, log %q", time.Since(nw.events.start), nw.Log())
	})
}

func TestPlaceShards(t *testing.T) {
	for _, o := range []Options{
		{Full: 20, ShardCount: 4, Replication: 5},
		{Full: 3, ShardCount: 8, Replication: 2},
		{Full: 4, ShardCount: 2, Replication: 3},
		{Full: 1000, ShardCount: 64, Replication: 3},
		{Full: 7, ShardCount: 256, Replication: 7},
	} {
		place := placeShards(o)
		holders := make([]int, o.ShardCount)
		lo, hi := o.ShardCount, 0
		for i := range o.Full {
			if len(place[i]) == 0 {
				t.Fatalf("%+v: full node %d holds no shard", o, i)
			}
			lo, hi = min(lo, len(place[i])), max(hi, len(place[i]))
			for _, s := range place[i] {
				holders[s]++
			}
		}
		for s, h := range holders {
			if h < o.Replication {
				t.Fatalf("%+v: shard %d has %d holders, want at least %d", o, s, h, o.Replication)
			}
		}
		if hi-lo > 1 {
			t.Fatalf("%+v: full nodes hold from %d to %d shards, want an even spread", o, lo, hi)
		}
	}
}

// TestLossAndPartitionDropPackets: a lossy network still delivers (QUIC
// retransmits) and counts what it dropped; a partitioned node's packets to
// the others are all dropped.
func TestLossAndPartitionDropPackets(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nw, ctx := started(t, Options{Full: 3, ShardCount: 1, Replication: 3, Seed: 3, Loss: 0.05}, 5*time.Minute)
		b, err := nw.NewBundle(0)
		if err != nil {
			t.Fatal(err)
		}
		if err := nw.Nodes[0].SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		if err := nw.WaitFor(ctx, func() bool { return len(nw.Holders(ctx, b.DeviceID)) == 3 }); err != nil {
			t.Fatalf("with 5%% loss, holders %v: %v", nw.Holders(ctx, b.DeviceID), err)
		}
		var dropped int64
		for i := range nw.Nodes {
			dropped += nw.Traffic(i).PacketsDropped
		}
		if dropped == 0 {
			t.Fatal("5% loss dropped no packet")
		}

		nw.Partition([]int{2})
		before := nw.Traffic(2)
		c, err := nw.NewBundle(0)
		if err != nil {
			t.Fatal(err)
		}
		if err := nw.Nodes[2].SubmitBundle(ctx, &c); err != nil {
			t.Fatal(err)
		}
		if err := nw.WaitFor(ctx, func() bool { return len(nw.Nodes[2].ConnectedPeers()) == 0 }); err != nil {
			t.Fatalf("the isolated node kept its connections: %v", err)
		}
		if got := nw.Holders(ctx, c.DeviceID); !slices.Equal(got, []int{2}) {
			t.Fatalf("a bundle of the isolated node is held by %v", got)
		}
		if after := nw.Traffic(2); after.PacketsDropped == before.PacketsDropped {
			t.Fatalf("isolated node traffic went from %+v to %+v: want drops", before, after)
		}
		// Once what was in flight has landed, nothing reaches it: a minute
		// of network time (the interval measured, not a synchronisation).
		mid := nw.Traffic(2)
		time.Sleep(time.Minute)
		if end := nw.Traffic(2); end.PacketsRcvd != mid.PacketsRcvd {
			t.Fatalf("the isolated node received %d packets", end.PacketsRcvd-mid.PacketsRcvd)
		}
	})
}

// TestMemoryPerNode measures what a simulated node costs (heap after GC,
// full node holding 2 of 8 shards, a formed network) and keeps it small
// enough for a thousand of them.
func TestMemoryPerNode(t *testing.T) {
	if testing.Short() {
		t.Skip("forms a 20-node network")
	}
	const n = 20
	synctest.Test(t, func(t *testing.T) {
		base := heapAfterGC()
		nw, err := New(Options{Full: n, Seed: 4})
		if err != nil {
			t.Fatal(err)
		}
		defer nw.Close()
		built := heapAfterGC()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if err := nw.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := nw.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
		ready := heapAfterGC()
		perBuilt, perReady := float64(built-base)/n/(1<<20), float64(ready-base)/n/(1<<20)
		t.Logf("heap per node: %.1f MiB built, %.1f MiB in a formed %d-node network", perBuilt, perReady, n)
		if perReady > 32 {
			t.Fatalf("a simulated node costs %.1f MiB of heap; 1,000 of them would not fit", perReady)
		}
	})
}

func heapAfterGC() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
