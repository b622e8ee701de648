package gossip

import (
	"context"
	"crypto/ed25519"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
)

// What a claim notice costs a validator on the real ingest path (MLS off,
// Badger): a new claim (verified and stored), and a forged one (refused at
// the signature, what a flood within the peer budget costs).
func BenchmarkClaimNoticeValidator(b *testing.B) {
	const shard = 1
	ctx := context.Background()
	now := time.Now()
	nodeKey, _ := nodeIdentity(b)
	b.Run("stored", func(b *testing.B) {
		ing := newStoreIngester(b, testPolicy(protocol.MLSOff), 100)
		v := &validator{self: "self", shards: testShards, ing: ing, log: discard}
		msgs := make([][]byte, 0, b.N)
		var dev ed25519.PrivateKey
		for i := range b.N {
			if i%100 == 0 {
				dev = devIn(shard)
			}
			bd := protocol.SignBundle(dev, ms(now), []byte{'k', byte(i), byte(i >> 8), byte(i >> 16)})
			_, info, err := ing.IngestBundle(ctx, &bd, ingest.SourceHTTP)
			if err != nil {
				b.Fatal(err)
			}
			msgs = append(msgs, claimMsg(protocol.SignClaim(nodeKey, ms(now), pub(dev), info.Ref)))
		}
		b.ResetTimer()
		for i := range b.N {
			if got := v.bundle(ctx, shard, "other", msgs[i]); got != ingest.Accept {
				b.Fatalf("claim %d: %v", i, got)
			}
		}
	})
	b.Run("forged", func(b *testing.B) {
		ing := newStoreIngester(b, testPolicy(protocol.MLSOff), 100)
		v := &validator{self: "self", shards: testShards, ing: ing, log: discard}
		forged := protocol.SignClaim(nodeKey, ms(now), pub(devIn(shard)), protocol.Ref{1})
		forged.Signature[0] ^= 1
		msg := claimMsg(forged)
		b.ResetTimer()
		for range b.N {
			if got := v.bundle(ctx, shard, "other", msg); got != ingest.Reject {
				b.Fatalf("forged: %v", got)
			}
		}
	})
}
