package sync

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-msgio/pbio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// quick bounds the wall time of a session that must end at once (a
// violation, a truncation) or at its first deadline: a few milliseconds,
// with room for -race on a loaded machine.
const quick = 500 * time.Millisecond

// An honest initiator and responder converge two stores, both ways, for
// bundles and accounts: ranges are split (more than listThreshold items
// differ) and listed, the wanted records are ingested, and a second pass
// finds nothing to pull. Nobody is penalized.
func TestHonestSessionsConverge(t *testing.T) {
	a, b := newSide(t, 5*time.Second), newSide(t, 5*time.Second)
	for range 150 {
		a.putBundles(t, newBundle(0))
	}
	for range 40 {
		b.putBundles(t, newBundle(0))
	}
	common := newBundle(0)
	a.putBundles(t, common)
	b.putBundles(t, common)
	for i := range 12 {
		a.putAccounts(t, newAccount(0, uint64(i)))
	}
	b.putAccounts(t, newAccount(0, 1))
	// One account both hold, b's copy newer: converge keeps the newer.
	acct := keyIn(0)
	a.putAccounts(t, protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil)))
	b.putAccounts(t, protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil)))

	ctx := t.Context()
	pulls := map[string]int{}
	for _, dir := range []struct {
		name     string
		from, to *side
	}{{"b from a", a, b}, {"a from b", b, a}} {
		for _, set := range []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_ACCOUNTS} {
			in := NewInitiator(dir.to.local, "responder", 0, set)
			inErr, rsErr := session(ctx, in, NewResponder(dir.from.local, "initiator"))
			if inErr != nil || rsErr != nil {
				t.Fatalf("%s, %v: initiator %v, responder %v", dir.name, set, inErr, rsErr)
			}
			pulls[dir.name+" "+set.String()] = in.Pulled()
		}
	}
	want := map[string]int{
		"b from a SET_BUNDLES": 150, "b from a SET_ACCOUNTS": 12,
		"a from b SET_BUNDLES": 40, "a from b SET_ACCOUNTS": 2, // b's own account and its newer copy
	}
	for k, n := range want {
		if pulls[k] != n {
			t.Errorf("%s pulled %d, want %d", k, pulls[k], n)
		}
	}
	for _, kind := range []storage.SetKind{storage.BundleSet, storage.AccountSet} {
		if da, db := a.digest(kind), b.digest(kind); da != db {
			t.Errorf("set %v: a %d items, b %d items, fingerprints differ: %v", kind, da.Count, db.Count, da != db)
		}
	}
	if got := a.digest(storage.BundleSet).Count; got != 191 {
		t.Errorf("%d bundles, want 191", got)
	}
	// In agreement: the root round answers from memory, nothing is pulled.
	for _, set := range []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_ACCOUNTS} {
		in := NewInitiator(b.local, "responder", 0, set)
		if inErr, rsErr := session(ctx, in, NewResponder(a.local, "initiator")); inErr != nil || rsErr != nil || in.Pulled() != 0 {
			t.Errorf("second pass %v: pulled %d, %v, %v", set, in.Pulled(), inErr, rsErr)
		}
	}
	if p := append(a.pen.list(), b.pen.list()...); len(p) != 0 {
		t.Errorf("penalties: %v", p)
	}
	if r := nodetest.Value(b.local.Metrics.rounds); r < 4 {
		t.Errorf("%v rounds counted", r)
	}
}

// A responder that does not hold the shard says so; the initiator ends
// with ErrNotHeld and penalizes nobody.
func TestSessionNotHolder(t *testing.T) {
	a, b := newSide(t, time.Second), newSide(t, time.Second)
	held, _ := protocol.ParseShardSet("1", testShards)
	a.local.Shards = held
	inErr, rsErr := session(t.Context(), NewInitiator(b.local, "r", 0, pb.SyncRequest_SET_BUNDLES), NewResponder(a.local, "i"))
	if !errors.Is(inErr, ErrNotHeld) || !errors.Is(rsErr, ErrRefused) || !errors.Is(rsErr, ErrNotHeld) {
		t.Errorf("initiator %v, responder %v", inErr, rsErr)
	}
	if p := append(a.pen.list(), b.pen.list()...); len(p) != 0 {
		t.Errorf("penalties: %v", p)
	}
}

// A responder that closes its stream in the middle of an answer ends the
// session at once with an unexpected EOF: a broken stream, not a
// violation, so nobody is penalized.
func TestTruncatingResponder(t *testing.T) {
	b := newSide(t, 5*time.Second)
	b.putBundles(t, newBundle(0))
	a, c := net.Pipe()
	go func() {
		defer c.Close()
		r := pbio.NewDelimitedReader(c, maxRequest)
		var req pb.SyncRequest
		if r.ReadMsg(&req) != nil {
			return
		}
		// Half of a 1,000-byte answer: the length prefix and some bytes.
		resp := &pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK, Listings: []*pb.SyncListing{{Ids: make([]uint64, 120)}}}
		body, _ := proto.Marshal(resp)
		frame := append(binary.AppendUvarint(nil, uint64(len(body))), body...)
		_, _ = c.Write(frame[:len(frame)/2])
	}()
	start := time.Now()
	err := NewInitiator(b.local, "r", 0, pb.SyncRequest_SET_BUNDLES).Run(t.Context(), a)
	elapsed := time.Since(start)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("session ended with %v, want an unexpected EOF", err)
	}
	if errors.Is(err, ErrViolation) || len(b.pen.list()) != 0 {
		t.Errorf("a truncated stream was taken for a violation: %v %v", err, b.pen.list())
	}
	if elapsed > quick {
		t.Errorf("took %v", elapsed)
	}
	t.Logf("ended in %v: %v", elapsed, err)
}

// A responder that reads the request and never answers holds the
// initiator only until the round's deadline; so does an initiator that
// never sends its next request hold the responder.
func TestStallingPeerEndsAtTheDeadline(t *testing.T) {
	const deadline = 30 * time.Millisecond
	t.Run("responder", func(t *testing.T) {
		b := newSide(t, deadline)
		b.putBundles(t, newBundle(0))
		a, c := net.Pipe()
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		reqs := fakeResponder(ctx, c, func(int, *pb.SyncRequest) *pb.SyncResponse {
			<-ctx.Done()
			return nil
		})
		start := time.Now()
		err := NewInitiator(b.local, "r", 0, pb.SyncRequest_SET_BUNDLES).Run(t.Context(), a)
		elapsed := time.Since(start)
		cancel()
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("session ended with %v, want the deadline", err)
		}
		if got := <-reqs; len(got) != 1 {
			t.Errorf("%d requests sent", len(got))
		}
		if elapsed < deadline || elapsed > deadline+quick {
			t.Errorf("ended after %v; the deadline is %v", elapsed, deadline)
		}
		if p := b.pen.list(); len(p) != 0 {
			t.Errorf("penalties: %v", p)
		}
		t.Logf("ended in %v: %v", elapsed, err)
	})
	t.Run("initiator", func(t *testing.T) {
		s := newSide(t, deadline)
		s.putBundles(t, newBundle(0))
		ri, done := serveRaw(t.Context(), s, "i")
		defer ri.c.Close()
		start := time.Now()
		if resp, err := ri.round(&pb.SyncRequest{Ranges: []*pb.SyncRange{{Fingerprint: emptyFingerprint}}}); err != nil || resp.Status != pb.SyncResponse_STATUS_OK {
			t.Fatal(resp, err)
		}
		err := <-done // no next request
		elapsed := time.Since(start)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("responder ended with %v, want the deadline", err)
		}
		if elapsed < deadline || elapsed > deadline+quick {
			t.Errorf("ended after %v; the deadline is %v", elapsed, deadline)
		}
	})
	t.Run("context", func(t *testing.T) {
		// The caller's context ends a session stuck in a read as well.
		b := newSide(t, time.Hour)
		a, c := net.Pipe()
		ctx, cancel := context.WithTimeout(t.Context(), deadline)
		defer cancel()
		fakeResponder(t.Context(), c, func(int, *pb.SyncRequest) *pb.SyncResponse {
			<-t.Context().Done()
			return nil
		})
		start := time.Now()
		err := NewInitiator(b.local, "r", 0, pb.SyncRequest_SET_BUNDLES).Run(ctx, a)
		a.Close()
		if elapsed := time.Since(start); err == nil || elapsed > deadline+quick {
			t.Errorf("ended after %v with %v", elapsed, err)
		}
	})
}

// A lying responder (it answers what was not asked, sends fingerprints of
// the wrong size, records of other IDs than the ones wanted, of another
// shard, or with a forged signature) ends the session at the first lie:
// ErrViolation, one penalty naming the lie, within a few milliseconds.
func TestLyingResponder(t *testing.T) {
	ok := pb.SyncResponse_STATUS_OK
	wanted := newBundle(0)
	other := newBundle(0)
	foreign := newBundle(1)
	forged := newBundle(0)
	forged.Signature[0] ^= 1
	fp := func(b byte) []byte { f := make([]byte, protocol.FingerprintSize); f[0] = b; return f }
	// listThen lists ids at the root, then answers the want with recs.
	listThen := func(ids []uint64, recs ...protocol.Bundle) func(int, *pb.SyncRequest) *pb.SyncResponse {
		return func(round int, req *pb.SyncRequest) *pb.SyncResponse {
			if round == 0 {
				return &pb.SyncResponse{Status: ok, Listings: []*pb.SyncListing{{Ids: ids}}}
			}
			r := &pb.SyncResponse{Status: ok}
			for i := range recs {
				r.Bundles = append(r.Bundles, pb.FromBundle(&recs[i]))
			}
			return r
		}
	}
	cases := []struct {
		name   string
		reason string
		rounds int
		stored int // records stored before the lie
		answer func(int, *pb.SyncRequest) *pb.SyncResponse
	}{
		{"a child of a range not asked", "unasked_range", 1, 0, func(int, *pb.SyncRequest) *pb.SyncResponse {
			return &pb.SyncResponse{Status: ok, Ranges: []*pb.SyncRange{{Prefix: []byte{1, 2}, Count: 3, Fingerprint: fp(1)}}}
		}},
		{"a child twice", "duplicate_range", 1, 0, func(int, *pb.SyncRequest) *pb.SyncResponse {
			rg := &pb.SyncRange{Prefix: []byte{1}, Count: 3, Fingerprint: fp(1)}
			return &pb.SyncResponse{Status: ok, Ranges: []*pb.SyncRange{rg, rg}}
		}},
		{"a fingerprint of the wrong size", "malformed_range", 1, 0, func(int, *pb.SyncRequest) *pb.SyncResponse {
			return &pb.SyncResponse{Status: ok, Ranges: []*pb.SyncRange{{Prefix: []byte{1}, Count: 3, Fingerprint: fp(1)[:8]}}}
		}},
		{"made-up fingerprints, ever deeper", "malformed_range", protocol.KeySize, 0, func(_ int, req *pb.SyncRequest) *pb.SyncResponse {
			r := &pb.SyncResponse{Status: ok}
			for _, rg := range req.Ranges {
				r.Ranges = append(r.Ranges, &pb.SyncRange{Prefix: append(slices.Clone(rg.Prefix), 7), Count: 1 << 40, Fingerprint: fp(byte(len(rg.Prefix)) + 1)})
			}
			return r
		}},
		{"the root listed 200 times", "unasked_listing", 1, 0, func(int, *pb.SyncRequest) *pb.SyncResponse {
			ids := make([]uint64, MaxListing)
			for i := range ids {
				ids[i] = uint64(i)
			}
			r := &pb.SyncResponse{Status: ok}
			for range 200 { // ~6.5 MiB
				r.Listings = append(r.Listings, &pb.SyncListing{Ids: ids})
			}
			return r
		}},
		// Each range claims 2^40 items, so it might be a single key listed
		// with 4,096 IDs: the initiator asks 16 a round (256 + 32 × 4,096
		// children pass the session's 131,072 ranges in round 33).
		{"made-up ranges, ever deeper and wide", "session_ranges", 33, 0, func(_ int, req *pb.SyncRequest) *pb.SyncResponse {
			r := &pb.SyncResponse{Status: ok}
			for _, rg := range req.Ranges {
				if len(rg.Prefix) == protocol.KeySize-1 {
					continue
				}
				for b := range 256 {
					r.Ranges = append(r.Ranges, &pb.SyncRange{Prefix: append(slices.Clone(rg.Prefix), byte(b)), Count: 1 << 40, Fingerprint: fp(byte(b))})
				}
			}
			return r
		}},
		{"a listing of a range split", "unasked_listing", 1, 0, func(int, *pb.SyncRequest) *pb.SyncResponse {
			return &pb.SyncResponse{Status: ok, Ranges: []*pb.SyncRange{{Prefix: []byte{1}, Count: 3, Fingerprint: fp(1)}},
				Listings: []*pb.SyncListing{{Ids: []uint64{1}}}}
		}},
		{"records nobody wanted", "unsolicited_record", 1, 0, func(int, *pb.SyncRequest) *pb.SyncResponse {
			return &pb.SyncResponse{Status: ok, Bundles: []*pb.Bundle{pb.FromBundle(&other)}}
		}},
		{"a record of another ID than wanted", "unsolicited_record", 2, 0, listThen([]uint64{bundleID(&wanted)}, other)},
		{"the wanted record twice", "unsolicited_record", 2, 1, listThen([]uint64{bundleID(&wanted)}, wanted, wanted)},
		{"a record of another shard", "record_of_another_shard", 2, 0, listThen([]uint64{bundleID(&foreign)}, foreign)},
		{"a forged signature", "invalid_record", 2, 0, listThen([]uint64{bundleID(&forged)}, forged)},
		{"truncated with nothing", "truncated_empty", 2, 0, func(round int, _ *pb.SyncRequest) *pb.SyncResponse {
			if round == 0 {
				return &pb.SyncResponse{Status: ok, Listings: []*pb.SyncListing{{Ids: []uint64{bundleID(&wanted)}}}}
			}
			return &pb.SyncResponse{Status: ok, Truncated: true}
		}},
	}
	bulky := map[string]bool{"the root listed 200 times": true, "made-up ranges, ever deeper and wide": true}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newSide(t, time.Second)
			b.putBundles(t, newBundle(0))
			a, c := net.Pipe()
			reqs := fakeResponder(t.Context(), c, tc.answer)
			start := time.Now()
			in := NewInitiator(b.local, "liar", 0, pb.SyncRequest_SET_BUNDLES)
			err := in.Run(t.Context(), a)
			elapsed := time.Since(start)
			a.Close()
			if !errors.Is(err, ErrViolation) {
				t.Fatalf("session ended with %v, want a violation", err)
			}
			if p := b.pen.list(); !slices.Equal(p, []string{"sync/" + tc.reason}) {
				t.Errorf("penalties %v, want [sync/%s]", p, tc.reason)
			}
			if n := len(<-reqs); n != tc.rounds {
				t.Errorf("%d rounds, want %d", n, tc.rounds)
			}
			if in.Pulled() != tc.stored || b.digest(storage.BundleSet).Count != uint64(1+tc.stored) {
				t.Errorf("stored %d records from a liar", in.Pulled())
			}
			// Lies at the response caps take a decode of megabytes (and
			// 33 rounds of them): seconds under -race, not milliseconds.
			limit := quick
			if bulky[tc.name] {
				limit = 20 * time.Second
			}
			if elapsed > limit {
				t.Errorf("took %v", elapsed)
			}
			t.Logf("%v after %v", err, elapsed)
		})
	}
}

// Items this node refused (here over its per-device quota) are not asked
// for again: once the first sessions have settled which of a device's
// bundles the store keeps, a session with a peer that holds more wants
// nothing.
func TestRefusedItemsAreNotWantedAgain(t *testing.T) {
	a, b := newSide(t, time.Second), newSide(t, time.Second)
	st := nodetest.OpenStore(t, storage.Options{MaxPerDevice: 2, Retention: testPolicy.Retention, ShardCount: testShards, Logger: b.local.Log})
	b.store, b.local.Set, b.local.Ingester = st, st, storeIngester{st}
	dev := keyIn(0)
	now := uint64(time.Now().UnixMilli())
	for i := range 5 {
		a.putBundles(t, protocol.SignBundle(dev, now-uint64(i)*1000, []byte{byte(i), 1, 2, 3}))
	}
	var wanted []int
	for range 4 {
		in := NewInitiator(b.local, "r", 0, pb.SyncRequest_SET_BUNDLES)
		if inErr, rsErr := session(t.Context(), in, NewResponder(a.local, "i")); inErr != nil || rsErr != nil {
			t.Fatal(inErr, rsErr)
		}
		wanted = append(wanted, in.wanted)
	}
	if wanted[0] != 5 || wanted[2] != 0 || wanted[3] != 0 {
		t.Errorf("items wanted per session %v, want 5 first and none from the third on", wanted)
	}
	if n := b.local.Refused.Len(); n != 3 {
		t.Errorf("%d items remembered as refused, want 3", n)
	}
	if got := b.digest(storage.BundleSet).Count; got != 2 {
		t.Errorf("b holds %d bundles, want 2", got)
	}
}
