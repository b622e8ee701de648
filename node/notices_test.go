package node

import (
	"context"
	"crypto/ed25519"
	"errors"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// consumedOn reports whether n holds the tombstone of dev's ref and no
// bundle of it.
func consumedOn(t testing.TB, n *Node, dev protocol.Key, ref protocol.Ref) bool {
	t.Helper()
	ctx := context.Background()
	gone, err := n.store.Consumed(ctx, dev, ref)
	if err != nil || !gone {
		return false
	}
	bs, err := n.store.Bundles(ctx, dev)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		return false
	}
	for _, b := range bs {
		if b.Ref == ref {
			return false
		}
	}
	return true
}

func refOf(t testing.TB, n *Node, b protocol.Bundle) protocol.Ref {
	t.Helper()
	info, err := n.cfg.Policy.ValidateBundle(&b, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return info.Ref
}

// A consume notice submitted on one holder reaches the other by gossip
// within 2 s: both delete the bundle and keep its tombstone, and the
// bundle posted again is refused on both (storage.ErrConsumed, which the
// API answers 409). The other bundle of the device stays.
func TestConsumeNoticeReachesTheOtherHolder(t *testing.T) {
	h1, h2 := fullNodes(t, nil)
	devKey := nodetest.SeedKey(71)
	dev := protocol.Key(devKey.Public().(ed25519.PublicKey))
	shard := protocol.Shard(dev, protocol.DefaultShardCount)
	nodetest.WaitFor(t, "the holders to share the device's topic", 10*time.Second, func() bool { return h1.TopicPeers(shard) > 0 && h2.TopicPeers(shard) > 0 })
	used := protocol.SignBundle(devKey, nowMS(), []byte("a used keypackage"))
	kept := protocol.SignBundle(devKey, nowMS(), []byte("a fresh keypackage"))
	ctx := context.Background()
	for _, n := range []*Node{h1, h2} {
		for _, b := range []protocol.Bundle{used, kept} {
			if err := n.SubmitBundle(ctx, &b); err != nil {
				t.Fatal(err)
			}
		}
	}
	ref := refOf(t, h1, used)
	notice := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{ref})
	start := time.Now()
	if err := h1.SubmitConsume(ctx, &notice); err != nil {
		t.Fatal(err)
	}
	if !consumedOn(t, h1, dev, ref) {
		t.Fatal("the submitting node did not apply its own notice")
	}
	nodetest.WaitFor(t, "the consume notice to reach the other holder", 2*time.Second, func() bool { return consumedOn(t, h2, dev, ref) })
	t.Logf("the other holder applied the notice after %v", time.Since(start))
	for _, n := range []*Node{h1, h2} {
		err := n.SubmitBundle(ctx, &used)
		if !errors.Is(err, storage.ErrConsumed) || !errors.Is(apiError(err), httpapi.ErrConsumed) {
			t.Errorf("the consumed bundle posted again: %v, want storage.ErrConsumed (409)", err)
		}
		if bs, err := n.store.Bundles(ctx, dev); err != nil || len(bs) != 1 || bs[0].Ref != refOf(t, n, kept) {
			t.Errorf("bundles left: %d, %v; want the fresh one", len(bs), err)
		}
	}
}

// A light node acknowledges a consume notice while no holder is reachable
// (it goes to the outbox, surviving nothing but its own process here), and
// once holders come up the outbox publishes it, both holders apply it, and
// the entry is confirmed (a holder lists none of the named refs) and
// leaves the outbox.
func TestOutboxDeliversConsumeNotice(t *testing.T) {
	light, base := lightNode(t, nil)
	devKey := nodetest.SeedKey(72)
	dev := protocol.Key(devKey.Public().(ed25519.PublicKey))
	used := protocol.SignBundle(devKey, nowMS(), []byte("a used keypackage"))
	ref := refOf(t, light, used)
	notice := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{ref})
	ctx := context.Background()
	if err := light.SubmitConsume(ctx, &notice); err != nil {
		t.Fatal(err)
	}
	if got := pendingPublications(t, base); got != 1 {
		t.Fatalf("pending_publications %d, want 1", got)
	}
	addrs, err := light.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	h1, h2 := fullNodes(t, addrs)
	for _, n := range []*Node{h1, h2} {
		// The bundle reaches a holder before or after the notice: before,
		// the notice deletes it; after, the tombstone refuses it.
		if err := n.SubmitBundle(ctx, &used); err != nil && !errors.Is(err, storage.ErrConsumed) {
			t.Fatal(err)
		}
	}
	nodetest.WaitFor(t, "the consume notice to reach both holders and leave the outbox", 30*time.Second, func() bool {
		return consumedOn(t, h1, dev, ref) && consumedOn(t, h2, dev, ref) && light.outbox.Len() == 0
	})
	if got := nodetest.Counter(t, light.registry, "kpnode_outbox_done_total", "result", "confirmed"); got != 1 {
		t.Errorf("kpnode_outbox_done_total{result=confirmed} = %v, want 1", got)
	}
}
