package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/testnet"
)

func newBundles(n int) ([]protocol.Bundle, error) {
	out := make([]protocol.Bundle, n)
	for i := range out {
		_, dev, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: dev, LastResort: true})
		if err != nil {
			return nil, err
		}
		out[i] = protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
	}
	return out, nil
}

// storedTracker closes a run's channel when every node but the origin has
// stored the run's bundle.
type storedTracker struct {
	mu    sync.Mutex
	ref   protocol.Ref
	left  int
	done  chan struct{}
	nodes int
}

func (t *storedTracker) expect(ref protocol.Ref) chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.ref, t.left, t.done = ref, t.nodes-1, make(chan struct{})
	return t.done
}

func (t *storedTracker) stored(ref protocol.Ref) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if ref != t.ref || t.left == 0 {
		return
	}
	if t.left--; t.left == 0 {
		close(t.done)
	}
}

// propagation: publish on one node to stored on all others, against raw
// gossipsub delivery of the same bytes over the same connection graph.
func propagation(args []string) error {
	fs := flag.NewFlagSet("propagation", flag.ExitOnError)
	count := fs.Int("nodes", 10, "nodes (2..50)")
	runs := fs.Int("runs", 50, "publishes (1..1000)")
	fs.Parse(args)
	if *count < 2 || *count > 50 || *runs < 1 || *runs > 1000 {
		return errors.New("nodes must be 2..50 and runs 1..1000")
	}
	e, err := newEnv(10 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx := e.ctx
	tr := &storedTracker{nodes: *count}
	c, err := e.cluster(testnet.Options{Nodes: *count, Configure: func(_ int, cfg *node.Config) {
		cfg.OnBundleStored = func(_ protocol.Key, ref protocol.Ref) { tr.stored(ref) }
	}})
	if err != nil {
		return err
	}
	defer c.Close()
	bundles, err := newBundles(*runs)
	if err != nil {
		return err
	}
	var got []time.Duration
	for r := range bundles {
		b := &bundles[r]
		info, err := protocol.DefaultPolicy().ValidateBundle(b, time.Now())
		if err != nil {
			return err
		}
		done := tr.expect(info.Ref)
		start := time.Now()
		if err := c.Nodes[r%*count].SubmitBundle(ctx, b); err != nil {
			return err
		}
		select {
		case <-done:
			got = append(got, time.Since(start))
		case <-time.After(10 * time.Second):
			return fmt.Errorf("run %d: not stored on every node within 10 s", r)
		}
	}
	// The same connection graph, raw gossipsub, the same message bytes.
	index := map[peer.ID]int{}
	for i, n := range c.Nodes {
		index[n.PeerID()] = i
	}
	var edges [][2]int
	for i, n := range c.Nodes {
		for _, p := range n.ConnectedPeers() {
			if j, ok := index[p]; ok && i < j {
				edges = append(edges, [2]int{i, j})
			}
		}
	}
	var data [][]byte
	for r := range bundles {
		d, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: &pb.Bundle{
			DeviceId: bundles[r].DeviceID[:], Payload: bundles[r].Payload, Signature: bundles[r].Signature[:]}}})
		data = append(data, d)
	}
	ceiling, err := rawGossip(ctx, *count, edges, data)
	if err != nil {
		return err
	}
	report(fmt.Sprintf("propagation, %d nodes, %d B messages, publish → stored on all", *count, len(data[0])), got, ceiling)
	return nil
}

// rawGossip measures publish → delivered on all other hosts for each
// message, with gossipsub alone (no validation, no store).
func rawGossip(ctx context.Context, n int, edges [][2]int, msgs [][]byte) ([]time.Duration, error) {
	const topicName = "/kpbench/raw"
	hosts := make([]host.Host, n)
	topics := make([]*pubsub.Topic, n)
	arrived := make(chan int, 1024)
	for i := range hosts {
		h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
		if err != nil {
			return nil, err
		}
		defer h.Close()
		hosts[i] = h
		ps, err := pubsub.NewGossipSub(ctx, h, pubsub.WithMessageSignaturePolicy(pubsub.StrictNoSign), pubsub.WithNoAuthor(),
			pubsub.WithMessageIdFn(func(m *pubsubpb.Message) string { s := sha256.Sum256(m.Data); return string(s[:]) }),
			pubsub.WithFloodPublish(true), pubsub.WithValidateQueueSize(8192), pubsub.WithPeerOutboundQueueSize(8192))
		if err != nil {
			return nil, err
		}
		if topics[i], err = ps.Join(topicName); err != nil {
			return nil, err
		}
		sub, err := topics[i].Subscribe(pubsub.WithBufferSize(8192))
		if err != nil {
			return nil, err
		}
		self := h.ID()
		go func() {
			for {
				m, err := sub.Next(ctx)
				if err != nil {
					return
				}
				if m.ReceivedFrom != self {
					arrived <- 1
				}
			}
		}()
	}
	for _, e := range edges {
		a, b := hosts[e[0]], hosts[e[1]]
		if err := a.Connect(ctx, peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()}); err != nil {
			return nil, err
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for i := range topics {
		for len(topics[i].ListPeers()) == 0 {
			if time.Now().After(deadline) {
				return nil, errors.New("raw gossipsub mesh did not form")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	time.Sleep(2 * time.Second) // let the first heartbeats build the mesh, as the cluster had
	var out []time.Duration
	for r, m := range msgs {
		start := time.Now()
		if err := topics[r%n].Publish(ctx, m); err != nil {
			return nil, err
		}
		for left := n - 1; left > 0; left-- {
			select {
			case <-arrived:
			case <-time.After(10 * time.Second):
				return nil, fmt.Errorf("raw run %d: %d hosts never got the message", r, left)
			}
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

// fetchRTT: a fetch of a device's latest bundle between two nodes (new
// stream, request, validated response) against a bare stream echo of the
// same request and response sizes.
func fetchRTT(args []string) error {
	fs := flag.NewFlagSet("fetch", flag.ExitOnError)
	runs := fs.Int("runs", 1000, "round trips (1..100000)")
	fs.Parse(args)
	if *runs < 1 || *runs > 100_000 {
		return errors.New("runs must be 1..100000")
	}
	e, err := newEnv(10 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx := e.ctx
	c, err := e.cluster(testnet.Options{Nodes: 2})
	if err != nil {
		return err
	}
	defer c.Close()
	bundles, err := newBundles(1)
	if err != nil {
		return err
	}
	b := bundles[0]
	if err := c.Nodes[0].SubmitBundle(ctx, &b); err != nil {
		return err
	}
	a, requester := c.Nodes[0].PeerID(), c.Nodes[1]
	var got []time.Duration
	for i := 0; i < *runs+10; i++ {
		start := time.Now()
		if _, err := requester.FetchLatest(ctx, a, b.DeviceID); err != nil {
			return err
		}
		if i >= 10 { // the first round trips open the connection's streams
			got = append(got, time.Since(start))
		}
	}
	req, _ := proto.Marshal(&pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]})
	resp, _ := proto.Marshal(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{{DeviceId: b.DeviceID[:], Payload: b.Payload, Signature: b.Signature[:]}}})
	ceiling, err := echoRTT(ctx, *runs, req, resp)
	if err != nil {
		return err
	}
	report(fmt.Sprintf("fetch round trip, %d B request, %d B response", len(req), len(resp)), got, ceiling)
	return nil
}

// echoRTT: new stream, write req, read resp bytes back, on loopback TCP.
func echoRTT(ctx context.Context, runs int, req, resp []byte) ([]time.Duration, error) {
	const proto = "/kpbench/echo/1.0.0"
	server, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		return nil, err
	}
	defer server.Close()
	client, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		return nil, err
	}
	defer client.Close()
	server.SetStreamHandler(proto, func(s network.Stream) {
		defer s.Close()
		buf := make([]byte, len(req)+8)
		if _, err := io.ReadAtLeast(s, buf, 1); err != nil {
			s.Reset()
			return
		}
		io.Copy(io.Discard, s)
		pbio.NewDelimitedWriter(s).WriteMsg(&pb.Bundle{Payload: resp})
	})
	if err := client.Connect(ctx, peer.AddrInfo{ID: server.ID(), Addrs: server.Addrs()}); err != nil {
		return nil, err
	}
	var out []time.Duration
	for i := 0; i < runs+10; i++ {
		start := time.Now()
		s, err := client.NewStream(ctx, server.ID(), proto)
		if err != nil {
			return nil, err
		}
		if _, err := s.Write(req); err != nil {
			return nil, err
		}
		s.CloseWrite()
		var m pb.Bundle
		if err := pbio.NewDelimitedReader(s, 1<<20).ReadMsg(&m); err != nil {
			return nil, err
		}
		s.Close()
		if i >= 10 {
			out = append(out, time.Since(start))
		}
	}
	return out, nil
}

func ed25519Key() ed25519.PrivateKey {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}
