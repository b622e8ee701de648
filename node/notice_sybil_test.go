package node

import (
	"context"
	"crypto/ed25519"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/gossip"
	"github.com/kpnode/kpnode/protocol"
)

// A raw peer signing each claim notice with a fresh node key (keys are
// free, so the origin limits never bite) marks no more of a device's pool
// than its per-(peer, device) budget lets through: burst + rate × t; the
// rest is Ignored and counted as peer_device.
func TestSybilClaimKeysBoundedPerPeerDevice(t *testing.T) {
	n, _ := testNode(t, nil)
	devKey := nodetest.SeedKey(92)
	dev := protocol.Key(devKey.Public().(ed25519.PublicKey))
	shard := protocol.Shard(dev, protocol.DefaultShardCount)
	ctx := context.Background()
	var refs []protocol.Ref
	const pool = 150
	for i := range pool {
		b := protocol.SignBundle(devKey, nowMS(), []byte{'k', 'q', byte(i)})
		if err := n.SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		refs = append(refs, refOf(t, n, b))
	}
	flooder := newRawPeer(t, n)
	nodetest.WaitFor(t, "topic", 10*time.Second, func() bool { return flooder.g.TopicPeers(shard) > 0 })
	oneTime := func() int {
		c, err := n.store.ClaimCounts(ctx, dev)
		if err != nil {
			t.Fatal(err)
		}
		return c.OneTime
	}
	refused := func() int {
		return int(nodetest.Counter(t, n.registry, "kpnode_gossip_notices_refused_total", "reason", "peer_device"))
	}
	start, ts := time.Now(), nowMS()
	for i := range pool {
		_, k, _ := ed25519.GenerateKey(nil) // a fresh origin per notice
		c := protocol.SignClaim(k, ts+uint64(i), dev, refs[i])
		if err := flooder.g.PublishClaim(ctx, &c); err != nil {
			t.Fatal(err)
		}
	}
	nodetest.WaitFor(t, "every notice to be judged", 60*time.Second, func() bool { return pool-oneTime()+refused() == pool })
	marked, elapsed := pool-oneTime(), time.Since(start)
	bound := gossip.DefaultPeerDeviceBurst + int(float64(gossip.DefaultPeerDeviceRate)*elapsed.Seconds()) + 1
	t.Logf("%d of %d refs marked in %v, %d refused (peer_device), bound %d", marked, pool, elapsed, refused(), bound)
	if marked > bound {
		t.Errorf("one peer with minted keys marked %d refs of one device in %v; its budget allows %d", marked, elapsed, bound)
	}
	if refused() == 0 {
		t.Error("nothing counted under kpnode_gossip_notices_refused_total{reason=peer_device}")
	}
}
