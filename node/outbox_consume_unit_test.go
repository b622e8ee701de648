package node

import (
	"context"
	"sync"
	"testing"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// cannedHolder is a libp2p host on loopback answering every fetch request
// with the response it is set to.
type cannedHolder struct {
	id   peer.ID
	mu   sync.Mutex
	resp *pb.FetchResponse
}

func newCannedHolder(t *testing.T, n *Node) *cannedHolder {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	c := &cannedHolder{id: h.ID()}
	h.SetStreamHandler(p2pprotocol.ID(protocol.FetchProtocol(n.netID)), func(s network.Stream) {
		defer s.Close()
		var req pb.FetchRequest
		if err := pbio.NewDelimitedReader(s, 4096).ReadMsg(&req); err != nil {
			_ = s.Reset()
			return
		}
		c.mu.Lock()
		resp := c.resp
		c.mu.Unlock()
		_ = pbio.NewDelimitedWriter(s).WriteMsg(resp)
	})
	if err := n.host.Connect(t.Context(), peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}); err != nil {
		t.Fatal(err)
	}
	return c
}

func (c *cannedHolder) answer(r *pb.FetchResponse) { c.mu.Lock(); c.resp = r; c.mu.Unlock() }

// What one holder's KIND_ALL answer says of a consume entry: an answer
// carrying the notice confirms it even truncated and listing a named ref;
// a truncated answer listing none of the refs proves nothing; a complete
// one listing a named ref neither; a complete one listing none, or
// NOT_FOUND, counts once (two distinct holders are needed).
func TestHolderConsumedReadsTheAnswer(t *testing.T) {
	n, _ := lightNode(t, nil)
	devKey := nodetest.SeedKey(74)
	used := protocol.SignBundle(devKey, nowMS(), []byte("used keypackage"))
	other := protocol.SignBundle(devKey, nowMS(), []byte("another keypackage"))
	ref := refOf(t, n, used)
	notice := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{ref})
	e := &storage.OutboxEntry{Kind: storage.OutboxConsume, Key: notice.DeviceID, Payload: notice.Payload, Signature: notice.Signature}
	elsewhere := protocol.SignConsume(devKey, nowMS()+1, []protocol.Ref{refOf(t, n, other)})
	holder := newCannedHolder(t, n)
	ok := pb.FetchResponse_STATUS_OK
	for _, tc := range []struct {
		name string
		resp *pb.FetchResponse
		want consumeSeen
	}{
		{"carries the notice, truncated, listing the ref", &pb.FetchResponse{Status: ok, Error: "truncated: 1 bundles",
			Bundles: []*pb.Bundle{pb.FromBundle(&used)}, Consumed: []*pb.ConsumeNotice{pb.FromConsume(&elsewhere), pb.FromConsume(&notice)}}, consumeHeld},
		{"truncated, none of the refs listed", &pb.FetchResponse{Status: ok, Error: "truncated: 1 of 900 bundles",
			Bundles: []*pb.Bundle{pb.FromBundle(&other)}, Consumed: []*pb.ConsumeNotice{pb.FromConsume(&elsewhere)}}, consumeUnseen},
		{"complete, listing the ref", &pb.FetchResponse{Status: ok, Bundles: []*pb.Bundle{pb.FromBundle(&used)}}, consumeUnseen},
		{"complete, none of the refs listed", &pb.FetchResponse{Status: ok, Bundles: []*pb.Bundle{pb.FromBundle(&other)}}, consumeNoneListed},
		{"not found", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND}, consumeNoneListed},
	} {
		holder.answer(tc.resp)
		got, err := n.holderConsumed(context.Background(), holder.id, e)
		if err != nil || got != tc.want {
			t.Errorf("%s: %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}
	holder.answer(&pb.FetchResponse{Status: ok, Bundles: []*pb.Bundle{pb.FromBundle(&other)}})
	if held, err := n.outboxConsumeHeld(context.Background(), e, []peer.ID{holder.id}); held || err != nil {
		t.Errorf("one holder listing none of the refs confirmed the entry: %v, %v", held, err)
	}
	holder.answer(&pb.FetchResponse{Status: ok, Consumed: []*pb.ConsumeNotice{pb.FromConsume(&notice)}})
	if held, err := n.outboxConsumeHeld(context.Background(), e, []peer.ID{holder.id}); !held || err != nil {
		t.Errorf("a holder carrying the notice did not confirm the entry: %v, %v", held, err)
	}
}
