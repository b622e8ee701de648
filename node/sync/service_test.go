package sync

import (
	"context"
	"strings"
	gosync "sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"github.com/libp2p/go-msgio/pbio"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Two services on go-libp2p's in-memory network (no sockets) reconcile a
// shard both ways through SyncNow, count what they moved, penalize
// nobody, and leave no goroutine behind once closed, though sessions
// started by identify may still be running when Close is called.
func TestServiceSyncNowAndClose(t *testing.T) {
	mn := mocknet.New()
	defer mn.Close()
	sides := []*side{newSide(t, 5*time.Second), newSide(t, 5*time.Second)}
	for range 100 {
		sides[0].putBundles(t, newBundle(0))
	}
	for range 20 {
		sides[1].putBundles(t, newBundle(0))
	}
	sides[1].putAccounts(t, newAccount(0, 3))
	var svcs []*Service
	var ids []peer.ID
	regs := []*prometheus.Registry{prometheus.NewRegistry(), prometheus.NewRegistry()}
	for i, s := range sides {
		h, err := mn.GenPeer()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, h.ID())
		cfg := DefaultConfig()
		cfg.Protocol = "/kpnode/test/sync/1"
		cfg.Shards = s.local.Shards
		cfg.MLS = protocol.MLSOff
		cfg.Interval = time.Hour
		cfg.RoundTimeout = 5 * time.Second
		cfg.Logger = s.local.Log
		cfg.Registerer = regs[i]
		other := 1 - i
		svc, err := New(cfg, h, s.store, s.local.Ingester, s.pen, PeerSourceFunc(func(int) []peer.ID { return []peer.ID{ids[other]} }))
		if err != nil {
			t.Fatal(err)
		}
		if err := svc.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		svcs = append(svcs, svc)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	if err := mn.ConnectAllButSelf(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if _, err := svcs[1].SyncNow(ctx, ids[0], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := svcs[0].SyncNow(ctx, ids[1], 0); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []storage.SetKind{storage.BundleSet, storage.AccountSet} {
		if a, b := sides[0].digest(kind), sides[1].digest(kind); a != b {
			t.Errorf("set %v: %d and %d items", kind, a.Count, b.Count)
		}
	}
	if got := sides[0].digest(storage.BundleSet).Count; got != 120 {
		t.Errorf("%d bundles, want 120", got)
	}
	// In agreement now: nothing more to pull.
	if n, err := svcs[1].SyncNow(ctx, ids[0], 0); n != 0 || err != nil {
		t.Errorf("second SyncNow pulled %d: %v", n, err)
	}
	if n, err := svcs[1].SyncNow(ctx, ids[0], 3); err == nil || n != 0 {
		t.Errorf("SyncNow of a shard the peer does not hold: %d, %v", n, err)
	}
	for i, reg := range regs {
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		names := map[string]bool{}
		for _, f := range fams {
			names[f.GetName()] = true
		}
		for _, n := range []string{"kpnode_sync_rounds_total", "kpnode_sync_bytes_total", "kpnode_sync_items_scanned_total"} {
			if !names[n] {
				t.Errorf("node %d exports no %s", i, n)
			}
		}
	}
	for _, s := range sides {
		if p := s.pen.list(); len(p) != 0 {
			t.Errorf("penalties: %v", p)
		}
	}
	for _, svc := range svcs {
		if err := svc.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if s := nodetest.Stacks(); strings.Contains(s, "node/sync.(*Service)") || strings.Contains(s, "node/sync.(*Initiator)") || strings.Contains(s, "node/sync.(*Responder)") {
		t.Fatalf("sync goroutines left after Close:\n%s", s)
	}
}

// A config without a protocol, a shard count, or with an interval below a
// second is refused.
func TestConfigValidate(t *testing.T) {
	good := DefaultConfig()
	good.Protocol = "/p"
	good.Shards, _ = protocol.ParseShardSet("0", 4)
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mutate := range map[string]func(*Config){
		"no protocol":    func(c *Config) { c.Protocol = "" },
		"no shards":      func(c *Config) { c.Shards = protocol.ShardSet{} },
		"short interval": func(c *Config) { c.Interval = time.Millisecond },
		"no timeout":     func(c *Config) { c.RoundTimeout = 0 },
		"no retention":   func(c *Config) { c.Retention = 0 },
	} {
		c := good
		mutate(&c)
		if c.Validate() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// serviceOn starts a service holding shard 0 of s on a new mocknet host.
func serviceOn(t *testing.T, mn mocknet.Mocknet, s *side) (*Service, peer.ID) {
	t.Helper()
	h, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Protocol = "/kpnode/test/sync/1"
	cfg.Shards = s.local.Shards
	cfg.MLS = protocol.MLSOff
	cfg.Interval = time.Hour
	cfg.Logger = s.local.Log
	svc, err := New(cfg, h, s.store, s.local.Ingester, s.pen, PeerSourceFunc(func(int) []peer.ID { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc, h.ID()
}

// floodTarget starts a service over a new side on the in-memory network and
// an attacker's host connected to it.
func floodTarget(t *testing.T) (s *side, svc *Service, id peer.ID, attacker host.Host) {
	t.Helper()
	mn := mocknet.New()
	t.Cleanup(func() { mn.Close() })
	s = newSide(t, 5*time.Second)
	svc, id = serviceOn(t, mn, s)
	attacker, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := mn.ConnectPeers(attacker.ID(), id); err != nil {
		t.Fatal(err)
	}
	return s, svc, id, attacker
}

// Parallel and rapid sessions from one peer are refused (the stream reset
// before anything is read), counted by reason, and a peer that keeps
// opening them is penalized; on the in-memory network, in well under a
// second.
func TestServiceRefusesSessionFloods(t *testing.T) {
	root := &pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}
	open := func(ctx context.Context, h host.Host, to peer.ID) (network.Stream, bool) {
		st, err := h.NewStream(ctx, to, "/kpnode/test/sync/1")
		if err != nil {
			return nil, false
		}
		r, w := pbio.NewDelimitedReader(st, maxResponse), pbio.NewDelimitedWriter(st)
		var resp pb.SyncResponse
		if w.WriteMsg(root) != nil || r.ReadMsg(&resp) != nil {
			st.Reset()
			return nil, false
		}
		return st, resp.Status == pb.SyncResponse_STATUS_OK
	}
	t.Run("parallel", func(t *testing.T) {
		s, svc, id, attacker := floodTarget(t)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		var wg gosync.WaitGroup
		var mu gosync.Mutex
		var held []network.Stream
		for range 12 {
			wg.Go(func() {
				if st, ok := open(ctx, attacker, id); ok {
					mu.Lock()
					held = append(held, st) // the session stays open
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		defer func() {
			for _, st := range held {
				st.Reset()
			}
		}()
		if len(held) != maxPeerSessions {
			t.Errorf("%d parallel sessions served, want %d", len(held), maxPeerSessions)
		}
		if r := nodetest.Value(svc.local.Metrics.refusal.WithLabelValues("peer_sessions")); r != 10 {
			t.Errorf("%v sessions refused, want 10", r)
		}
		if p := s.pen.list(); len(p) == 0 || p[0] != "sync/peer_sessions" {
			t.Errorf("penalties %v", p)
		}
	})
	t.Run("rapid", func(t *testing.T) {
		s, svc, id, attacker := floodTarget(t)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		start := time.Now()
		served := 0
		for i := 0; i < 200 && len(s.pen.list()) == 0; i++ {
			if st, ok := open(ctx, attacker, id); ok {
				served++
				st.Close()
			}
		}
		// The burst, plus a token back every peerRefill while the loop ran.
		burst := int(peerBurst(testShards))
		if limit := burst + int(time.Since(start)/peerRefill) + 1; served > limit || served < burst {
			t.Errorf("%d rapid sessions served, want %d to %d", served, burst, limit)
		}
		if r := nodetest.Value(svc.local.Metrics.refusal.WithLabelValues("peer_rate")); r < float64(burst+maxStrikes) {
			t.Errorf("%v sessions refused for the rate", r)
		}
		if p := s.pen.list(); len(p) == 0 || p[0] != "sync/peer_rate" {
			t.Errorf("penalties %v", p)
		}
		t.Logf("%d served in %v", served, time.Since(start))
	})
}
