package node

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// A light node serves a device's latest bundle b2 (its own client posted
// it, so it also holds a copy and an outbox entry); the device consumes b2
// at the holders. The light node's next lookups (once the cache refresh
// brings the holders' consume notice) serve b1, not b2: its copy and its
// outbox entry are gone, its cache entry dropped, and after a restart its
// floor of b2 no longer refuses b1.
func TestLightNodeStopsServingAConsumedBundle(t *testing.T) {
	dir := t.TempDir()
	cfg := func(c *Config) { c.DataDir = dir; c.CacheRefresh = 20 * time.Millisecond }
	light, base := lightNode(t, cfg)
	addrs, err := light.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	h1, h2 := fullNodes(t, addrs)
	key := nodetest.SeedKey(71)
	now := nowMS()
	b1 := protocol.SignBundle(key, now-2000, []byte("one-time v1"))
	b2 := protocol.SignBundle(key, now-1000, []byte("one-time v2"))
	dev := b1.DeviceID
	ctx := context.Background()
	for _, h := range []*Node{h1, h2} {
		for _, b := range []*protocol.Bundle{&b1, &b2} {
			if _, err := h.Ingest(ctx, b); err != nil {
				t.Fatal(err)
			}
		}
	}
	nodetest.WaitFor(t, "the light node finds the holders", 30*time.Second, func() bool {
		return h1.Provided() && h2.Provided() && light.DHTPeers() > 0
	})
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b2)), 204, "")
	serves := func(n *Node, want protocol.Bundle) bool {
		got, err := n.LatestBundle(ctx, dev)
		return err == nil && bytes.Equal(got.Payload, want.Payload)
	}
	if !serves(light, b2) {
		t.Fatal("the light node does not serve b2 before the consume")
	}
	info2, err := h1.cfg.Policy.ValidateBundle(&b2, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	consume := protocol.SignConsume(key, nowMS(), []protocol.Ref{info2.Ref})
	for _, h := range []*Node{h1, h2} {
		if err := h.SubmitConsume(ctx, &consume); err != nil {
			t.Fatal(err)
		}
	}

	// The stale cache hit refreshes; the refresh's answers carry the
	// notice, and from then on the light node serves b1.
	nodetest.WaitFor(t, "the light node serves b1", 30*time.Second, func() bool { return serves(light, b1) })
	for range 3 {
		if !serves(light, b1) {
			t.Fatal("the light node went back to another bundle than b1")
		}
	}
	if consumed, err := light.store.Consumed(ctx, dev, info2.Ref); err != nil || !consumed {
		t.Fatalf("the light node's store has no tombstone for b2: %v, %v", consumed, err)
	}
	if got, err := light.store.LatestBundle(ctx, dev); err == nil {
		t.Fatalf("the light node's own copy survived: %q", got.Payload)
	}
	nodetest.WaitFor(t, "the outbox lets go of b2", 30*time.Second, func() bool { return light.outbox.Len() == 0 })

	// After a restart: empty cache, the floor of b2 in the store.
	if err := light.Close(); err != nil {
		t.Fatal(err)
	}
	h1Addrs, err := h1.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	light, _ = lightNode(t, func(c *Config) { cfg(c); c.Bootstrap = h1Addrs })
	nodetest.WaitFor(t, "the restarted light node serves b1", 30*time.Second, func() bool { return serves(light, b1) })
}

// An outbox bundle entry whose (device, ref) is tombstoned is dropped at
// its next attempt, not published again.
func TestOutboxDropsAConsumedBundle(t *testing.T) {
	light, base := lightNode(t, nil)
	key := nodetest.SeedKey(72)
	b := protocol.SignBundle(key, nowMS(), []byte("queued then consumed"))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)), 204, "")
	ctx := context.Background()
	due, _, err := light.outbox.Due(ctx, light.cfg.Now().UnixMilli()+1, 10, func(storage.OutboxKind, protocol.Key) bool { return false })
	if err != nil || len(due) != 1 {
		t.Fatalf("outbox: %d entries due, %v; want the bundle", len(due), err)
	}
	info, err := light.cfg.Policy.ValidateBundle(&b, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// The consume notice arrives as a fetch answer brings it.
	consume := protocol.SignConsume(key, nowMS(), []protocol.Ref{info.Ref})
	light.fetchedConsumes(ctx, "", []*protocol.ConsumeNotice{&consume})
	light.outboxAttempt(ctx, due[0], nil)
	if n := light.outbox.Len(); n != 0 {
		t.Fatalf("%d outbox entries left; want the consumed bundle dropped", n)
	}
	if got := nodetest.Value(light.outboxDone.WithLabelValues("dropped")); got != 1 {
		t.Fatalf("kpnode_outbox_done dropped = %v, want 1", got)
	}
}
