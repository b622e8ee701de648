package gossip

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
)

// scores keeps the latest gossipsub score a service gives each peer.
type scores struct {
	mu sync.Mutex
	m  map[peer.ID]float64
}

func (s *scores) inspect(m map[peer.ID]float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m = m
}

func (s *scores) of(p peer.ID) float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m[p]
}

type testService struct {
	*Service
	ing    *storeIngester
	reg    *prometheus.Registry
	scores *scores
}

func newTestService(t *testing.T, ctx context.Context, h host.Host, shards protocol.ShardSet) *testService {
	t.Helper()
	ts := &testService{ing: newStoreIngester(t, testPolicy(protocol.MLSOff), 10), reg: prometheus.NewRegistry(), scores: &scores{}}
	cfg := DefaultConfig()
	cfg.NetworkID, cfg.Shards, cfg.Logger, cfg.Registerer, cfg.PeerScoreInspect = "test/x", shards, discard, ts.reg, ts.scores.inspect
	s, err := New(cfg, h, ts.ing, &fakeGuard{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	ts.Service = s
	return ts
}

// Two services on go-libp2p's in-memory network (no sockets): a record one
// publishes is validated and stored by the other, which holds its shard;
// a forged one is Rejected, costs its sender score and is not stored; the
// peer lists name the holder; Close ends every goroutine of the package.
func TestServicePublishesToTheShardsHolders(t *testing.T) {
	mn, hs := nodetest.Mocknet(t, 2)
	ha, hb := hs[0], hs[1]
	ctx := t.Context()
	const shard = 2
	held, err := protocol.ParseShardSet("2", testShards)
	if err != nil {
		t.Fatal(err)
	}
	a := newTestService(t, ctx, ha, protocol.NoShards(testShards)) // a light publisher: holds no shard
	b := newTestService(t, ctx, hb, held)
	if err := mn.ConnectAllButSelf(); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "a to see b in shard 2's topics", 10*time.Second, func() bool { return a.TopicPeers(shard) == 1 })
	if got := a.ShardPeers(shard); len(got) != 1 || got[0] != hb.ID() {
		t.Fatalf("a's peers of shard %d: %v, want [%s]", shard, got, hb.ID())
	}
	if got := b.ShardPeers(shard); len(got) != 0 {
		t.Errorf("b's peers of shard %d: %v; a holds no shard and subscribes to nothing", shard, got)
	}
	if a.ShardPeers(-1) != nil || a.ShardPeers(testShards) != nil || a.TopicPeers(testShards) != 0 || a.BundleTopic(testShards) != nil {
		t.Error("a shard out of range has peers or a topic")
	}

	dev := devIn(shard)
	good := protocol.SignBundle(dev, ms(time.Now()), []byte("kp-good"))
	if err := a.PublishBundle(ctx, &good); err != nil {
		t.Fatal(err)
	}
	acct := protocol.SignAccount(dev, protocol.EncodeAccountPayload(1, nil))
	if err := a.PublishAccount(ctx, &acct, time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "b to store both records", 10*time.Second, func() bool {
		bs, _ := b.ing.store.Bundles(ctx, good.DeviceID)
		ac, _ := b.ing.store.Account(ctx, acct.AccountPub)
		return len(bs) == 1 && ac != nil
	})
	if got := nodetest.Counter(t, b.reg, "kpnode_gossip_validations_total", "verdict", "accept"); got != 2 {
		t.Errorf("b's accept verdicts: %v, want 2", got)
	}

	forged := protocol.SignBundle(dev, ms(time.Now()), []byte("kp-forged"))
	forged.Signature[0] ^= 1
	if err := a.PublishBundle(ctx, &forged); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "b to reject the forged bundle", 10*time.Second, func() bool {
		return nodetest.Counter(t, b.reg, "kpnode_gossip_validations_total", "verdict", "reject") == 1
	})
	nodetest.WaitFor(t, "a's score on b to go negative", 10*time.Second, func() bool { return b.scores.of(ha.ID()) < 0 })
	if bs, _ := b.ing.store.Bundles(ctx, good.DeviceID); len(bs) != 1 {
		t.Errorf("b holds %d bundles of the device, want 1 (the forged one refused)", len(bs))
	}

	for _, s := range []*testService{a, b} {
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	}
	if err := a.Start(ctx); err != ErrClosed {
		t.Errorf("Start after Close: %v, want ErrClosed", err)
	}
	nodetest.WaitFor(t, "the package's goroutines to end", 5*time.Second, func() bool { return len(nodetest.Goroutines("node/gossip")) == 0 })
}

// Config: zero budgets take the defaults; what cannot work is refused.
func TestConfigValidate(t *testing.T) {
	ok := DefaultConfig()
	ok.NetworkID, ok.Shards = "test/x", protocol.AllShards(testShards)
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	zero := Config{NetworkID: "test/x", Shards: protocol.AllShards(testShards)}
	zero.setDefaults()
	if err := zero.Validate(); err != nil || zero.PeerBurst != DefaultPeerBurst || zero.NoticeBurst != DefaultNoticeBurst || zero.Logger == nil || zero.Registerer == nil || zero.Now == nil {
		t.Fatalf("defaults: %+v, %v", zero, err)
	}
	for name, mutate := range map[string]func(*Config){
		"no network ID":              func(c *Config) { c.NetworkID = "" },
		"no shards":                  func(c *Config) { c.Shards = protocol.ShardSet{} },
		"burst under one RPC":        func(c *Config) { c.PeerBurst = MaxRPC - 1 },
		"negative rate":              func(c *Config) { c.PeerRate = -1 },
		"negative minimum charge":    func(c *Config) { c.MinCharge = -1 },
		"negative validator timeout": func(c *Config) { c.ValidatorTimeout = -time.Second },
		"negative notice burst":      func(c *Config) { c.NoticeBurst = -1 },
		"negative notice rate":       func(c *Config) { c.NoticeRate = -1 },
	} {
		c := ok
		mutate(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
