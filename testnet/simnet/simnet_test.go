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
