package sync

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol/pb"
)

// scannedBy returns the items the responder's scans read so far.
func scannedBy(s *side) float64 {
	return nodetest.Value(s.local.Metrics.scanned.WithLabelValues("responder"))
}

// A hostile initiator's requests that are cheap to send and expensive to
// answer are refused (STATUS_BAD_REQUEST) before any scan, and the peer is
// penalized: 64 wants naming the empty prefix, nested prefixes, wants and
// ranges the responder never offered, the root twice, duplicate want IDs,
// an empty request (it would hold a session slot for free), endless
// rounds. Each costs the responder no more than an honest round (items
// scanned). The same cases run against a real node over libp2p in
// testnet's TestHostileSyncInitiatorIsRefused.
func TestHostileInitiatorIsRefused(t *testing.T) {
	s := newSide(t, 5*time.Second)
	for range 300 {
		s.putBundles(t, newBundle(0))
	}
	root := &pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}
	ri, done := serveRaw(t.Context(), s, "honest")
	before := scannedBy(s)
	resp, err := ri.round(root)
	if err != nil || resp.Status != pb.SyncResponse_STATUS_OK || len(resp.Ranges) == 0 {
		t.Fatalf("honest root round: %v %v", resp, err)
	}
	honest := scannedBy(s) - before
	ri.c.Close()
	if err := <-done; err != nil {
		t.Fatalf("an honest session ended with %v", err)
	}

	var emptyWants []*pb.SyncListing
	for i := range 64 {
		emptyWants = append(emptyWants, &pb.SyncListing{Ids: []uint64{uint64(i)}})
	}
	cases := []struct {
		name   string
		reason string
		reqs   []*pb.SyncRequest
	}{
		{"64 empty-prefix wants", ReasonNested, []*pb.SyncRequest{{Want: emptyWants}}},
		{"nested ranges", ReasonNested, []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{}, {Prefix: []byte{1}}, {Prefix: []byte{1, 2}}}}}},
		{"range inside a want", ReasonNested, []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{Prefix: []byte{1, 2}}},
			Want: []*pb.SyncListing{{Prefix: []byte{1}, Ids: []uint64{1}}}}}},
		{"want never offered", ReasonNotOffered, []*pb.SyncRequest{{Want: []*pb.SyncListing{{Ids: []uint64{1, 2, 3}}}}}},
		{"ranges never offered", ReasonNotOffered, []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{Prefix: []byte{1}}, {Prefix: []byte{2}}}}}},
		{"root twice", ReasonNotOffered, []*pb.SyncRequest{root, root}},
		{"duplicate want IDs", ReasonBadRequest, []*pb.SyncRequest{{Want: []*pb.SyncListing{{Prefix: []byte{1}, Ids: []uint64{5, 5}}}}}},
		{"empty request", ReasonBadRequest, []*pb.SyncRequest{root, {}}},
		{"another shard's set midway", ReasonBadRequest, []*pb.SyncRequest{root, {Shard: 1, Ranges: []*pb.SyncRange{{Prefix: []byte{1}}}}}},
		{"a prefix as long as a key", ReasonBadRequest, []*pb.SyncRequest{{Ranges: []*pb.SyncRange{{Prefix: make([]byte, 32)}}}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s.pen.got = nil
			start := time.Now()
			ri, done := serveRaw(t.Context(), s, "attacker")
			defer ri.c.Close()
			before := scannedBy(s)
			var last *pb.SyncResponse
			for _, req := range tc.reqs {
				if last, err = ri.round(req); err != nil {
					t.Fatal(err)
				}
			}
			if last.Status != pb.SyncResponse_STATUS_BAD_REQUEST {
				t.Fatalf("answered %v", last.Status)
			}
			ri.c.Close()
			err := <-done
			if !errors.Is(err, ErrViolation) || !errors.Is(err, ErrRefused) {
				t.Errorf("session ended with %v", err)
			}
			if p := s.pen.list(); !slices.Equal(p, []string{"sync/" + tc.reason}) {
				t.Errorf("penalties %v, want [sync/%s]", p, tc.reason)
			}
			if cost := scannedBy(s) - before; cost > honest*float64(len(tc.reqs)) {
				t.Errorf("refusing cost %v items scanned; an honest round %v", cost, honest)
			}
			if elapsed := time.Since(start); elapsed > quick {
				t.Errorf("took %v", elapsed)
			}
		})
	}

	t.Run("endless rounds", func(t *testing.T) {
		s.pen.got = nil
		ri, done := serveRaw(t.Context(), s, "attacker")
		defer ri.c.Close()
		resp, err := ri.round(root)
		if err != nil || resp.Status != pb.SyncResponse_STATUS_OK {
			t.Fatal(resp, err)
		}
		// Ask about one child, which is listed; then want one of its items
		// again and again.
		child := &pb.SyncRange{Prefix: resp.Ranges[0].Prefix, Fingerprint: emptyFingerprint}
		if resp, err = ri.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{child}}); err != nil || len(resp.Listings) != 1 {
			t.Fatal(resp, err)
		}
		want := &pb.SyncRequest{Want: []*pb.SyncListing{{Prefix: child.Prefix, Ids: resp.Listings[0].Ids[:1]}}}
		rounds := 2
		for ; rounds < 10_000; rounds++ {
			if resp, err = ri.round(want); err != nil {
				t.Fatal(err)
			}
			if resp.Status != pb.SyncResponse_STATUS_OK {
				break
			}
		}
		if resp.Status != pb.SyncResponse_STATUS_BAD_REQUEST || rounds != MaxRounds+1 {
			t.Fatalf("after %d rounds: %v", rounds, resp.Status)
		}
		ri.c.Close()
		if err := <-done; !errors.Is(err, ErrViolation) {
			t.Errorf("session ended with %v", err)
		}
		if p := s.pen.list(); !slices.Equal(p, []string{"sync/" + ReasonRounds}) {
			t.Errorf("penalties %v", p)
		}
	})

	t.Run("malformed request", func(t *testing.T) {
		s.pen.got = nil
		ri, done := serveRaw(t.Context(), s, "attacker")
		defer ri.c.Close()
		// A length prefix past the request cap.
		if _, err := ri.c.Write(frame(make([]byte, maxRequest+1))[:8]); err != nil {
			t.Fatal(err)
		}
		if err := <-done; !errors.Is(err, ErrViolation) || errors.Is(err, ErrRefused) {
			t.Errorf("session ended with %v", err)
		}
		if p := s.pen.list(); !slices.Equal(p, []string{"sync/malformed_request"}) {
			t.Errorf("penalties %v", p)
		}
	})
}

// The antichain rule: no prefix equal to or a prefix of another.
func TestAntichain(t *testing.T) {
	for _, tc := range []struct {
		prefixes [][]byte
		ok       bool
	}{
		{[][]byte{{1}, {2}, {3, 4}}, true},
		{[][]byte{{1, 2}, {1, 3}, {2}}, true},
		{[][]byte{{}, {1}}, false},
		{[][]byte{{}, {}}, false},
		{[][]byte{{1, 2, 3}, {2}, {1, 2}}, false},
		{[][]byte{{1}, {1}}, false},
		{[][]byte{{1, 2}, {1, 2, 0}, {1, 3}}, false},
	} {
		if got := antichain(tc.prefixes); got != tc.ok {
			t.Errorf("antichain(%v) = %v", tc.prefixes, got)
		}
	}
}
