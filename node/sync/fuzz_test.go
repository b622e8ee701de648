package sync

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// frame prefixes data with its length, as pbio's delimited writer does.
func frame(data []byte) []byte {
	return append(binary.AppendUvarint(nil, uint64(len(data))), data...)
}

// FuzzSyncRequest: any request a peer can send, decodable or not, is
// answered (or refused) by a Responder over net.Pipe without panicking,
// from a real store, in a fresh session and as a second round. A refusal
// with BAD_REQUEST is a violation, and a violation penalizes.
func FuzzSyncRequest(f *testing.F) {
	seed, _ := proto.Marshal(&pb.SyncRequest{Shard: 0, Ranges: []*pb.SyncRange{{Count: 3, Fingerprint: make([]byte, 16)}, {Prefix: []byte{7}}},
		Want: []*pb.SyncListing{{Prefix: []byte{1, 2}, Ids: []uint64{1, 2, 3}}}})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.SyncRequest{Shard: 300, Set: 5})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.SyncRequest{Want: []*pb.SyncListing{{Ids: []uint64{1}}, {Ids: []uint64{2}}}})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}})
	f.Add(seed)
	f.Add([]byte{0xff, 0xff})
	seed, _ = proto.Marshal(&pb.SyncRequest{Set: pb.SyncRequest_SET_NOTICES, Ranges: []*pb.SyncRange{{Count: 1, Fingerprint: make([]byte, 16)}}})
	f.Add(seed)
	s := newSide(f, time.Second)
	for range 80 {
		s.putBundles(f, newBundle(0))
	}
	s.putNotices(f, 20)
	f.Fuzz(func(t *testing.T, data []byte) {
		s.pen.reset()
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		a, b := net.Pipe()
		defer a.Close()
		done := make(chan error, 1)
		go func() {
			done <- NewResponder(s.local, "fuzz").Run(ctx, b)
			b.Close()
		}()
		ri := newRawInitiator(a)
		bad := false
		for range 2 {
			_ = a.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := a.Write(frame(data)); err != nil {
				break
			}
			var resp pb.SyncResponse
			if err := ri.r.ReadMsg(&resp); err != nil {
				break
			}
			if resp.Status == pb.SyncResponse_STATUS_UNSPECIFIED {
				t.Fatal("no status")
			}
			if resp.Status != pb.SyncResponse_STATUS_OK {
				bad = resp.Status == pb.SyncResponse_STATUS_BAD_REQUEST
				break
			}
		}
		a.Close()
		err := <-done
		violation := errors.Is(err, ErrViolation)
		if bad && !violation {
			t.Fatalf("BAD_REQUEST answered, session ended with %v", err)
		}
		if p := s.pen.list(); violation != (len(p) == 1) {
			t.Fatalf("session ended with %v, penalties %v", err, p)
		}
	})
}

// FuzzSyncResponse: an Initiator over net.Pipe, answered every round with
// the same bytes (decodable or not), never panics, keeps its queues within
// their budgets, and never sends a request beyond the responder's limits.
// A violation penalizes, and only a violation does.
func FuzzSyncResponse(f *testing.F) {
	seed, _ := proto.Marshal(&pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK,
		Ranges:   []*pb.SyncRange{{Prefix: []byte{1}, Count: 70, Fingerprint: make([]byte, 16)}, {Prefix: make([]byte, 40)}},
		Listings: []*pb.SyncListing{{Prefix: []byte{3}, Ids: []uint64{9}}},
		Bundles:  []*pb.Bundle{{DeviceId: make([]byte, 32), Payload: []byte("12345678"), Signature: make([]byte, 64)}}})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK, Listings: []*pb.SyncListing{{Ids: []uint64{1, 2, 3, 4}}}})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK, Truncated: true})
	f.Add(seed)
	f.Add([]byte{0x08})
	dev := keyIn(0)
	_, nodeKey, _ := ed25519.GenerateKey(rand.Reader)
	claim := protocol.SignClaim(nodeKey, uint64(time.Now().UnixMilli()), protocol.Key(dev.Public().(ed25519.PublicKey)), protocol.Ref{1})
	consume := protocol.SignConsume(dev, uint64(time.Now().UnixMilli()), []protocol.Ref{{1}, {2}})
	seed, _ = proto.Marshal(&pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK,
		Listings: []*pb.SyncListing{{Ids: []uint64{noticeID(claimNotice(claim)), noticeID(consumeNotice(consume))}}},
		Notices:  []*pb.Notice{claimNotice(claim), consumeNotice(consume), {}}})
	f.Add(seed)
	s := newSide(f, time.Second)
	for range 10 {
		s.putBundles(f, newBundle(0))
	}
	s.putNotices(f, 5)
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, set := range []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_NOTICES} {
			fuzzInitiator(t, s, set, data)
		}
	})
}

// fuzzInitiator runs one session of FuzzSyncResponse on set.
func fuzzInitiator(t *testing.T, s *side, set pb.SyncRequest_Set, data []byte) {
	{
		s.pen.reset()
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		a, c := net.Pipe()
		defer a.Close()
		reqs := make(chan []*pb.SyncRequest, 1)
		go func() {
			defer c.Close()
			ri := newRawInitiator(c) // reads requests, writes raw answers
			var got []*pb.SyncRequest
			defer func() { reqs <- got }()
			for range 16 {
				var req pb.SyncRequest
				if ri.r.ReadMsg(&req) != nil {
					return
				}
				got = append(got, &req)
				if _, err := c.Write(frame(data)); err != nil {
					return
				}
			}
		}()
		in := NewInitiator(s.local, "fuzz", 0, set)
		err := in.Run(ctx, a)
		a.Close()
		if in.npend > maxPending || len(in.queue) > maxSessionRanges {
			t.Fatalf("pending %d, queue %d", in.npend, len(in.queue))
		}
		for _, req := range <-reqs {
			ids := 0
			for _, l := range req.Want {
				ids += len(l.Ids)
			}
			if ids > maxWant || len(req.Want) > maxListings || len(req.Ranges) > maxRanges {
				t.Fatalf("request of %d ids, %d wants, %d ranges", ids, len(req.Want), len(req.Ranges))
			}
		}
		if p := s.pen.list(); errors.Is(err, ErrViolation) != (len(p) == 1) {
			t.Fatalf("%v: session ended with %v, penalties %v", set, err, p)
		}
	}
}

// putNotices stores, for each of count devices in shard 0, two bundles, a
// claim notice of the first and a consume notice of the second.
func (s *side) putNotices(t testing.TB, count int) {
	_, nodeKey, _ := ed25519.GenerateKey(rand.Reader)
	now := uint64(time.Now().UnixMilli())
	for range count {
		dev := keyIn(0)
		devKey := protocol.Key(dev.Public().(ed25519.PublicKey))
		b1, b2 := protocol.SignBundle(dev, now, []byte("kp-1")), protocol.SignBundle(dev, now, []byte("kp-2"))
		s.putBundles(t, b1, b2)
		s.putClaim(t, protocol.SignClaim(nodeKey, now, devKey, refOf(t, b1)))
		s.putConsume(t, protocol.SignConsume(dev, now, []protocol.Ref{refOf(t, b2)}))
	}
}
