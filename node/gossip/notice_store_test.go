package gossip

import (
	"context"
	"crypto/ed25519"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// The notices on the real ingest path (strict policy, then a Badger
// store): each outcome has the verdict the README's table gives it.
func TestGossipValidatorNoticesOnTheStore(t *testing.T) {
	ing := newStoreIngester(t, testPolicy(protocol.MLSStrict), 10)
	v := &validator{self: "self", shards: testShards, ing: ing, log: discard}
	ctx := context.Background()
	now := time.Now()
	const shard = 2
	dev, other := devIn(shard), devIn(shard)
	nodeKey, _ := nodeIdentity(t)
	kps := map[string][]byte{}
	store := func(name string, signer ed25519.PrivateKey) protocol.Ref {
		kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: signer, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		kps[name] = kp
		b := protocol.SignBundle(signer, ms(now.Add(-time.Minute)), kp)
		_, info, err := ing.IngestBundle(ctx, &b, ingest.SourceHTTP)
		if err != nil {
			t.Fatal(err)
		}
		return info.Ref
	}
	ref1, ref2, ref3 := store("a", dev), store("b", dev), store("c", dev)
	otherRef := store("o", other)
	forgedClaim := protocol.SignClaim(nodeKey, ms(now), pub(dev), ref2)
	forgedClaim.Signature[0] ^= 1
	forgedConsume := protocol.SignConsume(dev, ms(now), []protocol.Ref{ref2})
	forgedConsume.Signature[0] ^= 1
	first := protocol.SignClaim(nodeKey, ms(now), pub(dev), ref1)
	for _, tc := range []struct {
		name string
		data []byte
		want pubsub.ValidationResult
	}{
		{"claim stored", claimMsg(first), pubsub.ValidationAccept},
		{"claim duplicate", claimMsg(first), pubsub.ValidationIgnore},
		{"a later claim of the same ref (loses)", claimMsg(protocol.SignClaim(nodeKey, ms(now.Add(time.Second)), pub(dev), ref1)), pubsub.ValidationIgnore},
		{"an earlier claim of the same ref (wins)", claimMsg(protocol.SignClaim(nodeKey, ms(now.Add(-time.Second)), pub(dev), ref1)), pubsub.ValidationAccept},
		{"claim forged signature", claimMsg(forgedClaim), pubsub.ValidationReject},
		{"claim of a ref not held", claimMsg(protocol.SignClaim(nodeKey, ms(now), pub(dev), protocol.Ref{9})), pubsub.ValidationIgnore},
		{"claim of a ref held under another device (foreign_ref)", claimMsg(protocol.SignClaim(nodeKey, ms(now), pub(dev), otherRef)), pubsub.ValidationReject},
		{"consume forged signature", consumeMsg(forgedConsume), pubsub.ValidationReject},
		{"consume stored", consumeMsg(protocol.SignConsume(dev, ms(now), []protocol.Ref{ref2})), pubsub.ValidationAccept},
		{"consume duplicate", consumeMsg(protocol.SignConsume(dev, ms(now), []protocol.Ref{ref2})), pubsub.ValidationIgnore},
		{"claim of a consumed ref", claimMsg(protocol.SignClaim(nodeKey, ms(now), pub(dev), ref2)), pubsub.ValidationIgnore},
		{"consume naming a ref of another device (consume_foreign_ref)", consumeMsg(protocol.SignConsume(dev, ms(now), []protocol.Ref{ref3, otherRef})), pubsub.ValidationIgnore},
	} {
		if got := result(v.bundle(ctx, shard, "other", tc.data)); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
	// The consumed bundle is gone and cannot come back by gossip.
	if bs, err := ing.store.Bundles(ctx, pub(dev)); err != nil || len(bs) != 2 {
		t.Fatalf("device's bundles after the consume: %d, %v; want 2", len(bs), err)
	}
	again := protocol.SignBundle(dev, ms(now), kps["b"])
	if got := result(v.bundle(ctx, shard, "other", bundleMsg(again))); got != pubsub.ValidationIgnore {
		t.Fatalf("a consumed bundle again on gossip: %v, want ignore", got)
	}
}
