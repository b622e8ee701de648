package simnet

import (
	"bytes"
	"context"
	"testing"
	"testing/synctest"
	"time"
)

// TestSmoke: three full nodes on the simulated network form a network in
// virtual time and a bundle published on one reaches the others.
func TestSmoke(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nw, err := New(Options{Full: 3, ShardCount: 2, Replication: 3, Seed: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer nw.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := nw.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := nw.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
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
