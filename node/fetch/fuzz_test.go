package fetch

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// FuzzFetchRequest: whatever request decodes, the server's answer logic
// handles it without panicking, over a real store, and never answers more
// than the cap.
func FuzzFetchRequest(f *testing.F) {
	seed, _ := proto.Marshal(&pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: make([]byte, 32)})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.FetchRequest{Kind: 99, Key: make([]byte, 3)})
	f.Add(seed)
	r := newRig(f, nil)
	b := protocol.SignBundle(nodetest.SeedKey(20), nowMS(), []byte("kp"))
	putBundle(f, r.store, &b)
	seed, _ = proto.Marshal(&pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: b.DeviceID[:]})
	f.Add(seed)
	f.Fuzz(func(t *testing.T, data []byte) {
		var req pb.FetchRequest
		if proto.Unmarshal(data, &req) != nil {
			return
		}
		resp, release := r.srv.serve(t.Context(), clientID, &req)
		release()
		if len(req.Key) != 32 && resp.Status != pb.FetchResponse_STATUS_BAD_REQUEST {
			t.Fatalf("key of %d bytes answered %v", len(req.Key), resp.Status)
		}
		if size := proto.Size(resp); size > MaxResponse {
			t.Fatalf("response of %d bytes, over the %d-byte cap", size, MaxResponse)
		}
	})
}

// FuzzFetchResponse: the response decoder and the conversion of every
// bundle in it never panic.
func FuzzFetchResponse(f *testing.F) {
	seed, _ := proto.Marshal(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{{DeviceId: make([]byte, 32), Signature: make([]byte, 64)}}})
	f.Add(seed)
	f.Add([]byte{0x08, 0x01, 0x12, 0x00})
	f.Fuzz(func(t *testing.T, data []byte) {
		var resp pb.FetchResponse
		if proto.Unmarshal(data, &resp) != nil {
			return
		}
		for _, b := range resp.Bundles {
			_, _ = pb.ToBundle(b)
		}
		_, _ = pb.ToAccount(resp.Account)
	})
}

// FuzzClientAnswer: whatever bytes a peer answers with, over net.Pipe, the
// client never panics, and what it returns is a valid record of the key it
// asked for.
func FuzzClientAnswer(f *testing.F) {
	b := protocol.SignBundle(nodetest.SeedKey(21), nowMS(), []byte("kp"))
	ok, _ := proto.Marshal(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b)}})
	f.Add(append([]byte{byte(len(ok))}, ok...), false)
	a := protocol.SignAccount(nodetest.SeedKey(22), protocol.EncodeAccountPayload(1, nil))
	acct, _ := proto.Marshal(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Account: pb.FromAccount(&a)})
	f.Add(append([]byte{byte(len(acct))}, acct...), true)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x0f}, false)
	var answer atomic.Pointer[[]byte]
	c := hostileClient(f, time.Second, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		readRequest(s)
		_, _ = s.Write(*answer.Load())
	})
	policy := testPolicy()
	f.Fuzz(func(t *testing.T, data []byte, account bool) {
		answer.Store(&data)
		if account {
			got, err := c.FetchAccount(t.Context(), holderID, a.AccountPub)
			if err == nil {
				if _, verr := policy.ValidateAccount(&got.AccountBundle); verr != nil || got.AccountPub != a.AccountPub {
					t.Fatalf("returned an account that is not valid for the key asked: %v", verr)
				}
			}
			return
		}
		got, err := c.FetchLatest(t.Context(), holderID, b.DeviceID)
		if err == nil {
			if _, verr := policy.ValidateBundle(&got.Bundle, time.Now()); verr != nil || got.DeviceID != b.DeviceID {
				t.Fatalf("returned a bundle that is not valid for the device asked: %v", verr)
			}
		}
	})
}
