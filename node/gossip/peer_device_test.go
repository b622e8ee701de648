package gossip

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/ingest"
	keyed "github.com/kpnode/kpnode/node/internal/bucket"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// A forwarding peer's claim notices for one device, each signed by a fresh
// key, stop at its (peer, device) budget before the ingest path (Ignore,
// counted as peer_device); another device, another peer and the peer's
// own notices (its origin limits hold those) are not charged to it.
func TestGossipValidatorPeerDeviceBudget(t *testing.T) {
	const shard = 2
	dev, dev2 := devIn(shard), devIn(shard)
	for pub(dev2) == pub(dev) {
		dev2 = devIn(shard)
	}
	m, reg := testMetrics(t)
	clock := time.Unix(5000, 0)
	ing := &fixedIngester{outcome: storage.Stored}
	v := &validator{self: "self", shards: testShards, ing: ing, log: discard, metrics: m,
		peerDevices: keyed.New[peerDevice](16, 1, 3, func() time.Time { return clock })}
	ctx := context.Background()
	minted := func(d ed25519.PrivateKey, i int) []byte {
		_, k, _ := ed25519.GenerateKey(rand.Reader)
		return claimMsg(protocol.SignClaim(k, ms(time.Now()), pub(d), protocol.Ref{byte(i)}))
	}
	_, flooder := nodeIdentity(t)
	for i := range 3 {
		if got := v.bundle(ctx, shard, flooder, minted(dev, i)); got != ingest.Accept {
			t.Fatalf("claim %d within the budget: %v", i, got)
		}
	}
	calls := ing.calls
	for i := 3; i < 8; i++ {
		if got := v.bundle(ctx, shard, flooder, minted(dev, i)); got != ingest.Ignore {
			t.Fatalf("claim %d over the budget: %v, want ignore", i, got)
		}
	}
	if ing.calls != calls {
		t.Fatalf("claims over the budget reached the ingest path (%d calls)", ing.calls-calls)
	}
	if got := nodetest.Counter(t, reg, "kpnode_gossip_notices_refused_total", "reason", "peer_device"); got != 5 {
		t.Fatalf("kpnode_gossip_notices_refused_total{reason=peer_device} = %v, want 5", got)
	}
	if got := v.bundle(ctx, shard, flooder, minted(dev2, 9)); got != ingest.Accept {
		t.Errorf("the same peer's claim for another device: %v", got)
	}
	if got := v.bundle(ctx, shard, peer.ID("other"), minted(dev, 10)); got != ingest.Accept {
		t.Errorf("another peer's claim for the device: %v", got)
	}
	ownKey, own := nodeIdentity(t)
	for i := range 5 {
		v.bundle(ctx, shard, own, minted(dev, 20+i)) // drains own's budget for dev
	}
	if got := v.bundle(ctx, shard, own, claimMsg(protocol.SignClaim(ownKey, ms(time.Now()), pub(dev), protocol.Ref{30}))); got != ingest.Accept {
		t.Errorf("a peer's own claim, its budget for the device spent on minted keys: %v (its origin limits hold it)", got)
	}
	clock = clock.Add(time.Second)
	if got := v.bundle(ctx, shard, flooder, minted(dev, 40)); got != ingest.Accept {
		t.Errorf("after a second at 1/s: %v", got)
	}
}

// A forwarding peer's consume notices are charged their payload bytes:
// over the budget they are Ignored before the ingest path and counted as
// consume_bytes.
func TestGossipValidatorConsumeByteBudget(t *testing.T) {
	const shard = 3
	dev := devIn(shard)
	m, reg := testMetrics(t)
	clock := time.Unix(5000, 0)
	ing := &fixedIngester{outcome: storage.Stored}
	refs := make([]protocol.Ref, 100)
	for i := range refs {
		refs[i][0], refs[i][1] = 1, byte(i)
	}
	big := protocol.SignConsume(dev, ms(time.Now()), refs)
	v := &validator{self: "self", shards: testShards, ing: ing, log: discard, metrics: m,
		consumeBytes: keyed.New[peer.ID](16, 1, float64(2*len(big.Payload)), func() time.Time { return clock })}
	ctx := context.Background()
	for i := range 2 {
		if got := v.bundle(ctx, shard, "flooder", consumeMsg(big)); got != ingest.Accept {
			t.Fatalf("consume %d within the byte budget: %v", i, got)
		}
	}
	calls := ing.calls
	if got := v.bundle(ctx, shard, "flooder", consumeMsg(big)); got != ingest.Ignore || ing.calls != calls {
		t.Fatalf("consume over the byte budget: %v after %d ingest calls, want ignore after none", got, ing.calls-calls)
	}
	if got := nodetest.Counter(t, reg, "kpnode_gossip_notices_refused_total", "reason", "consume_bytes"); got != 1 {
		t.Fatalf("kpnode_gossip_notices_refused_total{reason=consume_bytes} = %v, want 1", got)
	}
	if got := v.bundle(ctx, shard, "honest", consumeMsg(big)); got != ingest.Accept {
		t.Errorf("another peer's consume: %v", got)
	}
}
