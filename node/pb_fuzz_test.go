package node

import (
	"strings"
	"testing"

	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// FuzzFetchRequest: whatever request decodes, the server's answer logic
// handles it without panicking (the store is real; see fetch tests for the
// stream side).
func FuzzFetchRequest(f *testing.F) {
	seed, _ := proto.Marshal(&pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: make([]byte, 32)})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.FetchRequest{Kind: 99, Key: make([]byte, 3)})
	f.Add(seed)
	n, _ := testNode(f, nil)
	fs := n.fetch
	f.Fuzz(func(t *testing.T, data []byte) {
		var req pb.FetchRequest
		if proto.Unmarshal(data, &req) != nil {
			return
		}
		resp, release := fs.serve(t.Context(), &req)
		release()
		if len(req.Key) != 32 && resp.Status != pb.FetchResponse_STATUS_BAD_REQUEST {
			t.Fatalf("key of %d bytes answered %v", len(req.Key), resp.Status)
		}
		if size := proto.Size(resp); size > maxFetchResponse {
			t.Fatalf("response of %d bytes, over the %d-byte cap", size, maxFetchResponse)
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

// FuzzMismatchedTag: protocol IDs a peer advertises in identify are
// hostile input; reading a constants tag from them never panics, and a
// mismatch is only ever reported for another tag of this network name.
func FuzzMismatchedTag(f *testing.F) {
	ours := protocol.DefaultConstants().Tag()
	f.Add("/kpnode/net/s8-off-l7776000/fetch/1.0.0")
	f.Add("/kpnode/net/" + ours + "/sync/1.0.0")
	f.Add("/kpnode//x/fetch/")
	f.Fuzz(func(t *testing.T, id string) {
		tag, ok := mismatchedTag("net", ours, []p2pprotocol.ID{p2pprotocol.ID(id)})
		if ok && (tag == "" || tag == ours || !strings.HasPrefix(id, "/kpnode/net/"+tag+"/")) {
			t.Fatalf("%q: mismatch with tag %q", id, tag)
		}
		_ = describeTag(tag)
		_ = describeTag(id)
	})
}
