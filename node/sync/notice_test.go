package sync

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/node/internal/bucket"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

func claimNotice(n protocol.ClaimNotice) *pb.Notice {
	return &pb.Notice{Body: &pb.Notice_Claim{Claim: pb.FromClaim(&n)}}
}

func consumeNotice(n protocol.ConsumeNotice) *pb.Notice {
	return &pb.Notice{Body: &pb.Notice_Consume{Consume: pb.FromConsume(&n)}}
}

// noticeID is the sync item ID of a notice, read from its bytes.
func noticeID(m *pb.Notice) uint64 {
	_, item, _, _, ok := claimedNoticeItem(m)
	if !ok {
		panic("unreadable notice")
	}
	return protocol.ItemID(item)
}

func (s *side) putClaim(t testing.TB, n protocol.ClaimNotice) {
	t.Helper()
	if o, _, err := s.local.Ingester.IngestClaim(t.Context(), &n, ingest.SourceHTTP); err != nil || o != storage.Stored {
		t.Fatalf("claim: %v, %v", o, err)
	}
}

func (s *side) putConsume(t testing.TB, n protocol.ConsumeNotice) {
	t.Helper()
	if o, _, err := s.local.Ingester.IngestConsume(t.Context(), &n, ingest.SourceHTTP); err != nil || o != storage.Stored {
		t.Fatalf("consume: %v, %v", o, err)
	}
}

// refOf is the ref the store keeps a bundle under (MLS off: the
// KeyPackageRef of the opaque key_package).
func refOf(t testing.TB, b protocol.Bundle) protocol.Ref {
	t.Helper()
	info, err := testPolicy.ValidateBundle(&b, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return info.Ref
}

func syncSet(t *testing.T, from, to *side, set pb.SyncRequest_Set) int {
	t.Helper()
	in := NewInitiator(to.local, "responder", 0, set)
	if inErr, rsErr := session(t.Context(), in, NewResponder(from.local, "initiator")); inErr != nil || rsErr != nil {
		t.Fatalf("%v: initiator %v, responder %v", set, inErr, rsErr)
	}
	return in.Pulled()
}

// Claim and consume notices converge both ways over the notice set: each
// side pulls the other's claims and consume notices, a consume notice
// pulled deletes the bundle it names, and a second pass pulls nothing. A
// claim whose bundle the initiator lacks is not stored and not remembered
// as refused: once the bundle set brings the bundle, the next notice
// session pulls the claim. Nobody is penalized.
func TestNoticesConverge(t *testing.T) {
	a, b := newSide(t, 5*time.Second), newSide(t, 5*time.Second)
	dev := keyIn(0)
	now := uint64(time.Now().UnixMilli())
	var bs []protocol.Bundle
	for i := range 4 {
		bs = append(bs, protocol.SignBundle(dev, now-uint64(i)*1000, []byte{byte(i), 'k', 'p'}))
	}
	a.putBundles(t, bs...)
	b.putBundles(t, bs[:3]...) // b lacks bs[3]
	_, nodeA, _ := ed25519.GenerateKey(rand.Reader)
	_, nodeB, _ := ed25519.GenerateKey(rand.Reader)
	devKey := protocol.Key(dev.Public().(ed25519.PublicKey))
	a.putClaim(t, protocol.SignClaim(nodeA, now, devKey, refOf(t, bs[0])))
	a.putClaim(t, protocol.SignClaim(nodeA, now, devKey, refOf(t, bs[3]))) // b lacks its bundle
	a.putConsume(t, protocol.SignConsume(dev, now, []protocol.Ref{refOf(t, bs[1])}))
	b.putClaim(t, protocol.SignClaim(nodeB, now, devKey, refOf(t, bs[2])))

	if got := syncSet(t, a, b, pb.SyncRequest_SET_NOTICES); got != 2 {
		t.Errorf("b pulled %d notices from a, want 2 (a claim and the consume notice; not the claim of a bundle b lacks)", got)
	}
	if n := b.local.Refused.Len(); n != 0 {
		t.Errorf("b remembers %d notices as refused, want none (the claim's bundle may come)", n)
	}
	if held, err := b.store.Bundles(t.Context(), devKey); err != nil || len(held) != 2 {
		t.Errorf("b holds %d bundles of the device after the consume notice (%v), want 2", len(held), err)
	}
	if got := syncSet(t, b, a, pb.SyncRequest_SET_NOTICES); got != 1 {
		t.Errorf("a pulled %d notices from b, want 1", got)
	}
	// The bundle set first, then the notice set: the claim comes too.
	if got := syncSet(t, a, b, pb.SyncRequest_SET_BUNDLES); got != 1 {
		t.Errorf("b pulled %d bundles, want 1", got)
	}
	if got := syncSet(t, a, b, pb.SyncRequest_SET_NOTICES); got != 1 {
		t.Errorf("b pulled %d notices once it held the bundle, want 1", got)
	}
	if da, db := a.digest(storage.NoticeSet), b.digest(storage.NoticeSet); da != db || da.Count != 4 {
		t.Errorf("notice sets: a %d items, b %d, equal %v; want 4 each, equal", da.Count, db.Count, da == db)
	}
	for _, dir := range []struct{ from, to *side }{{a, b}, {b, a}} {
		if got := syncSet(t, dir.from, dir.to, pb.SyncRequest_SET_NOTICES); got != 0 {
			t.Errorf("second pass pulled %d", got)
		}
	}
	counts, err := b.store.ClaimCounts(t.Context(), devKey)
	if err != nil || counts.OneTime != 0 {
		t.Errorf("b's counts %+v, %v: want no one-time bundle left (3 claimed, 1 consumed)", counts, err)
	}
	if p := append(a.pen.list(), b.pen.list()...); len(p) != 0 {
		t.Errorf("penalties: %v", p)
	}
}

// A lying responder on the notice set is cut off at its first lie, as on
// the bundle set: a notice nobody wanted, one of another ID than wanted, a
// notice in a bundle session, an unreadable notice, a wanted notice with a
// forged signature; nothing it sent is stored.
func TestLyingResponderNotices(t *testing.T) {
	ok := pb.SyncResponse_STATUS_OK
	dev := keyIn(0)
	devKey := protocol.Key(dev.Public().(ed25519.PublicKey))
	_, nodeKey, _ := ed25519.GenerateKey(rand.Reader)
	now := uint64(time.Now().UnixMilli())
	consume := consumeNotice(protocol.SignConsume(dev, now, []protocol.Ref{{1}}))
	other := consumeNotice(protocol.SignConsume(dev, now, []protocol.Ref{{2}}))
	forgedClaim := protocol.SignClaim(nodeKey, now, devKey, protocol.Ref{3})
	forgedClaim.Signature[0] ^= 1
	forgedConsume := protocol.SignConsume(dev, now, []protocol.Ref{{4}})
	forgedConsume.Signature[9] ^= 1
	badLayout := protocol.SignClaim(nodeKey, now, devKey, protocol.Ref{5})
	badLayout.Payload = badLayout.Payload[:40]
	foreign := consumeNotice(protocol.SignConsume(keyIn(1), now, []protocol.Ref{{6}}))
	listThen := func(ids []uint64, recs ...*pb.Notice) func(int, *pb.SyncRequest) *pb.SyncResponse {
		return func(round int, _ *pb.SyncRequest) *pb.SyncResponse {
			if round == 0 {
				return &pb.SyncResponse{Status: ok, Listings: []*pb.SyncListing{{Ids: ids}}}
			}
			return &pb.SyncResponse{Status: ok, Notices: recs}
		}
	}
	cases := []struct {
		name   string
		set    pb.SyncRequest_Set
		reason string
		answer func(int, *pb.SyncRequest) *pb.SyncResponse
	}{
		{"notices nobody wanted", pb.SyncRequest_SET_NOTICES, "unsolicited_record", func(int, *pb.SyncRequest) *pb.SyncResponse {
			return &pb.SyncResponse{Status: ok, Notices: []*pb.Notice{consume}}
		}},
		{"a notice of another ID than wanted", pb.SyncRequest_SET_NOTICES, "unsolicited_record", listThen([]uint64{noticeID(consume)}, other)},
		{"a notice in a bundle session", pb.SyncRequest_SET_BUNDLES, "unsolicited_record", listThen([]uint64{noticeID(consume)}, consume)},
		{"an unreadable claim notice", pb.SyncRequest_SET_NOTICES, "malformed_record", listThen([]uint64{1}, claimNotice(badLayout))},
		{"an empty notice", pb.SyncRequest_SET_NOTICES, "malformed_record", listThen([]uint64{1}, &pb.Notice{})},
		{"a notice of another shard", pb.SyncRequest_SET_NOTICES, "record_of_another_shard", listThen([]uint64{noticeID(foreign)}, foreign)},
		{"a claim notice with a forged signature", pb.SyncRequest_SET_NOTICES, "invalid_record", listThen([]uint64{noticeID(claimNotice(forgedClaim))}, claimNotice(forgedClaim))},
		{"a consume notice with a forged signature", pb.SyncRequest_SET_NOTICES, "invalid_record", listThen([]uint64{noticeID(consumeNotice(forgedConsume))}, consumeNotice(forgedConsume))},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := newSide(t, time.Second)
			b.putBundles(t, newBundle(0))
			a, c := net.Pipe()
			reqs := fakeResponder(t.Context(), c, tc.answer)
			in := NewInitiator(b.local, "liar", 0, tc.set)
			err := in.Run(t.Context(), a)
			a.Close()
			<-reqs
			if !errors.Is(err, ErrViolation) {
				t.Fatalf("session ended with %v, want a violation", err)
			}
			if p := b.pen.list(); !slices.Equal(p, []string{"sync/" + tc.reason}) {
				t.Errorf("penalties %v, want [sync/%s]", p, tc.reason)
			}
			if in.Pulled() != 0 || b.digest(storage.NoticeSet).Count != 0 {
				t.Errorf("stored %d notices from a liar", in.Pulled())
			}
		})
	}
}

// A responder gets at most its per-(peer, device) claim budget of claim
// notices stored for one device per session burst, however many keys
// signed them (a notice costs its signer only a key): the rest are
// skipped, not remembered as refused, and pulled in later sessions as the
// budget refills, so an honest catch-up still converges.
func TestClaimNoticesOverTheResponderBudgetWaitForNextSession(t *testing.T) {
	a, b := newSide(t, 5*time.Second), newSide(t, 5*time.Second)
	clock := time.Now()
	const burst, rate = 3, 2 // the test store keeps 8 bundles a device
	b.local.ClaimBudget = bucket.New[PeerDevice](16, rate, burst, func() time.Time { return clock })
	dev := keyIn(0)
	devKey := protocol.Key(dev.Public().(ed25519.PublicKey))
	now := uint64(time.Now().UnixMilli())
	const pool = 8
	var bs []protocol.Bundle
	for i := range pool {
		bs = append(bs, protocol.SignBundle(dev, now-uint64(i), []byte{byte(i), byte(i >> 8), 'k', 'p'}))
	}
	a.putBundles(t, bs...)
	b.putBundles(t, bs...)
	for _, bd := range bs {
		_, k, _ := ed25519.GenerateKey(rand.Reader) // a fresh origin per notice
		a.putClaim(t, protocol.SignClaim(k, now, devKey, refOf(t, bd)))
	}
	left := func() int {
		c, err := b.store.ClaimCounts(t.Context(), devKey)
		if err != nil {
			t.Fatal(err)
		}
		return c.OneTime
	}
	syncSet(t, a, b, pb.SyncRequest_SET_NOTICES)
	if got := pool - left(); got != burst {
		t.Fatalf("one session marked %d refs claimed, want the budget's burst %d", got, burst)
	}
	if n := b.local.Refused.Len(); n != 0 {
		t.Fatalf("%d notices remembered as refused; the skipped ones must be wanted again", n)
	}
	clock = clock.Add(time.Second)
	syncSet(t, a, b, pb.SyncRequest_SET_NOTICES)
	if got := pool - left(); got != burst+rate {
		t.Fatalf("after 1 s a second session has %d refs claimed, want %d", got, burst+rate)
	}
	clock = clock.Add(time.Minute)
	syncSet(t, a, b, pb.SyncRequest_SET_NOTICES)
	if got := left(); got != 0 {
		t.Fatalf("%d one-time bundles unclaimed after the budget refilled, want 0 (converged)", got)
	}
	if p := append(a.pen.list(), b.pen.list()...); len(p) != 0 {
		t.Errorf("penalties: %v", p)
	}
}
