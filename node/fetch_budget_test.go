package node

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/ed25519strict"
	"github.com/kpnode/kpnode/protocol/pb"
)

// fetchPeer is a bare libp2p host on loopback connected to n: a peer that
// sends its own bytes on n's fetch protocol.
type fetchPeer struct {
	h  host.Host
	id peer.ID
	n  *Node
}

func newFetchPeer(t testing.TB, n *Node) *fetchPeer {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	ai := peer.AddrInfo{ID: n.PeerID(), Addrs: n.host.Addrs()}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.Connect(ctx, ai); err != nil {
		t.Fatal(err)
	}
	return &fetchPeer{h: h, id: ai.ID, n: n}
}

func (p *fetchPeer) open(ctx context.Context) (network.Stream, error) {
	return p.h.NewStream(ctx, p.id, p.n.fetch.proto)
}

// raw sends raw bytes as one stream's whole request and returns what the
// node answered before it ended the stream, and how it ended it.
func (p *fetchPeer) raw(t testing.TB, ctx context.Context, req []byte) (answer []byte, err error) {
	t.Helper()
	s, err := p.open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := s.Write(req); err != nil {
		return nil, err
	}
	_ = s.CloseWrite()
	return io.ReadAll(s)
}

// fetch sends one request and decodes the one response.
func (p *fetchPeer) fetch(ctx context.Context, req *pb.FetchRequest) (*pb.FetchResponse, int, error) {
	s, err := p.open(ctx)
	if err != nil {
		return nil, 0, err
	}
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(10 * time.Second))
	if err := pbio.NewDelimitedWriter(s).WriteMsg(req); err != nil {
		return nil, 0, err
	}
	_ = s.CloseWrite()
	raw, err := io.ReadAll(s)
	if err != nil {
		return nil, 0, err
	}
	length, k := binary.Uvarint(raw)
	if k <= 0 || int(length) != len(raw)-k {
		return nil, 0, errors.New("response is not one length-prefixed message")
	}
	var resp pb.FetchResponse
	if err := proto.Unmarshal(raw[k:], &resp); err != nil {
		return nil, 0, err
	}
	return &resp, len(raw) - k, nil
}

func delimited(t testing.TB, msgs ...proto.Message) []byte {
	t.Helper()
	var out []byte
	for _, m := range msgs {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out = binary.AppendUvarint(out, uint64(len(b)))
		out = append(out, b...)
	}
	return out
}

// notAPoint returns 32 bytes that do not decode as an Ed25519 point.
func notAPoint(t testing.TB) []byte {
	t.Helper()
	for i := 0; i < 1000; i++ {
		k := make([]byte, 32)
		rand.Read(k)
		if _, err := ed25519strict.DecodePoint(k); err != nil {
			return k
		}
	}
	t.Fatal("no non-point found")
	return nil
}

// Every request the spec names gets the status the spec gives it
// (protocol/README.md, "Fetch").
func TestFetchStatusesFollowTheSpec(t *testing.T) {
	n, _ := testNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	b := protocol.SignBundle(dev, nowMS(), []byte("kp"))
	if err := n.SubmitBundle(ctx, &b); err != nil {
		t.Fatal(err)
	}
	p := newFetchPeer(t, n)
	unknown, _, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name string
		req  *pb.FetchRequest
		want pb.FetchResponse_Status
	}{
		{"latest", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]}, pb.FetchResponse_STATUS_OK},
		{"all", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: b.DeviceID[:]}, pb.FetchResponse_STATUS_OK},
		{"unknown device", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: unknown}, pb.FetchResponse_STATUS_NOT_FOUND},
		{"unknown account", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: unknown}, pb.FetchResponse_STATUS_NOT_FOUND},
		{"KIND_UNSPECIFIED", &pb.FetchRequest{Key: b.DeviceID[:]}, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"unknown kind", &pb.FetchRequest{Kind: 42, Key: b.DeviceID[:]}, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"empty request", &pb.FetchRequest{}, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"short key", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:31]}, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"key not a point (no record can have it)", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: notAPoint(t)}, pb.FetchResponse_STATUS_NOT_FOUND},
		{"account key not a point", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: notAPoint(t)}, pb.FetchResponse_STATUS_NOT_FOUND},
	} {
		resp, _, err := p.fetch(ctx, tc.req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if resp.Status != tc.want {
			t.Errorf("%s: status %v (%q), want %v", tc.name, resp.Status, resp.Error, tc.want)
		}
	}

	// An empty request is a zero length prefix: answered BAD_REQUEST.
	if got, err := p.raw(t, ctx, []byte{0}); err != nil || !bytes.Equal(got, delimited(t, &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BAD_REQUEST, Error: "unknown request kind"})) {
		t.Errorf("zero-length request: answer %x, err %v", got, err)
	}
	// No request at all (the requester closes at once): no answer.
	if got, _ := p.raw(t, ctx, nil); len(got) != 0 {
		t.Errorf("no request: answered %d bytes", len(got))
	}

	// A non-minimal length prefix (36 as 0xa4 0x00) ends the stream unanswered.
	m, _ := proto.Marshal(&pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]})
	if got, _ := p.raw(t, ctx, append([]byte{byte(len(m)) | 0x80, 0}, m...)); len(got) != 0 {
		t.Errorf("non-minimal prefix: answered %d bytes", len(got))
	}

	// Two requests on one stream: the first is answered, the second is
	// discarded unread, and the stream ends after one response.
	latest := &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]}
	got, err := p.raw(t, ctx, delimited(t, latest, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: unknown}))
	if err != nil {
		t.Fatalf("two requests: %v", err)
	}
	length, k := binary.Uvarint(got)
	if k <= 0 || int(length) != len(got)-k {
		t.Fatalf("two requests: %d bytes are not exactly one response", len(got))
	}
	var resp pb.FetchResponse
	if err := proto.Unmarshal(got[k:], &resp); err != nil || resp.Status != pb.FetchResponse_STATUS_OK || len(resp.Bundles) != 1 {
		t.Fatalf("two requests: first answer %v, %v", resp.Status, err)
	}

	// The 256-byte cap counts the request message, not its length prefix:
	// 256 bytes (padded with an unknown field) are answered, 257 are not.
	padded := func(size int) []byte {
		m, _ := proto.Marshal(latest)
		pad := size - len(m) - 3 // field 15, bytes: 1-byte tag, 2-byte length
		m = append(m, 15<<3|2)
		m = binary.AppendUvarint(m, uint64(pad))
		m = append(m, make([]byte, pad)...)
		if len(m) != size {
			t.Fatalf("padded request of %d bytes, want %d", len(m), size)
		}
		return append(binary.AppendUvarint(nil, uint64(size)), m...)
	}
	if got, err := p.raw(t, ctx, padded(maxFetchRequest)); err != nil || len(got) == 0 {
		t.Errorf("request of exactly %d bytes: answer of %d bytes, err %v", maxFetchRequest, len(got), err)
	}
	if got, _ := p.raw(t, ctx, padded(maxFetchRequest+1)); len(got) != 0 {
		t.Errorf("request of %d bytes: answered %d bytes", maxFetchRequest+1, len(got))
	}
}

// storeLargeBundles stores count bundles of size-byte payloads for one
// new device, oldest first, and returns the device and its bundles.
func storeLargeBundles(t testing.TB, n *Node, count, size int) (protocol.Key, []protocol.Bundle) {
	t.Helper()
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	start := nowMS() - uint64(count)*1000
	var out []protocol.Bundle
	for i := 0; i < count; i++ {
		kp := make([]byte, size-protocol.TimestampSize)
		rand.Read(kp)
		b := protocol.SignBundle(dev, start+uint64(i)*1000, kp)
		if err := n.SubmitBundle(context.Background(), &b); err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out[0].DeviceID, out
}

// KIND_ALL for a device with 100 bundles of 60 KB answers the newest that
// fit in 1 MiB, says it cut the rest, and fits the requester's read cap.
func TestFetchAllIsCutAtTheResponseCap(t *testing.T) {
	n, _ := testNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dev, bundles := storeLargeBundles(t, n, 100, 60_000)
	p := newFetchPeer(t, n)
	resp, size, err := p.fetch(ctx, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: dev[:]})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != pb.FetchResponse_STATUS_OK || size > maxFetchResponse {
		t.Fatalf("status %v, %d bytes (cap %d)", resp.Status, size, maxFetchResponse)
	}
	want := (maxFetchResponse - fetchResponseReserve) / (60_000 + 110)
	if len(resp.Bundles) != want || !strings.HasPrefix(resp.Error, "truncated: 17 ") {
		t.Fatalf("%d bundles, error %q; want %d and a truncation note", len(resp.Bundles), resp.Error, want)
	}
	for i, b := range resp.Bundles {
		if !bytes.Equal(b.Payload, bundles[len(bundles)-1-i].Payload) {
			t.Fatalf("bundle %d is not the %d-th newest", i, i+1)
		}
	}
	// The node's own requester reads it whole.
	peerNode, _ := testNode(t, nil)
	if err := peerNode.host.Connect(ctx, peer.AddrInfo{ID: n.PeerID(), Addrs: n.host.Addrs()}); err != nil {
		t.Fatal(err)
	}
	got, err := peerNode.fetch.request(ctx, n.PeerID(), &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: dev[:]})
	if err != nil || len(got.Bundles) != want {
		t.Fatalf("requester: %v, %d bundles", err, len(got.Bundles))
	}
}

// A flood of KIND_ALL requests from hostile peers, each asking for a
// device with 100 large bundles, never holds more response bytes than the
// budget: requests beyond it are answered BUSY at once, and honest point
// fetches keep being answered OK throughout.
func TestFetchFloodStaysWithinTheBudget(t *testing.T) {
	n, _ := testNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dev, _ := storeLargeBundles(t, n, 100, 60_000)
	_, small, _ := ed25519.GenerateKey(rand.Reader)
	honestBundle := protocol.SignBundle(small, nowMS(), []byte("honest"))
	if err := n.SubmitBundle(ctx, &honestBundle); err != nil {
		t.Fatal(err)
	}
	f := n.fetch
	f.peak.Store(0)

	const attackers, perAttacker, streams = 3, 100, 16
	var mu sync.Mutex
	counts := map[pb.FetchResponse_Status]int{}
	var wg sync.WaitGroup
	for a := 0; a < attackers; a++ {
		p := newFetchPeer(t, n)
		var next sync.Mutex
		left := perAttacker
		for w := 0; w < streams; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					next.Lock()
					if left == 0 {
						next.Unlock()
						return
					}
					left--
					next.Unlock()
					resp, size, err := p.fetch(ctx, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: dev[:]})
					mu.Lock()
					switch {
					case err != nil:
						counts[-1]++
					case size > maxFetchResponse:
						t.Errorf("response of %d bytes", size)
					default:
						counts[resp.Status]++
					}
					mu.Unlock()
				}
			}()
		}
	}
	// An honest peer keeps fetching while the flood runs.
	honest := newFetchPeer(t, n)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	honestOK := 0
	for {
		select {
		case <-done:
		default:
			resp, _, err := honest.fetch(ctx, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: honestBundle.DeviceID[:]})
			if err != nil || resp.Status != pb.FetchResponse_STATUS_OK {
				t.Fatalf("honest fetch during the flood: %v %v", resp.GetStatus(), err)
			}
			honestOK++
			continue
		}
		break
	}
	budget := max(int64(fetchBulkBudget), f.allWeight)
	t.Logf("statuses %v; honest fetches %d; peak in flight %d bytes of a %d-byte bulk budget", counts, honestOK, f.peak.Load(), budget)
	if f.peak.Load() > budget+fetchPointBudget {
		t.Fatalf("peak %d bytes in flight, over the budget", f.peak.Load())
	}
	if counts[pb.FetchResponse_STATUS_BUSY] == 0 || counts[pb.FetchResponse_STATUS_OK] == 0 {
		t.Fatalf("statuses %v: want some OK and some BUSY", counts)
	}
	// Handlers release their reservation once their answer is written.
	for f.inflight.Load() != 0 {
		if ctx.Err() != nil {
			t.Fatalf("%d bytes still reserved after the flood", f.inflight.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// close waits for handlers in flight, and ends those blocked on a peer
// that never sends its request, long before their stream deadline.
func TestFetchCloseEndsHandlersInFlight(t *testing.T) {
	n, _ := testNode(t, func(c *Config) { c.StreamTimeout = time.Minute })
	p := newFetchPeer(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := p.open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte{0x10}); err != nil { // a prefix promising 16 bytes, never sent
		t.Fatal(err)
	}
	// Wait until the node's handler has the stream.
	for !nodeHasStream(n, p.h.ID()) {
		if ctx.Err() != nil {
			t.Fatal("the node never took the stream")
		}
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	closed := make(chan struct{})
	go func() { n.fetch.close(); close(closed) }()
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("close did not return while a handler waited for its request")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("close took %v", d)
	}
}

func nodeHasStream(n *Node, from peer.ID) bool {
	for _, c := range n.host.Network().ConnsToPeer(from) {
		for _, s := range c.GetStreams() {
			if s.Protocol() == n.fetch.proto {
				return true
			}
		}
	}
	return false
}
