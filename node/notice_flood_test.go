package node

import (
	"context"
	"crypto/ed25519"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/gossip"
	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// acceptAll is a raw peer's ingest path: it takes anything.
type acceptAll struct{}

func (acceptAll) IngestBundle(context.Context, *protocol.Bundle, ingest.Source) (storage.PutOutcome, protocol.BundleInfo, error) {
	return storage.Stored, protocol.BundleInfo{}, nil
}
func (acceptAll) IngestAccount(_ context.Context, a *protocol.AccountBundle, _ storage.AccountRule, _ ingest.Source) (*storage.Account, storage.PutOutcome, error) {
	return &storage.Account{AccountBundle: *a}, storage.Stored, nil
}
func (acceptAll) IngestClaim(context.Context, *protocol.ClaimNotice, ingest.Source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	return storage.Stored, protocol.ClaimInfo{}, nil
}
func (acceptAll) IngestConsume(context.Context, *protocol.ConsumeNotice, ingest.Source) (storage.PutOutcome, protocol.ConsumeInfo, error) {
	return storage.Stored, protocol.ConsumeInfo{}, nil
}

type noGuard struct{}

func (noGuard) Penalize(peer.ID, string, string) {}
func (noGuard) Banned(peer.ID) bool              { return false }

// rawPeer is a libp2p host on loopback with kpnode's gossip and an
// Ed25519 identity whose key signs its claim notices; it joins n's
// network and publishes whatever it is told to.
type rawPeer struct {
	key ed25519.PrivateKey
	id  peer.ID
	g   *gossip.Service
}

func newRawPeer(t *testing.T, n *Node) *rawPeer {
	t.Helper()
	_, key, _ := ed25519.GenerateKey(nil)
	lkey, err := crypto.UnmarshalEd25519PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	h, err := libp2p.New(libp2p.Identity(lkey), libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	cfg := gossip.DefaultConfig()
	cfg.NetworkID, cfg.Shards = n.netID, protocol.NoShards(protocol.DefaultShardCount)
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	g, err := gossip.New(cfg, h, acceptAll{}, noGuard{})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	if err := h.Connect(t.Context(), peer.AddrInfo{ID: n.PeerID(), Addrs: n.host.Addrs()}); err != nil {
		t.Fatal(err)
	}
	return &rawPeer{key: key, id: h.ID(), g: g}
}

// A raw libp2p peer that floods a holder with claim notices it signs
// itself, far over the claim rate an honest node keeps to, marks no more
// of the device's pool than the per-origin limit lets through, is
// Rejected and loses its score; another peer's claims keep being stored.
func TestClaimFloodFromARawPeer(t *testing.T) {
	var mu sync.Mutex
	scores := map[peer.ID]float64{}
	n, _ := testNode(t, func(c *Config) {
		c.PeerScoreInspect = func(m map[peer.ID]float64) { mu.Lock(); scores = m; mu.Unlock() }
	})
	score := func(p peer.ID) float64 { mu.Lock(); defer mu.Unlock(); return scores[p] }
	devKey := nodetest.SeedKey(91)
	dev := protocol.Key(devKey.Public().(ed25519.PublicKey))
	shard := protocol.Shard(dev, protocol.DefaultShardCount)
	ctx := context.Background()
	var refs []protocol.Ref
	for i := range 100 {
		b := protocol.SignBundle(devKey, nowMS(), []byte{'k', 'p', byte(i)})
		if err := n.SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		refs = append(refs, refOf(t, n, b))
	}
	flooder, honest := newRawPeer(t, n), newRawPeer(t, n)
	nodetest.WaitFor(t, "the raw peers to see the holder in the device's topic", 10*time.Second, func() bool {
		return flooder.g.TopicPeers(shard) > 0 && honest.g.TopicPeers(shard) > 0
	})
	oneTime := func() int {
		c, err := n.store.ClaimCounts(ctx, dev)
		if err != nil {
			t.Fatal(err)
		}
		return c.OneTime
	}
	start, ts := time.Now(), nowMS()
	const flood = 200 // past its burst (60) and its strikes (40)
	for i := range flood {
		c := protocol.SignClaim(flooder.key, ts+uint64(i), dev, refs[i%90])
		if err := flooder.g.PublishClaim(ctx, &c); err != nil {
			t.Fatal(err)
		}
	}
	nodetest.WaitFor(t, "the flood to be Rejected and cost the flooder its score", 10*time.Second, func() bool {
		return nodetest.Counter(t, n.registry, "kpnode_gossip_notices_refused_total", "reason", "origin_flood") >= 1 && score(flooder.id) < 0
	})
	elapsed := time.Since(start)
	// 60 at once, then 20/s while the flood lasted.
	if left, most := oneTime(), claimOriginDeviceBurst+int(claimOriginDeviceRate*elapsed.Seconds()+1); 100-left > most {
		t.Fatalf("the flooder marked %d bundles claimed in %v, the per-origin limit allows %d", 100-left, elapsed, most)
	}
	t.Logf("flood: %d of %d claims stored in %v, %v rejected for origin_flood, flooder's score %.0f",
		100-oneTime(), flood, elapsed, nodetest.Counter(t, n.registry, "kpnode_gossip_notices_refused_total", "reason", "origin_flood"), score(flooder.id))
	before := oneTime()
	c := protocol.SignClaim(honest.key, nowMS(), dev, refs[99])
	if err := honest.g.PublishClaim(ctx, &c); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "the honest peer's claim to be stored", 10*time.Second, func() bool { return oneTime() == before-1 })
	if s := score(honest.id); s < 0 {
		t.Errorf("the honest peer's score is %v", s)
	}
}
