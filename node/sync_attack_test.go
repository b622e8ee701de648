package node

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

func waitUntil(t testing.TB, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

// storeOpaque stores count opaque bundles (MLS validation off) through the
// ingest path, and returns them.
func storeOpaque(t testing.TB, n *Node, count int) []*protocol.Bundle {
	return storeOpaqueIn(t, n, count, -1)
}

// storeOpaqueIn is storeOpaque with device keys of one shard (-1: any).
func storeOpaqueIn(t testing.TB, n *Node, count, shard int) []*protocol.Bundle {
	t.Helper()
	var out []*protocol.Bundle
	for len(out) < count {
		pub, dev, _ := ed25519.GenerateKey(rand.Reader)
		if shard >= 0 && protocol.Shard(protocol.Key(pub), protocol.DefaultShardCount) != shard {
			continue
		}
		kp := make([]byte, 200)
		rand.Read(kp)
		b := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
		if _, _, err := n.ingestBundle(t.Context(), &b, sourceHTTP); err != nil {
			t.Fatal(err)
		}
		out = append(out, &b)
	}
	return out
}

// hostileResponder is a raw libp2p host that speaks n's sync protocol
// with answer, and connects to n: n starts sessions with it by itself
// once identify reports the protocol. It counts the requests it read.
func hostileResponder(t *testing.T, n *Node, answer func(req *pb.SyncRequest) *pb.SyncResponse) (host.Host, *atomic.Int64) {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	var rounds atomic.Int64
	h.SetStreamHandler(syncProto(n), func(s network.Stream) {
		defer s.Reset()
		r, w := pbio.NewDelimitedReader(s, 1<<20), pbio.NewDelimitedWriter(s)
		for {
			var req pb.SyncRequest
			if r.ReadMsg(&req) != nil {
				return
			}
			rounds.Add(1)
			if w.WriteMsg(answer(&req)) != nil {
				return
			}
		}
	})
	if err := h.Connect(t.Context(), peer.AddrInfo{ID: n.host.ID(), Addrs: n.host.Addrs()}); err != nil {
		t.Fatal(err)
	}
	return h, &rounds
}

// syncProto is n's sync protocol ID.
func syncProto(n *Node) p2pprotocol.ID { return p2pprotocol.ID(protocol.SyncProtocol(n.netID)) }

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func fp16(i int) []byte {
	b := make([]byte, protocol.FingerprintSize)
	binary.BigEndian.PutUint64(b, uint64(i)+1)
	return b
}

// A responder that answers every round at the response size cap with what
// was not asked (duplicate children, thousands of root listings, records
// nobody wanted) or with an ever deeper tree is cut off: the node's session
// ends within a few rounds and a bounded heap, the peer is banned and
// counted, and the node's scans stay within one pass of its store per round.
func TestHostileSyncResponderIsCutOff(t *testing.T) {
	ok := pb.SyncResponse_STATUS_OK
	cases := []struct {
		name      string
		maxRounds int64
		reason    string
		answer    func(req *pb.SyncRequest) *pb.SyncResponse
	}{
		{"duplicate children", 1, "duplicate_range", func(*pb.SyncRequest) *pb.SyncResponse {
			r := &pb.SyncResponse{Status: ok}
			for range 60_000 { // ~2 MiB of the same child
				r.Ranges = append(r.Ranges, &pb.SyncRange{Prefix: []byte{1}, Count: 1000, Fingerprint: fp16(1)})
			}
			return r
		}},
		{"root listings", 1, "unasked_listing", func(*pb.SyncRequest) *pb.SyncResponse {
			r := &pb.SyncResponse{Status: ok}
			ids := make([]uint64, 4096)
			for i := range ids {
				ids[i] = uint64(i)
			}
			for range 200 { // ~6.5 MiB: the empty prefix listed 200 times
				r.Listings = append(r.Listings, &pb.SyncListing{Ids: ids})
			}
			return r
		}},
		{"unsolicited records", 1, "unsolicited_record", func(*pb.SyncRequest) *pb.SyncResponse {
			_, dev, _ := ed25519.GenerateKey(rand.Reader)
			b := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), make([]byte, 100))
			return &pb.SyncResponse{Status: ok, Bundles: []*pb.Bundle{{DeviceId: b.DeviceID[:], Payload: b.Payload, Signature: b.Signature[:]}}}
		}},
		// Each range claims 2^40 items, so it might be a single key listed
		// with 4,096 IDs: the initiator asks 16 a round (256 + 32 × 4,096
		// children pass the session's 131,072 ranges in round 33).
		{"ever deeper, wide", 34, "session_ranges", func(req *pb.SyncRequest) *pb.SyncResponse {
			r := &pb.SyncResponse{Status: ok}
			for _, rg := range req.Ranges {
				if len(rg.Prefix) == protocol.KeySize-1 {
					continue
				}
				for b := range 256 {
					r.Ranges = append(r.Ranges, &pb.SyncRange{Prefix: append(append([]byte{}, rg.Prefix...), byte(b)), Count: 1 << 40, Fingerprint: fp16(b)})
				}
			}
			return r
		}},
		{"ever deeper, narrow", protocol.KeySize + 1, "malformed_range", func(req *pb.SyncRequest) *pb.SyncResponse {
			r := &pb.SyncResponse{Status: ok}
			for _, rg := range req.Ranges {
				r.Ranges = append(r.Ranges, &pb.SyncRange{Prefix: append(append([]byte{}, rg.Prefix...), 7), Count: 1 << 40, Fingerprint: fp16(len(rg.Prefix))})
			}
			return r
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n, _ := testNode(t, func(c *Config) {
				c.Shards, _ = protocol.ParseShardSet("0", protocol.DefaultShardCount)
				if testing.Verbose() {
					c.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
				}
			})
			storeOpaque(t, n, 400)
			ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
			defer cancel()
			before := heapInUse()
			h, rounds := hostileResponder(t, n, tc.answer)
			waitUntil(t, ctx, "the ban", func() bool { return n.guard.banned(h.ID()) })
			if got := nodetest.Scrape(t, n.Handler(), "kpnode_peer_penalties_total", `protocol="sync"`, `reason="`+tc.reason+`"`); got != 1 {
				t.Errorf("penalties for %s: %v, want 1", tc.reason, got)
			}
			if r := rounds.Load(); r > tc.maxRounds {
				t.Errorf("session ran %d rounds, want at most %d", r, tc.maxRounds)
			}
			grown := int64(heapInUse()) - int64(before)
			if grown > 64<<20 {
				t.Errorf("heap grew by %d MiB", grown>>20)
			}
			// One pass over the node's store per round at most.
			if scanned := nodetest.Scrape(t, n.Handler(), "kpnode_sync_items_scanned_total", `role="initiator"`); scanned > float64(400*rounds.Load()) {
				t.Errorf("scanned %v items in %d rounds", scanned, rounds.Load())
			}
			waitUntil(t, ctx, "the disconnect", func() bool { return n.host.Network().Connectedness(h.ID()) != network.Connected })
			if s, err := h.NewStream(ctx, n.host.ID(), syncProto(n)); err == nil {
				if _, err := s.Read(make([]byte, 1)); err == nil {
					t.Error("a banned peer opened a sync stream")
				}
				s.Reset()
			}
			t.Logf("%d rounds, %v items scanned, heap %+.1f MiB", rounds.Load(), nodetest.Scrape(t, n.Handler(), "kpnode_sync_items_scanned_total", `role="initiator"`), float64(grown)/(1<<20))
		})
	}
}

// connect connects a's host to b's.
func connect(t *testing.T, a, b *Node) {
	t.Helper()
	if err := a.host.Connect(t.Context(), peer.AddrInfo{ID: b.host.ID(), Addrs: b.host.Addrs()}); err != nil {
		t.Fatal(err)
	}
}

// Honest sessions never come near a budget: two real nodes with thousands
// of differing bundles in one shard reconcile both ways, again and again,
// sessions started on connect and by hand at once, and neither penalizes
// nor refuses the other.
func TestHonestSyncIsNeverPenalized(t *testing.T) {
	one := func(c *Config) { c.Shards, _ = protocol.ParseShardSet("0", protocol.DefaultShardCount) }
	a, _ := testNode(t, one)
	b, _ := testNode(t, one)
	all := func(n *Node) uint64 { return n.store.ShardDigest(storage.BundleSet, 0).Count }
	// Keys of every shard: only shard 0's are kept, as on a real network.
	storeOpaqueIn(t, a, 1500, 0)
	storeOpaqueIn(t, b, 300, 0)
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	connect(t, b, a)
	total := all(a) + all(b)
	waitUntil(t, ctx, "convergence from the sessions started on connect", func() bool { return all(a) == total && all(b) == total })
	for range 10 {
		if _, err := b.SyncNow(ctx, a.host.ID(), 0); err != nil {
			t.Fatal(err)
		}
		if _, err := a.SyncNow(ctx, b.host.ID(), 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []*Node{a, b} {
		if p := nodetest.Scrape(t, n.Handler(), "kpnode_peer_penalties_total"); p != 0 {
			t.Errorf("penalties: %v", p)
		}
		if r := nodetest.Scrape(t, n.Handler(), "kpnode_sync_sessions_refused_total"); r != 0 {
			t.Errorf("refused sessions: %v", r)
		}
	}
	if a.guard.banned(b.host.ID()) || b.guard.banned(a.host.ID()) {
		t.Error("an honest peer was banned")
	}
}

// A node does not pull again an item it refused: a peer holding more
// bundles of a device than this node keeps offers them in every session,
// and after the first only the ones kept are in agreement; the rest are
// not asked for again.
func TestRefusedItemsAreNotPulledAgain(t *testing.T) {
	a, _ := testNode(t, func(c *Config) { c.MaxPerDevice = 8 })
	b, _ := testNode(t, func(c *Config) { c.MaxPerDevice = 2 })
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	now := uint64(time.Now().UnixMilli())
	for i := range 8 {
		kp := make([]byte, 100)
		rand.Read(kp)
		bb := protocol.SignBundle(dev, now-uint64(i)*1000, kp)
		if _, _, err := a.ingestBundle(t.Context(), &bb, sourceHTTP); err != nil {
			t.Fatal(err)
		}
	}
	var key protocol.Key
	copy(key[:], dev.Public().(ed25519.PublicKey))
	shard := protocol.Shard(key, protocol.DefaultShardCount)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	connect(t, b, a)
	pulledBy := func() float64 {
		return nodetest.Scrape(t, b.Handler(), "kpnode_bundles_accepted_total", `source="sync"`)
	}
	waitUntil(t, ctx, "the first pull", func() bool { return pulledBy() >= 8 })
	if _, err := b.SyncNow(ctx, a.host.ID(), shard); err != nil {
		t.Fatal(err)
	}
	first := pulledBy()
	for range 3 {
		if _, err := b.SyncNow(ctx, a.host.ID(), shard); err != nil {
			t.Fatal(err)
		}
	}
	if again := pulledBy() - first; again != 0 {
		t.Errorf("refused bundles were pulled %v more times", again)
	}
	if b.sync.Refused().Len() < 6 {
		t.Errorf("%d refused items remembered, want 6", b.sync.Refused().Len())
	}
}

// The sync service owns its goroutines: after Close, none of them (the
// identify watcher, the periodic loop, sessions in both roles) is left,
// even with sessions running against a peer that never answers.
func TestSyncGoroutinesEndOnClose(t *testing.T) {
	n, _ := testNode(t, nil)
	storeOpaque(t, n, 50)
	stalled := make(chan struct{})
	defer close(stalled)
	hostileResponder(t, n, func(*pb.SyncRequest) *pb.SyncResponse {
		<-stalled // never answers while the node closes
		return &pb.SyncResponse{}
	})
	peerNode, _ := testNode(t, nil)
	connect(t, peerNode, n)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	waitUntil(t, ctx, "sessions in flight", func() bool {
		return strings.Contains(nodetest.Stacks(), "node/sync.(*Initiator).Run")
	})
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := peerNode.Close(); err != nil {
		t.Fatal(err)
	}
	if s := nodetest.Stacks(); strings.Contains(s, "node/sync.(*Service)") || strings.Contains(s, "node/sync.(*Initiator)") || strings.Contains(s, "node/sync.(*Responder)") {
		t.Fatalf("sync goroutines left after Close:\n%s", s)
	}
}
