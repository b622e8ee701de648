package testnet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"net/http"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// scoreBoard keeps the latest gossipsub score a node gives each peer.
type scoreBoard struct {
	mu     sync.Mutex
	scores map[peer.ID]float64
	lowest map[peer.ID]float64
}

func newScoreBoard() *scoreBoard {
	return &scoreBoard{scores: map[peer.ID]float64{}, lowest: map[peer.ID]float64{}}
}

func (b *scoreBoard) inspect(m map[peer.ID]float64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for p, s := range m {
		b.scores[p] = s
		if l, ok := b.lowest[p]; !ok || s < l {
			b.lowest[p] = s
		}
	}
}

func (b *scoreBoard) score(p peer.ID) (float64, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.scores[p]
	return s, ok
}

func (b *scoreBoard) min(p peer.ID) (float64, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.lowest[p]
	return s, ok
}

// gossipAttacker is a raw gossipsub host that reads and sends RPCs of up
// to 4 MiB, connected to one node and joined to one of its bundle topics.
type gossipAttacker struct {
	id    peer.ID
	topic *pubsub.Topic
}

// newGossipAttacker runs gossipsub on the raw host h.
func newGossipAttacker(t *testing.T, ctx context.Context, h host.Host, victim *node.Node, shard int, opts ...pubsub.Option) *gossipAttacker {
	t.Helper()
	ps, err := pubsub.NewGossipSub(ctx, h, append([]pubsub.Option{
		pubsub.WithMessageSignaturePolicy(pubsub.StrictNoSign), pubsub.WithNoAuthor(),
		pubsub.WithMaxMessageSize(4 << 20),
		pubsub.WithMessageIdFn(func(m *pubsubpb.Message) string { s := sha256.Sum256(m.Data); return string(s[:]) })}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	connectTo(t, ctx, h, victim)
	topic, err := ps.Join(protocol.BundleTopic(victim.NetworkID(), shard))
	if err != nil {
		t.Fatal(err)
	}
	if err := eventually(ctx, func() bool { return len(topic.ListPeers()) > 0 }); err != nil {
		t.Fatal("the victim's subscription never reached the attacker")
	}
	return &gossipAttacker{id: h.ID(), topic: topic}
}

func (a *gossipAttacker) publish(t *testing.T, ctx context.Context, b *protocol.Bundle) {
	t.Helper()
	if err := a.topic.Publish(ctx, gossipData(t, b)); err != nil {
		t.Fatal(err)
	}
}

// signedBundle is a correctly signed bundle, in shard, whose payload is
// size bytes (an opaque KeyPackage: the network runs --mls-validation=off).
func signedBundle(t *testing.T, shard, size int) protocol.Bundle {
	t.Helper()
	dev := deviceInShard(t, shard, protocol.DefaultShardCount)
	kp := make([]byte, size-protocol.TimestampSize)
	rand.Read(kp)
	return protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
}

// heldBy reports how many nodes store a bundle of b's device.
func heldBy(ctx context.Context, nodes []*node.Node, b protocol.Bundle) int {
	held := 0
	for _, n := range nodes {
		if got, _ := n.Bundles(ctx, b.DeviceID); len(got) > 0 {
			held++
		}
	}
	return held
}

// Problem 3 (gossip): a correctly signed bundle over the 64 KiB payload cap
// is refused whatever its size, is neither stored nor forwarded, and costs
// its sender score; one under the cap is stored and forwarded. A message
// just over the cap reaches the validator and is Rejected by the rule; one
// whose RPC is over the node's RPC cap (70 KB, 2 MB) is refused unread and
// its sender is cut off.
//
// The network is simulated, in virtual time.
func TestGossipRefusesBundlesOverThePayloadCap(t *testing.T) {
	synctest.Test(t, gossipRefusesBundlesOverThePayloadCap)
}

func gossipRefusesBundlesOverThePayloadCap(t *testing.T) {
	board := newScoreBoard()
	nw := startSim(t, simnet.Options{Full: 3, ShardCount: protocol.DefaultShardCount, MLS: protocol.MLSOff,
		NodeConfig: func(i int, cfg *node.Config) {
			cfg.Shards = protocol.AllShards(protocol.DefaultShardCount)
			if i == 1 {
				cfg.PeerScoreInspect = board.inspect
			}
		}})
	var nodes []*node.Node
	for _, n := range nw.Nodes {
		nodes = append(nodes, n.Node)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	victim := nodes[1]
	const shard = 0

	// 60 KB: under the cap, stored by the victim and forwarded to the others.
	a := newGossipAttacker(t, ctx, simHost(t, nw), victim, shard)
	ok := signedBundle(t, shard, 60_000)
	a.publish(t, ctx, &ok)
	for i, n := range nodes {
		if err := waitServed(ctx, n, ok); err != nil {
			t.Fatalf("node %d: 60 KB bundle: %v", i, err)
		}
	}

	// Just over the cap (66,000 bytes): the validator Rejects it by rule
	// payload_too_large, and the sender's score drops below zero.
	over := signedBundle(t, shard, 66_000)
	a.publish(t, ctx, &over)
	series := `kpnode_bundles_rejected_total{reason="payload_too_large",source="gossip"}`
	if err := eventually(ctx, func() bool { return metricValue(t, victim, series) >= 1 }); err != nil {
		t.Fatalf("66 KB bundle not rejected by payload_too_large")
	}
	if err := eventually(ctx, func() bool { s, ok := board.score(a.id); return ok && s < 0 }); err != nil {
		s, _ := board.score(a.id)
		t.Fatalf("sender of a 66 KB bundle keeps score %v", s)
	}

	// 70 KB and 2 MB: their RPCs are over the node's RPC cap; refused before
	// they are read, and the sender is cut off (banned, score far below the
	// graylist threshold).
	for _, size := range []int{70_008, 2 << 20} {
		a := newGossipAttacker(t, ctx, simHost(t, nw), victim, shard)
		b := signedBundle(t, shard, size)
		before := metricValue(t, victim, `kpnode_peer_penalties_total{protocol="gossip",reason="rpc_too_large"}`)
		a.publish(t, ctx, &b)
		if err := eventually(ctx, func() bool {
			return metricValue(t, victim, `kpnode_peer_penalties_total{protocol="gossip",reason="rpc_too_large"}`) > before
		}); err != nil {
			t.Fatalf("%d-byte bundle: sender not cut off", size)
		}
		if err := eventually(ctx, func() bool { s, ok := board.score(a.id); return ok && s < -400 }); err != nil {
			s, _ := board.score(a.id)
			t.Fatalf("%d-byte bundle: sender keeps score %v", size, s)
		}
		if err := eventually(ctx, func() bool {
			for _, p := range victim.ConnectedPeers() {
				if p == a.id {
					return false
				}
			}
			return true
		}); err != nil {
			t.Fatalf("%d-byte bundle: sender still connected", size)
		}
		if got := heldBy(ctx, nodes, b); got != 0 {
			t.Fatalf("%d-byte bundle stored on %d nodes", size, got)
		}
	}
	// Honest traffic still flows (a fresh bundle reaches every node), and
	// nothing over the cap was stored anywhere.
	honest := signedBundle(t, shard, 3000)
	if err := nodes[2].SubmitBundle(ctx, &honest); err != nil {
		t.Fatal(err)
	}
	for i, n := range nodes {
		if err := waitServed(ctx, n, honest); err != nil {
			t.Fatalf("node %d: honest bundle after the attack: %v", i, err)
		}
	}
	if got := heldBy(ctx, nodes, over); got != 0 {
		t.Fatalf("66 KB bundle stored on %d nodes", got)
	}
}

// Problem 3 (HTTP): a 70 KB payload is a 400 naming the rule.
func TestHTTPRefusesBundlesOverThePayloadCap(t *testing.T) {
	c := startCluster(t, 1, func(_ int, cfg *node.Config) { cfg.Policy.MLS = protocol.MLSOff })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	api := httpapi.NewClient(c.Nodes[0].APIAddr().String(), &http.Client{Timeout: 10 * time.Second})
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	kp := make([]byte, 70_000)
	b := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
	err := api.PublishBundle(ctx, &b)
	var se *httpapi.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusBadRequest || se.Message != "payload: 70008 bytes is larger than the maximum of 65536" {
		t.Fatalf("70 KB payload: %v", err)
	}
	if got, _ := c.Nodes[0].Bundles(ctx, b.DeviceID); len(got) != 0 {
		t.Fatal("stored anyway")
	}
}

// A peer that pushes more message bytes than its inbound budget (32 MiB at
// once, 4 MiB/s after) has its RPCs dropped unread, even when every message
// is valid: here one valid 60 KB bundle sent 3,000 times in raw gossipsub
// RPCs (the budget charges what arrives, before deduplication). It is not
// banned (an honest forwarder of a burst must not be), and the node keeps
// taking honest bundles.
func TestGossipPeerOverItsByteBudgetIsThrottled(t *testing.T) {
	c := startCluster(t, 2, func(i int, cfg *node.Config) { cfg.Policy.MLS = protocol.MLSOff })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	victim := c.Nodes[1]
	const shard = 0
	h := rawHost(t)
	id := connectTo(t, ctx, h, victim)
	s, err := h.NewStream(ctx, id, "/meshsub/1.1.0")
	if err != nil {
		t.Fatal(err)
	}
	b := signedBundle(t, shard, 60_000)
	topic := protocol.BundleTopic(victim.NetworkID(), shard)
	rpc := &pubsubpb.RPC{Publish: []*pubsubpb.Message{{Data: gossipData(t, &b), Topic: &topic}}}
	w := pbio.NewDelimitedWriter(s)
	for sent := 0; sent < 3000; sent++ {
		if err := w.WriteMsg(rpc); err != nil {
			t.Fatalf("stream closed after %d RPCs: %v", sent, err)
		}
	}
	series := `kpnode_gossip_rpcs_refused_total{reason="inbound_bytes"}`
	if err := eventually(ctx, func() bool { return metricValue(t, victim, series) >= 1 }); err != nil {
		t.Fatal("no RPC over the byte budget was dropped")
	}
	if got := metricValue(t, victim, `kpnode_peer_penalties_total{protocol="gossip",reason="inbound_bytes"}`); got != 0 {
		t.Fatalf("a peer over its byte budget was banned (%v)", got)
	}
	honest := signedBundle(t, shard, 3000)
	if err := c.Nodes[0].SubmitBundle(ctx, &honest); err != nil {
		t.Fatal(err)
	}
	if err := waitServed(ctx, victim, honest); err != nil {
		t.Fatalf("honest bundle after the flood: %v", err)
	}
}
