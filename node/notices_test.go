package node

import (
	"context"
	"crypto/ed25519"
	"errors"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/node/ingest"
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

// The notice rate limits of the ingest path: from gossip, a claim notice
// is charged to its origin for its device (ingest.ErrClaimRate over it)
// and in all (ingest.ErrNoticeRate), a consume notice to its device; a
// notice the store already holds gives its tokens back (so replaying an
// origin's old notices spends nothing of its budget); a forged notice
// spends nothing; sync and HTTP are not limited here. Each refusal is
// counted.
func TestNoticeRateLimits(t *testing.T) {
	n, _ := testNode(t, func(c *Config) { c.MaxPerDevice = 20 })
	clock := time.Unix(1e6, 0)
	n.limits = newNoticeLimits(noticeRates{originDeviceRate: 1, originDeviceBurst: 3, originRate: 1, originBurst: 5,
		consumeRate: 1, consumeBurst: 2}, func() time.Time { return clock })
	ctx := context.Background()
	devKey, dev2Key := nodetest.SeedKey(81), nodetest.SeedKey(82)
	dev, dev2 := protocol.Key(devKey.Public().(ed25519.PublicKey)), protocol.Key(dev2Key.Public().(ed25519.PublicKey))
	var refs, refs2 []protocol.Ref
	for i := range 8 {
		for _, d := range []struct {
			key  ed25519.PrivateKey
			refs *[]protocol.Ref
		}{{devKey, &refs}, {dev2Key, &refs2}} {
			b := protocol.SignBundle(d.key, nowMS(), []byte{'k', byte(i)})
			if err := n.SubmitBundle(ctx, &b); err != nil {
				t.Fatal(err)
			}
			*d.refs = append(*d.refs, refOf(t, n, b))
		}
	}
	origin := nodetest.SeedKey(83)
	claim := func(dev protocol.Key, ref protocol.Ref) *protocol.ClaimNotice {
		c := protocol.SignClaim(origin, nowMS(), dev, ref)
		return &c
	}
	expect := func(what string, c *protocol.ClaimNotice, src source, want error) {
		t.Helper()
		_, _, err := n.ingestClaim(ctx, c, src)
		if (want == nil) != (err == nil) || want != nil && !errors.Is(err, want) {
			t.Fatalf("%s: %v, want %v", what, err, want)
		}
	}
	first := claim(dev, refs[0])
	expect("claim 1", first, sourceGossip, nil)
	for range 3 {
		expect("the same claim replayed (a duplicate gives its token back)", first, sourceGossip, nil)
	}
	forged := claim(dev, refs[1])
	forged.Signature[0] ^= 1
	for range 3 {
		_, _, err := n.ingestClaim(ctx, forged, sourceGossip)
		if protocol.RuleOf(err) != protocol.RuleSignature {
			t.Fatalf("forged: %v", err)
		}
	}
	expect("claim 2", claim(dev, refs[1]), sourceGossip, nil)
	expect("claim 3", claim(dev, refs[2]), sourceGossip, nil)
	expect("claim 4: over the origin's rate for the device", claim(dev, refs[3]), sourceGossip, ingest.ErrClaimRate)
	expect("claim 4 by sync: not limited here", claim(dev, refs[3]), sourceSync, nil)
	expect("another device", claim(dev2, refs2[0]), sourceGossip, nil)
	expect("another device", claim(dev2, refs2[1]), sourceGossip, nil)
	err := func() error { _, _, err := n.ingestClaim(ctx, claim(dev2, refs2[2]), sourceGossip); return err }()
	if !errors.Is(err, ingest.ErrNoticeRate) || errors.Is(err, ingest.ErrClaimRate) {
		t.Fatalf("the origin's sixth claim: %v, want its total rate (not the device's)", err)
	}
	clock = clock.Add(time.Second)
	expect("a second later", claim(dev, refs[4]), sourceGossip, nil)

	consume := func(ref protocol.Ref) error {
		c := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{ref})
		_, _, err := n.ingestConsume(ctx, &c, sourceGossip)
		return err
	}
	for i := range 2 {
		if err := consume(refs[5+i]); err != nil {
			t.Fatalf("consume %d: %v", i+1, err)
		}
	}
	if err := consume(refs[7]); !errors.Is(err, ingest.ErrNoticeRate) {
		t.Fatalf("consume 3: %v, want the device's rate", err)
	}
	c := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{refs[7]})
	if err := n.SubmitConsume(ctx, &c); err != nil {
		t.Fatalf("the same notice over HTTP: %v", err)
	}
	for reason, want := range map[string]float64{"rate_origin_device": 1, "rate_origin": 1, "rate_device": 1} {
		kind := "claim"
		if reason == "rate_device" {
			kind = "consume"
		}
		if got := nodetest.Counter(t, n.registry, "kpnode_notices_rejected_total", "kind", kind, "source", "gossip", "reason", reason); got != want {
			t.Errorf("kpnode_notices_rejected_total{kind=%s,reason=%s} = %v, want %v", kind, reason, got, want)
		}
	}
}

// A holder that is offline while a consume notice goes round converges on
// it by sync when it comes back: it deletes the bundle, and the bundle
// posted to it again is refused.
func TestConsumeNoticeReachesARejoiningHolderBySync(t *testing.T) {
	dir := t.TempDir()
	h1, _ := testNode(t, nil)
	h1Addrs, err := h1.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	h2, _ := testNode(t, func(c *Config) { c.DataDir, c.Bootstrap = dir, h1Addrs })
	devKey := nodetest.SeedKey(73)
	dev := protocol.Key(devKey.Public().(ed25519.PublicKey))
	shard := protocol.Shard(dev, protocol.DefaultShardCount)
	used := protocol.SignBundle(devKey, nowMS(), []byte("a used keypackage"))
	ctx := context.Background()
	for _, n := range []*Node{h1, h2} {
		if err := n.SubmitBundle(ctx, &used); err != nil {
			t.Fatal(err)
		}
	}
	if err := h2.Close(); err != nil {
		t.Fatal(err)
	}
	ref := refOf(t, h1, used)
	notice := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{ref})
	if err := h1.SubmitConsume(ctx, &notice); err != nil {
		t.Fatal(err)
	}

	h2, _ = testNode(t, func(c *Config) { c.DataDir, c.Bootstrap = dir, h1Addrs })
	if consumedOn(t, h2, dev, ref) {
		t.Fatal("the holder that was offline had the notice before syncing")
	}
	nodetest.WaitFor(t, "the holders to reconnect", 10*time.Second, func() bool { return h2.TopicPeers(shard) > 0 })
	if _, err := h2.SyncNow(ctx, h1.PeerID(), shard); err != nil {
		t.Fatal(err)
	}
	if !consumedOn(t, h2, dev, ref) {
		t.Fatal("after sync, the rejoined holder still has the consumed bundle")
	}
	if err := h2.SubmitBundle(ctx, &used); !errors.Is(err, storage.ErrConsumed) {
		t.Fatalf("the consumed bundle posted to the rejoined holder: %v, want storage.ErrConsumed", err)
	}
}

// Over HTTP on a real node: POST /v1/consume is 204 and deletes the bundle;
// the bundle posted again is 409 "keypackage consumed"; a consume notice
// naming only refs not held, past the device's cap of such tombstones
// (256), is 429 with a Retry-After of a minute, and changes nothing.
func TestConsumeOverHTTP(t *testing.T) {
	n, base := testNode(t, nil)
	devKey := nodetest.SeedKey(74)
	dev := protocol.Key(devKey.Public().(ed25519.PublicKey))
	b := protocol.SignBundle(devKey, nowMS(), []byte("a used keypackage"))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)), 204, "")
	notice := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{refOf(t, n, b)})
	httpapitest.Expect(t, postJSON(t, base+"/v1/consume", httpapitest.ConsumeJSON(notice)), 204, "")
	if !consumedOn(t, n, dev, refOf(t, n, b)) {
		t.Fatal("the bundle is still held")
	}
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)), 409, `{"error":"keypackage consumed"}`)

	quotaKey := nodetest.SeedKey(75)
	var ref protocol.Ref
	next := func() protocol.Ref {
		for i := range ref {
			if ref[i]++; ref[i] != 0 {
				break
			}
		}
		return ref
	}
	for range storage.MaxUnheldConsumedPerDevice / protocol.MaxConsumeRefs {
		refs := make([]protocol.Ref, protocol.MaxConsumeRefs)
		for i := range refs {
			refs[i] = next()
		}
		httpapitest.Expect(t, postJSON(t, base+"/v1/consume", httpapitest.ConsumeJSON(protocol.SignConsume(quotaKey, nowMS(), refs))), 204, "")
	}
	over := protocol.SignConsume(quotaKey, nowMS(), []protocol.Ref{next()})
	r := postJSON(t, base+"/v1/consume", httpapitest.ConsumeJSON(over))
	httpapitest.Expect(t, r, 429, `{"error":"rate limited"}`)
	if r.RetryAfter != "60" {
		t.Errorf("Retry-After %q, want 60", r.RetryAfter)
	}
	if gone, err := n.store.Consumed(context.Background(), protocol.Key(quotaKey.Public().(ed25519.PublicKey)), ref); err != nil || gone {
		t.Errorf("the refused notice's ref is tombstoned: %v, %v", gone, err)
	}
}
