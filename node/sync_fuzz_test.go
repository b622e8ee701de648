package node

import (
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol/pb"
)

// FuzzSyncRequest: any request a peer can send is answered (or refused)
// without panicking, from a real store, in a fresh session and as a second
// round.
func FuzzSyncRequest(f *testing.F) {
	seed, _ := proto.Marshal(&pb.SyncRequest{Shard: 1, Ranges: []*pb.SyncRange{{Count: 3, Fingerprint: make([]byte, 16)}, {Prefix: []byte{7}}},
		Want: []*pb.SyncListing{{Prefix: []byte{1, 2}, Ids: []uint64{1, 2, 3}}}})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.SyncRequest{Shard: 300, Set: 5})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.SyncRequest{Want: []*pb.SyncListing{{Ids: []uint64{1}}, {Ids: []uint64{2}}}})
	f.Add(seed)
	n, _ := testNode(f, nil)
	f.Fuzz(func(t *testing.T, data []byte) {
		var req pb.SyncRequest
		if proto.Unmarshal(data, &req) != nil {
			return
		}
		rs := &syncResponder{s: n.sync, p: "fuzz"}
		for range 2 {
			resp, reason := rs.serve(t.Context(), &req)
			if resp.Status == pb.SyncResponse_STATUS_UNSPECIFIED {
				t.Fatal("no status")
			}
			if (resp.Status == pb.SyncResponse_STATUS_BAD_REQUEST) != (reason != "") {
				t.Fatalf("status %v with reason %q", resp.Status, reason)
			}
		}
	})
}

// FuzzSyncResponse: the initiator's handling of any response to a request
// (ranges to compare, listings to diff, records to ingest) never panics and
// keeps its queues within their budgets.
func FuzzSyncResponse(f *testing.F) {
	seed, _ := proto.Marshal(&pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK,
		Ranges:   []*pb.SyncRange{{Prefix: []byte{1}, Count: 70, Fingerprint: make([]byte, 16)}, {Prefix: make([]byte, 40)}},
		Listings: []*pb.SyncListing{{Prefix: []byte{3}, Ids: []uint64{9}}},
		Bundles:  []*pb.Bundle{{DeviceId: make([]byte, 32), Payload: []byte("12345678"), Signature: make([]byte, 64)}}})
	f.Add(seed)
	n, _ := testNode(f, nil)
	f.Fuzz(func(t *testing.T, data []byte) {
		var resp pb.SyncResponse
		if proto.Unmarshal(data, &resp) != nil {
			return
		}
		ss := &syncSession{s: n.sync, p: "fuzz", pending: map[string][]uint64{}, scanCap: syncWorkSlack}
		req := &pb.SyncRequest{Ranges: []*pb.SyncRange{{Prefix: nil}, {Prefix: []byte{3}}},
			Want: []*pb.SyncListing{{Prefix: []byte{5}, Ids: []uint64{1, 2}}}}
		_ = ss.round(t.Context(), req, &resp)
		if ss.npend > syncMaxPending || len(ss.queue) > syncMaxSessionRanges {
			t.Fatalf("pending %d, queue %d", ss.npend, len(ss.queue))
		}
		next := ss.nextRequest()
		ids := 0
		for _, l := range next.Want {
			ids += len(l.Ids)
		}
		if ids > syncMaxWant || len(next.Want) > syncMaxListings || len(next.Ranges) > syncMaxRanges {
			t.Fatalf("request of %d ids, %d wants, %d ranges", ids, len(next.Want), len(next.Ranges))
		}
	})
}
