package testnet

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/storage"
)

func testLogger() *slog.Logger {
	if os.Getenv("KPNODE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

func startCluster(t *testing.T, n int, configure func(int, *node.Config)) *Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := Start(context.Background(), Options{Nodes: n, Dir: t.TempDir(), Configure: configure, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

// newBundle signs a freshly generated, valid KeyPackage with a new device key.
func newBundle(t testing.TB) (protocol.Bundle, ed25519.PrivateKey) {
	t.Helper()
	_, dev, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return bundleFor(t, dev), dev
}

func bundleFor(t testing.TB, dev ed25519.PrivateKey) protocol.Bundle {
	t.Helper()
	kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: dev, LastResort: true})
	if err != nil {
		t.Fatal(err)
	}
	return protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
}

// deviceInShard returns a device key whose shard is s.
func deviceInShard(t testing.TB, s, count int) ed25519.PrivateKey {
	t.Helper()
	for {
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		var k protocol.Key
		copy(k[:], pub)
		if protocol.Shard(k, count) == s {
			return priv
		}
	}
}

// waitServed polls n until it serves b as the latest bundle of its device.
func waitServed(ctx context.Context, n *node.Node, b protocol.Bundle) error {
	for {
		got, err := n.LatestBundle(ctx, b.DeviceID)
		if err == nil && bytes.Equal(got.Payload, b.Payload) {
			return nil
		}
		if err != nil && !errors.Is(err, storage.ErrNotFound) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("bundle of %s not served: %w", b.DeviceID, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func TestBundlePublishedOnOneNodeIsStoredOnOthers(t *testing.T) {
	c := startCluster(t, 3, nil)
	b, _ := newBundle(t)
	if err := c.Nodes[1].SubmitBundle(context.Background(), &b); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i, n := range c.Nodes {
		if err := waitServed(ctx, n, b); err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		if got, _ := n.Bundles(ctx, b.DeviceID); len(got) != 1 {
			t.Fatalf("node %d holds %d bundles, want 1 in its store", i, len(got))
		}
	}
	// An account bundle travels the same way, and converges.
	_, acct, _ := ed25519.GenerateKey(rand.Reader)
	a := protocol.SignAccount(acct, protocol.EncodeAccountPayload(3, []protocol.Key{b.DeviceID}))
	if err := c.Nodes[2].SubmitAccount(context.Background(), &a); err != nil {
		t.Fatal(err)
	}
	for i, n := range c.Nodes {
		for {
			got, err := n.Account(ctx, a.AccountPub)
			if err == nil && bytes.Equal(got.Payload, a.Payload) {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("node %d never stored the account bundle: %v", i, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// eventually polls cond every 10 ms until it holds or ctx ends.
func eventually(ctx context.Context, cond func() bool) error {
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// Shards split between full nodes; a light node holds none and finds every
// device's bundle through the DHT, then serves it from its cache.
func TestLightNodeFindsBundlesThroughDHT(t *testing.T) {
	const S = protocol.DefaultShardCount
	halves := []string{"0-3", "4-7", "0-3", "4-7"}
	c := startCluster(t, 4, func(i int, cfg *node.Config) {
		cfg.Shards, _ = protocol.ParseShardSet(halves[i], S)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// One device per shard, published on a node that holds that shard.
	var bundles []protocol.Bundle
	for s := 0; s < S; s++ {
		b := bundleFor(t, deviceInShard(t, s, S))
		if err := c.Nodes[s/4].SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		bundles = append(bundles, b)
	}
	for s, b := range bundles {
		// The other holder of the shard stores it (a holder answers from its
		// store alone)...
		holder := c.Nodes[2+s/4]
		if err := waitServed(ctx, holder, b); err != nil {
			t.Fatalf("shard %d holder: %v", s, err)
		}
		if got, _ := holder.Bundles(ctx, b.DeviceID); len(got) != 1 {
			t.Fatalf("shard %d: holder does not store the bundle", s)
		}
		// ...and a node of the other half never stores it.
		if got, _ := c.Nodes[1-s/4].Bundles(ctx, b.DeviceID); len(got) != 0 {
			t.Fatalf("shard %d stored on a node that does not hold it", s)
		}
	}

	light, err := c.Add(ctx, func(cfg *node.Config) {
		cfg.Light = true
		cfg.Shards = protocol.NoShards(S)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { return light.DHTPeers() > 0 }); err != nil {
		t.Fatal("light node never joined the DHT")
	}
	for s, b := range bundles {
		got, err := light.LatestBundle(ctx, b.DeviceID)
		if err != nil {
			t.Fatalf("shard %d: light node lookup: %v", s, err)
		}
		if !bytes.Equal(got.Payload, b.Payload) || got.Signature != b.Signature {
			t.Fatalf("shard %d: light node served another bundle", s)
		}
		if held, _ := light.Bundles(ctx, b.DeviceID); len(held) != 0 {
			t.Fatal("a light node stored a fetched bundle; it should only cache it")
		}
	}
	// A full node asked for a key of a shard it does not hold asks the network too.
	if _, err := c.Nodes[0].LatestBundle(ctx, bundles[S-1].DeviceID); err != nil {
		t.Fatalf("full node lookup of a foreign shard: %v", err)
	}
	// An unknown device is a miss, answered within the lookup timeout.
	start := time.Now()
	var unknown protocol.Key
	unknown[0] = 9
	if _, err := light.LatestBundle(ctx, unknown); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
	if d := time.Since(start); d > node.DefaultLookupTimeout+time.Second {
		t.Fatalf("a miss took %v", d)
	}
}

// A node restarted on the same data dir keeps its peer ID and data and
// rejoins the network.
func TestRestartKeepsIdentityAndData(t *testing.T) {
	c := startCluster(t, 3, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, _ := newBundle(t)
	if err := c.Nodes[0].SubmitBundle(ctx, &b); err != nil {
		t.Fatal(err)
	}
	if err := waitServed(ctx, c.Nodes[2], b); err != nil {
		t.Fatal(err)
	}
	old := c.Nodes[2]
	id := old.PeerID()
	cfg := Config(c.opts, 2)
	cfg.Bootstrap = c.Bootstrap()
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	c.Nodes = c.Nodes[:2]
	n, err := c.startNode(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if n.PeerID() != id {
		t.Fatalf("peer ID changed across restart: %s → %s", id, n.PeerID())
	}
	if got, _ := n.Bundles(ctx, b.DeviceID); len(got) != 1 {
		t.Fatalf("restarted node holds %d bundles, want the 1 it had", len(got))
	}
	if err := eventually(ctx, func() bool { return Ready(n, c.heldElsewhere(2)) && len(n.ConnectedPeers()) >= 2 }); err != nil {
		t.Fatal("restarted node did not rejoin")
	}
	// It takes part again: a bundle published after the restart reaches it.
	b3, _ := newBundle(t)
	if err := c.Nodes[1].SubmitBundle(ctx, &b3); err != nil {
		t.Fatal(err)
	}
	if err := waitServed(ctx, n, b3); err != nil {
		t.Fatal(err)
	}
}

// A light node answers the chat client's hot path from its cache: a known
// account bundle is served at once, refreshed in the background once it is
// older than CacheRefresh, and still served while no holder is reachable.
func TestLightNodeCacheRefreshesAndSurvivesOutage(t *testing.T) {
	const S = protocol.DefaultShardCount
	c := startCluster(t, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	clk := &fakeClock{now: time.Now()}
	light, err := c.Add(ctx, func(cfg *node.Config) {
		cfg.Light = true
		cfg.Shards = protocol.NoShards(S)
		cfg.Now = clk.Now
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { return light.DHTPeers() > 0 }); err != nil {
		t.Fatal(err)
	}
	_, acct, _ := ed25519.GenerateKey(rand.Reader)
	v1 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil))
	if err := c.Nodes[0].SubmitAccount(ctx, &v1); err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { _, err := c.Nodes[1].Account(ctx, v1.AccountPub); return err == nil }); err != nil {
		t.Fatal(err)
	}
	got, err := light.Account(ctx, v1.AccountPub)
	if err != nil || got.Lamport != 1 {
		t.Fatalf("first lookup: %v %v", got, err)
	}
	v2 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil))
	if err := c.Nodes[1].SubmitAccount(ctx, &v2); err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { a, err := c.Nodes[0].Account(ctx, v2.AccountPub); return err == nil && a.Lamport == 2 }); err != nil {
		t.Fatal(err)
	}
	// Hits keep answering; once the entry is old, a hit refreshes it.
	if a, err := light.Account(ctx, v1.AccountPub); err != nil || a.Lamport != 1 {
		t.Fatalf("a fresh entry must be served from the cache: %v %v", a, err)
	}
	clk.Advance(2 * node.DefaultCacheRefresh)
	if err := eventually(ctx, func() bool {
		a, err := light.Account(ctx, v1.AccountPub)
		if err != nil {
			t.Fatalf("a cached account stopped being served: %v", err)
		}
		return a.Lamport == 2
	}); err != nil {
		t.Fatal("the cached account was never refreshed")
	}
	// Every holder goes away: the light node still serves what it knows.
	for _, n := range c.Nodes[:2] {
		n.Close()
	}
	clk.Advance(2 * node.DefaultCacheRefresh) // the next hit tries the network, and fails
	missesBefore := metricValue(t, light, `kpnode_lookups_total{kind="account",result="unavailable"}`)
	if a, err := light.Account(ctx, v1.AccountPub); err != nil || a.Lamport != 2 {
		t.Fatalf("during the outage: %v %v", a, err)
	}
	if err := eventually(ctx, func() bool {
		return metricValue(t, light, `kpnode_lookups_total{kind="account",result="unavailable"}`) > missesBefore
	}); err != nil {
		t.Fatal("the background refresh never ran")
	}
	// After the failed refresh the record is still served.
	if a, err := light.Account(ctx, v1.AccountPub); err != nil || a.Lamport != 2 {
		t.Fatalf("after a failed refresh: %v %v", a, err)
	}
}

// A light node's client publishes as soon as the node starts (the chat
// client does so on every start): the bundle and account bundle reach the
// holders even though the light node had no gossip route at that moment,
// and are served by them.
func TestLightNodePublishesRightAfterStart(t *testing.T) {
	const S = protocol.DefaultShardCount
	c := startCluster(t, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	light, err := c.Add(ctx, func(cfg *node.Config) {
		cfg.Light = true
		cfg.Shards = protocol.NoShards(S)
	})
	if err != nil {
		t.Fatal(err)
	}
	b, dev := newBundle(t)
	if err := light.SubmitBundle(ctx, &b); err != nil {
		t.Fatal(err)
	}
	a := protocol.SignAccount(dev, protocol.EncodeAccountPayload(0, []protocol.Key{b.DeviceID}))
	if err := light.SubmitAccount(ctx, &a); err != nil {
		t.Fatal(err)
	}
	for i, n := range c.Nodes[:2] {
		if err := waitServed(ctx, n, b); err != nil {
			t.Fatalf("holder %d: %v", i, err)
		}
		if err := eventually(ctx, func() bool { _, err := n.Account(ctx, a.AccountPub); return err == nil }); err != nil {
			t.Fatalf("holder %d never got the account bundle", i)
		}
	}
}

// A node asked for a key of a shard it does not hold serves the holders'
// newer version over the copy its own client once posted.
func TestForeignShardServesNewerNetworkVersion(t *testing.T) {
	const S = protocol.DefaultShardCount
	c := startCluster(t, 2, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	light, err := c.Add(ctx, func(cfg *node.Config) {
		cfg.Light = true
		cfg.Shards = protocol.NoShards(S)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { return light.DHTPeers() > 0 }); err != nil {
		t.Fatal(err)
	}
	_, acct, _ := ed25519.GenerateKey(rand.Reader)
	v1 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil))
	if err := light.SubmitAccount(ctx, &v1); err != nil {
		t.Fatal(err)
	}
	v2 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil))
	if err := c.Nodes[0].SubmitAccount(ctx, &v2); err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { a, err := c.Nodes[1].Account(ctx, v2.AccountPub); return err == nil && a.Lamport == 2 }); err != nil {
		t.Fatal(err)
	}
	got, err := light.Account(ctx, v1.AccountPub)
	if err != nil || got.Lamport != 2 {
		t.Fatalf("light node serves %v (%v), want the network's lamport 2", got, err)
	}
}

// metricValue reads one sample of a node's /metrics (0 when absent).
func metricValue(t *testing.T, n *node.Node, series string) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	n.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if strings.HasPrefix(line, series+" ") {
			v, _ := strconv.ParseFloat(strings.TrimPrefix(line, series+" "), 64)
			return v
		}
	}
	return 0
}

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}
