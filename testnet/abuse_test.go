package testnet

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/libp2p/go-libp2p"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// rawHost is a bare libp2p host on loopback, standing in for a peer that
// does not run kpnode's validation: the hostile peer of these tests.
func rawHost(t *testing.T) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func connectTo(t *testing.T, ctx context.Context, h host.Host, n *node.Node) peer.ID {
	t.Helper()
	addrs, err := n.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	ai, err := peer.AddrInfoFromString(addrs[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Connect(ctx, *ai); err != nil {
		t.Fatal(err)
	}
	return ai.ID
}

func gossipData(t *testing.T, b *protocol.Bundle) []byte {
	t.Helper()
	data, err := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: &pb.Bundle{
		DeviceId: b.DeviceID[:], Payload: b.Payload, Signature: b.Signature[:]}}})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// A peer that floods invalid messages is graylisted by the node it floods,
// while valid bundles keep reaching every honest node.
//
// The network is simulated, in virtual time, so waiting for the periodic
// sync costs no wall time.
func TestInvalidFloodIsGraylisted(t *testing.T) {
	synctest.Test(t, invalidFloodIsGraylisted)
}

func invalidFloodIsGraylisted(t *testing.T) {
	var mu sync.Mutex
	scores := map[peer.ID]float64{}
	nw := startSim(t, simnet.Options{Full: 3, ShardCount: protocol.DefaultShardCount, NodeConfig: func(i int, cfg *node.Config) {
		cfg.Shards = protocol.AllShards(protocol.DefaultShardCount)
		if i == 1 {
			cfg.PeerScoreInspect = func(m map[peer.ID]float64) {
				mu.Lock()
				defer mu.Unlock()
				for p, s := range m {
					scores[p] = s
				}
			}
		}
	}})
	var nodes []*node.Node
	for _, n := range nw.Nodes {
		nodes = append(nodes, n.Node)
	}
	// Long enough for the periodic sync (30 s ± 20 %) to repair what gossip
	// did not deliver, which is the network's guarantee (below).
	ctx, cancel := context.WithTimeout(context.Background(), 75*time.Second)
	defer cancel()
	victim := nodes[1]

	h := simHost(t, nw)
	ps, err := pubsub.NewGossipSub(ctx, h,
		pubsub.WithMessageSignaturePolicy(pubsub.StrictNoSign), pubsub.WithNoAuthor(),
		pubsub.WithMessageIdFn(func(m *pubsubpb.Message) string { s := sha256.Sum256(m.Data); return string(s[:]) }))
	if err != nil {
		t.Fatal(err)
	}
	connectTo(t, ctx, h, victim)
	const shard = 0
	topic, err := ps.Join(protocol.BundleTopic(victim.NetworkID(), shard))
	if err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { return len(topic.ListPeers()) > 0 }); err != nil {
		t.Fatal("the victim's subscription never reached the attacker")
	}
	publish := func(data []byte) {
		t.Helper()
		if err := topic.Publish(ctx, data); err != nil {
			t.Fatal(err)
		}
	}

	// Before the flood the attacker is an ordinary peer: its valid bundle is taken.
	before := bundleFor(t, deviceInShard(t, shard, protocol.DefaultShardCount))
	publish(gossipData(t, &before))
	if err := waitServed(ctx, victim, before); err != nil {
		t.Fatalf("valid bundle from a fresh peer: %v", err)
	}

	// The flood: undecodable bytes and well-formed bundles with bad signatures.
	for i := 0; i < 20; i++ {
		junk := make([]byte, 200)
		rand.Read(junk)
		publish(junk)
		forged := bundleFor(t, deviceInShard(t, shard, protocol.DefaultShardCount))
		forged.Signature[7] ^= 0x40
		publish(gossipData(t, &forged))
	}
	attacker := h.ID()
	if err := eventually(ctx, func() bool {
		mu.Lock()
		defer mu.Unlock()
		s, ok := scores[attacker]
		return ok && s < -400
	}); err != nil {
		mu.Lock()
		t.Fatalf("attacker not graylisted: score %v", scores[attacker])
		mu.Unlock()
	}

	// Graylisted: even a valid bundle from the attacker is ignored, while an
	// honest peer's bundle, published after it, reaches every node.
	after := bundleFor(t, deviceInShard(t, shard, protocol.DefaultShardCount))
	publish(gossipData(t, &after))
	honest := bundleFor(t, deviceInShard(t, shard, protocol.DefaultShardCount))
	if err := nodes[2].SubmitBundle(ctx, &honest); err != nil {
		t.Fatal(err)
	}
	for i, n := range nodes {
		if err := waitServed(ctx, n, honest); err != nil {
			t.Fatalf("node %d: honest traffic stopped: %v", i, err)
		}
	}
	if got, _ := victim.Bundles(ctx, after.DeviceID); len(got) != 0 {
		t.Fatal("the victim still accepts messages from a graylisted peer")
	}
	// The pre-flood bundle reaches every holder: at once through the mesh,
	// through gossip's IHAVE/IWANT when a node was not yet in the victim's
	// mesh when it arrived, or at the latest through the periodic sync.
	for i, n := range nodes {
		if !n.Shards().Has(shard) {
			continue
		}
		if err := waitServed(ctx, n, before); err != nil {
			t.Fatalf("node %d: the pre-flood bundle did not spread: %v", i, err)
		}
	}
}

// The fetch server survives truncated, oversized and never-ending requests
// and keeps answering honest ones.
func TestFetchServerSurvivesHostileStreams(t *testing.T) {
	c := startCluster(t, 1, func(_ int, cfg *node.Config) { cfg.StreamTimeout = 300 * time.Millisecond })
	n := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, _ := newBundle(t)
	if err := n.SubmitBundle(ctx, &b); err != nil {
		t.Fatal(err)
	}
	h := rawHost(t)
	id := connectTo(t, ctx, h, n)
	proto := p2pprotocol.ID(protocol.FetchProtocol(n.NetworkID()))
	open := func() network.Stream {
		t.Helper()
		s, err := h.NewStream(ctx, id, proto)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// expectClosed reads until the server ends the stream, which it must do
	// without answering.
	expectClosed := func(name string, s network.Stream) {
		t.Helper()
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(s)
		if len(got) != 0 || (err != nil && errors.Is(err, context.DeadlineExceeded)) {
			t.Fatalf("%s: server answered %d bytes, err %v", name, len(got), err)
		}
		var ne interface{ Timeout() bool }
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("%s: server never closed the stream", name)
		}
	}

	// Truncated: a length prefix promising 100 bytes, then 10, then EOF.
	s := open()
	s.Write(append(binary.AppendUvarint(nil, 100), make([]byte, 10)...))
	s.CloseWrite()
	expectClosed("truncated", s)

	// Oversized: a length prefix of 1 GiB.
	s = open()
	s.Write(binary.AppendUvarint(nil, 1<<30))
	expectClosed("oversized", s)

	// Never-ending: a request that never finishes, many at once; the server
	// drops them at its deadline.
	var hung []network.Stream
	for i := 0; i < 8; i++ {
		s := open()
		s.Write([]byte{0x10, 0x08})
		hung = append(hung, s)
	}
	// Garbage that is not protobuf.
	s = open()
	s.Write(append(binary.AppendUvarint(nil, 5), 0xff, 0xff, 0xff, 0xff, 0xff))
	s.CloseWrite()
	expectClosed("garbage", s)

	// An honest request from another peer is answered meanwhile.
	honest := rawHost(t)
	hid := connectTo(t, ctx, honest, n)
	hs, err := honest.NewStream(ctx, hid, proto)
	if err != nil {
		t.Fatal(err)
	}
	if err := pbio.NewDelimitedWriter(hs).WriteMsg(&pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]}); err != nil {
		t.Fatal(err)
	}
	hs.CloseWrite()
	var resp pb.FetchResponse
	if err := pbio.NewDelimitedReader(hs, 1<<20).ReadMsg(&resp); err != nil {
		t.Fatal(err)
	}
	if resp.Status != pb.FetchResponse_STATUS_OK || len(resp.Bundles) != 1 || !bytes.Equal(resp.Bundles[0].Payload, b.Payload) {
		t.Fatalf("honest fetch: %v", resp.Status)
	}
	for i, s := range hung {
		expectClosed("never-ending "+string(rune('0'+i)), s)
	}
}
