package testnet

import (
	"context"
	"crypto/ed25519"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/testnet/simnet"
)

func scannedByResponder(t *testing.T, n *node.Node) float64 {
	return nodetest.Scrape(t, n.Handler(), "kpnode_sync_items_scanned_total", `role="responder"`)
}

// syncStream is a raw sync session of a hostile initiator.
type syncStream struct {
	s network.Stream
	r pbio.ReadCloser
	w pbio.WriteCloser
}

func openSync(t *testing.T, ctx context.Context, h host.Host, n *node.Node) (*syncStream, error) {
	t.Helper()
	s, err := h.NewStream(ctx, n.PeerID(), p2pprotocol.ID(protocol.SyncProtocol(n.NetworkID())))
	if err != nil {
		return nil, err
	}
	_ = s.SetDeadline(time.Now().Add(20 * time.Second))
	return &syncStream{s: s, r: pbio.NewDelimitedReader(s, 16<<20), w: pbio.NewDelimitedWriter(s)}, nil
}

// round sends req and reads the answer; an error means the stream died.
func (ss *syncStream) round(req *pb.SyncRequest) (*pb.SyncResponse, error) {
	if err := ss.w.WriteMsg(req); err != nil {
		return nil, err
	}
	var resp pb.SyncResponse
	if err := ss.r.ReadMsg(&resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

var emptyFingerprint = func() []byte { fp := (protocol.Digest{}).Fingerprint(); return fp[:] }()

// devicesInShard0 returns count device keys of shard 0 (generated once per
// test, outside the bubbles: finding them is most of a target's cost).
func devicesInShard0(t *testing.T, count int) []ed25519.PrivateKey {
	devs := make([]ed25519.PrivateKey, count)
	for i := range devs {
		devs[i] = deviceInShard(t, 0, protocol.DefaultShardCount)
	}
	return devs
}

// syncTarget starts a simulated network of one node holding shard 0 with a
// bundle of each of devs in it (call it inside synctest.Test); the hostile
// peers are the network's raw hosts.
func syncTarget(t *testing.T, devs []ed25519.PrivateKey) (*simnet.Network, *node.Node) {
	t.Helper()
	nw := startSim(t, simnet.Options{Full: 1, ShardCount: protocol.DefaultShardCount, MLS: protocol.MLSOff,
		NodeConfig: func(_ int, cfg *node.Config) {
			cfg.Shards, _ = protocol.ParseShardSet("0", protocol.DefaultShardCount)
			cfg.SyncInterval = time.Hour
		}})
	n := nw.Nodes[0].Node
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, dev := range devs {
		b := opaqueBundleOf(dev)
		if err := n.SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
	}
	return nw, n
}

// simHost is a raw host on nw, standing in for a peer that does not run
// kpnode's validation.
func simHost(t *testing.T, nw *simnet.Network) host.Host {
	t.Helper()
	h, err := nw.NewHost()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// honestRootRound measures what the root round of a session with an empty
// initiator costs the responder: the reference for every hostile request.
func honestRootRound(t *testing.T, ctx context.Context, nw *simnet.Network, n *node.Node) (scanned float64, children []*pb.SyncRange) {
	t.Helper()
	h := simHost(t, nw)
	connectTo(t, ctx, h, n)
	ss, err := openSync(t, ctx, h, n)
	if err != nil {
		t.Fatal(err)
	}
	defer ss.s.Close()
	before := scannedByResponder(t, n)
	resp, err := ss.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}})
	if err != nil || resp.Status != pb.SyncResponse_STATUS_OK || len(resp.Ranges) == 0 {
		t.Fatalf("honest root round: %v %v", resp, err)
	}
	return scannedByResponder(t, n) - before, resp.Ranges
}

func expectBanned(t *testing.T, ctx context.Context, n *node.Node, h host.Host, reason string) {
	t.Helper()
	if err := eventually(ctx, func() bool {
		return nodetest.Scrape(t, n.Handler(), "kpnode_peer_penalties_total", `protocol="sync"`, `reason="`+reason+`"`) >= 1
	}); err != nil {
		t.Errorf("no sync penalty for %s", reason)
	}
	if err := eventually(ctx, func() bool { return h.Network().Connectedness(n.PeerID()) != network.Connected }); err != nil {
		t.Error("the attacker is still connected")
	}
	if ss, err := openSync(t, ctx, h, n); err == nil {
		if _, err := ss.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}); err == nil {
			t.Error("a banned peer was served")
		}
	}
}

// A hostile initiator's requests that are cheap to send and expensive to
// answer are refused before any scan, and the peer is banned: 64 wants
// naming the empty prefix, nested prefixes, wants and ranges the responder
// never offered, an empty request (it would hold a session slot for
// free), endless rounds. Each costs the responder no more than an
// honest round (items scanned, counted by the node).
//
// The target is a simulated network in virtual time; the cases share it,
// each with a hostile host of its own, and run in turn (synctest allows no
// subtests inside a bubble): a failure names its case.
func TestHostileSyncInitiatorIsRefused(t *testing.T) {
	synctest.Test(t, hostileSyncInitiatorIsRefused)
}

func hostileSyncInitiatorIsRefused(t *testing.T) {
	nw, n := syncTarget(t, devicesInShard0(t, 2000))
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	honest, _ := honestRootRound(t, ctx, nw, n)
	t.Logf("honest root round: %v items scanned", honest)

	var emptyWants []*pb.SyncListing
	for i := range 64 {
		emptyWants = append(emptyWants, &pb.SyncListing{Ids: []uint64{uint64(i)}})
	}
	cases := []struct {
		name   string
		reason string
		reqs   []*pb.SyncRequest
	}{
		{"64 empty-prefix wants", "nested_prefix", []*pb.SyncRequest{{Want: emptyWants}}},
		{"nested ranges", "nested_prefix", []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{}, {Prefix: []byte{1}}, {Prefix: []byte{1, 2}}}}}},
		{"range inside a want", "nested_prefix", []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{Prefix: []byte{1, 2}}},
			Want: []*pb.SyncListing{{Prefix: []byte{1}, Ids: []uint64{1}}}}}},
		{"want never offered", "not_offered", []*pb.SyncRequest{{Want: []*pb.SyncListing{{Ids: []uint64{1, 2, 3}}}}}},
		{"ranges never offered", "not_offered", []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{Prefix: []byte{1}}, {Prefix: []byte{2}}}}}},
		{"root twice", "not_offered", []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}, {Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}}},
		{"duplicate want IDs", "bad_request", []*pb.SyncRequest{{Want: []*pb.SyncListing{{Prefix: []byte{1}, Ids: []uint64{5, 5}}}}}},
		{"empty request", "bad_request", []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}, {}}},
	}
	for _, tc := range cases {
		t.Logf("case %q", tc.name)
		h := simHost(t, nw)
		connectTo(t, ctx, h, n)
		ss, err := openSync(t, ctx, h, n)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		before := scannedByResponder(t, n)
		var last *pb.SyncResponse
		for _, req := range tc.reqs {
			if last, err = ss.round(req); err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
		}
		if last.Status != pb.SyncResponse_STATUS_BAD_REQUEST {
			t.Fatalf("%s: answered %v", tc.name, last.Status)
		}
		cost := scannedByResponder(t, n) - before
		if cost > honest*float64(len(tc.reqs)) {
			t.Errorf("%s: refusing cost %v items scanned; an honest round %v", tc.name, cost, honest)
		}
		t.Logf("%v items scanned (honest round: %v)", cost, honest)
		expectBanned(t, ctx, n, h, tc.reason)
	}

	t.Logf("case %q", "endless rounds")
	h := simHost(t, nw)
	connectTo(t, ctx, h, n)
	ss, err := openSync(t, ctx, h, n)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := ss.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}})
	if err != nil || resp.Status != pb.SyncResponse_STATUS_OK {
		t.Fatal(resp, err)
	}
	// Ask about one child, which is listed; then want one of its items
	// again and again.
	child := &pb.SyncRange{Prefix: resp.Ranges[0].Prefix, Fingerprint: emptyFingerprint}
	if resp, err = ss.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{child}}); err != nil || len(resp.Listings) != 1 {
		t.Fatal(resp, err)
	}
	want := &pb.SyncRequest{Want: []*pb.SyncListing{{Prefix: child.Prefix, Ids: resp.Listings[0].Ids[:1]}}}
	before := scannedByResponder(t, n)
	rounds := 2
	for ; rounds < 10_000; rounds++ {
		if resp, err = ss.round(want); err != nil {
			t.Fatal(err)
		}
		if resp.Status != pb.SyncResponse_STATUS_OK {
			break
		}
	}
	if resp.Status != pb.SyncResponse_STATUS_BAD_REQUEST || rounds > 600 {
		t.Fatalf("endless rounds: after %d rounds: %v", rounds, resp.Status)
	}
	t.Logf("cut off after %d rounds; %v items charged for the repeated wants", rounds, scannedByResponder(t, n)-before)
	expectBanned(t, ctx, n, h, "rounds")
}

// Parallel and rapid sessions from one peer are refused with a reset
// before anything is read, and a peer that keeps opening them is banned;
// honest peers pace themselves (see node's TestHonestSyncIsNeverPenalized).
func TestSyncSessionFloodIsRefused(t *testing.T) {
	devs := devicesInShard0(t, 200)
	target := func(t *testing.T) (context.Context, *simnet.Network, *node.Node) {
		nw, n := syncTarget(t, devs)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		t.Cleanup(cancel)
		return ctx, nw, n
	}

	t.Run("parallel", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			ctx, nw, n := target(t)
			h := simHost(t, nw)
			connectTo(t, ctx, h, n)
			var wg sync.WaitGroup
			var mu sync.Mutex
			served := 0
			for range 12 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ss, err := openSync(t, ctx, h, n)
					if err != nil {
						return
					}
					if _, err := ss.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}); err == nil {
						mu.Lock()
						served++
						mu.Unlock()
					}
					// Hold the session open until the end.
					_ = eventually(ctx, func() bool { return h.Network().Connectedness(n.PeerID()) != network.Connected })
					ss.s.Reset()
				}()
			}
			wg.Wait()
			if served > 2 {
				t.Errorf("%d parallel sessions served, want at most 2", served)
			}
			if r := nodetest.Scrape(t, n.Handler(), "kpnode_sync_sessions_refused_total", `reason="peer_sessions"`); r < 9 {
				t.Errorf("%v sessions refused", r)
			}
			expectBanned(t, ctx, n, h, "peer_sessions")
		})
	})

	t.Run("rapid", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			ctx, nw, n := target(t)
			h := simHost(t, nw)
			connectTo(t, ctx, h, n)
			served := 0
			for i := 0; i < 200 && h.Network().Connectedness(n.PeerID()) == network.Connected; i++ {
				ss, err := openSync(t, ctx, h, n)
				if err != nil {
					break
				}
				if resp, err := ss.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}); err == nil && resp.Status == pb.SyncResponse_STATUS_OK {
					served++
				}
				ss.s.Close()
			}
			// The burst is two sessions per shard plus four, plus what comes
			// back (one every 500 ms) while the loop runs.
			if served > 2*protocol.DefaultShardCount+4+10 {
				t.Errorf("%d rapid sessions served", served)
			}
			expectBanned(t, ctx, n, h, "peer_rate")
		})
	})
}
