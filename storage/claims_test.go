package storage

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// nodeKey returns a deterministic node identity key.
func nodeKey(n byte) ed25519.PrivateKey {
	var seed [32]byte
	seed[0], seed[31] = n, 0x4e
	return ed25519.NewKeyFromSeed(seed[:])
}

func claimOf(node ed25519.PrivateKey, ts uint64, d protocol.Key, ref protocol.Ref) (*protocol.ClaimNotice, protocol.ClaimInfo) {
	n := protocol.SignClaim(node, ts, d, ref)
	return &n, protocol.ClaimInfo{TimestampMS: ts, DeviceID: d, Ref: ref, Hash: protocol.ClaimHash(&n)}
}

// consumeOf builds a consume notice of device d (the store does not check
// signatures: validation is the caller's).
func consumeOf(d protocol.Key, ts uint64, refs ...protocol.Ref) (*protocol.ConsumeNotice, protocol.ConsumeInfo) {
	n := &protocol.ConsumeNotice{DeviceID: d, Payload: protocol.ConsumePayload(ts, refs)}
	return n, protocol.ConsumeInfo{TimestampMS: ts, Refs: refs, Hash: sha256.Sum256(n.Payload)}
}

// mlsBundle is a bundle whose key_package starts with an MLS 1.0 header of suite.
func mlsBundle(d protocol.Key, ts uint64, suite uint16, tag string, lastResort bool) *Bundle {
	kp := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, 1), suite)
	return bundle(d, ts, string(kp)+tag, lastResort)
}

func putClaim(t *testing.T, s *Store, node ed25519.PrivateKey, ts uint64, d protocol.Key, ref protocol.Ref) (PutOutcome, error) {
	t.Helper()
	n, info := claimOf(node, ts, d, ref)
	return s.PutClaim(context.Background(), n, info)
}

func mustClaim(t *testing.T, s *Store, node ed25519.PrivateKey, ts uint64, d protocol.Key, ref protocol.Ref, want PutOutcome) {
	t.Helper()
	got, err := putClaim(t, s, node, ts, d, ref)
	if err != nil || got != want {
		t.Fatalf("PutClaim(ts=%d) = %v, %v; want %v", ts, got, err, want)
	}
}

func mustConsume(t *testing.T, s *Store, d protocol.Key, ts uint64, want PutOutcome, refs ...protocol.Ref) {
	t.Helper()
	n, info := consumeOf(d, ts, refs...)
	got, err := s.PutConsume(context.Background(), n, info)
	if err != nil || got != want {
		t.Fatalf("PutConsume(ts=%d) = %v, %v; want %v", ts, got, err, want)
	}
}

// A consume notice deletes the named bundles with their claims and leaves
// tombstones: the same bundle put again is ErrConsumed, also after a reopen.
func TestConsumeDeletesAndRefusesTheBundleAgain(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	now := uint64(time.Now().UnixMilli())
	s := openStore(t, dir, nil)
	d := dev(1)
	b1, b2, b3 := bundle(d, now-3, "kp1", false), bundle(d, now-2, "kp2", false), bundle(d, now-1, "kp3", false)
	for _, b := range []*Bundle{b1, b2, b3} {
		mustPut(t, s, b, Stored)
	}
	mustClaim(t, s, nodeKey(1), now, d, b1.Ref, Stored)
	before := s.Bytes()
	mustConsume(t, s, d, now, Stored, b1.Ref, b2.Ref)
	assertExact(t, s, Counts{Devices: 1, Bundles: 1, Consumed: 2})
	if s.Bytes() >= before {
		t.Fatalf("bytes %d after deleting two bundles, %d before", s.Bytes(), before)
	}
	left, err := s.Bundles(ctx, d)
	if err != nil || len(left) != 1 || left[0].Ref != b3.Ref {
		t.Fatalf("bundles left: %v, %v", left, err)
	}
	for _, ref := range []protocol.Ref{b1.Ref, b2.Ref} {
		if c, err := s.Consumed(ctx, d, ref); err != nil || !c {
			t.Fatalf("Consumed = %v, %v", c, err)
		}
	}
	if c, _ := s.Consumed(ctx, d, b3.Ref); c {
		t.Fatal("an unnamed ref is consumed")
	}
	if c, _ := s.Consumed(ctx, dev(2), b1.Ref); c {
		t.Fatal("the tombstone applies to another device")
	}
	mustConsume(t, s, d, now, Duplicate, b1.Ref, b2.Ref)
	if _, err := s.PutBundle(ctx, bundle(d, now-3, "kp1", false)); !errors.Is(err, ErrConsumed) {
		t.Fatalf("re-put of a consumed bundle: %v, want ErrConsumed", err)
	}
	if _, err := s.PutBundle(ctx, bundle(d, now+5, "kp2", false)); !errors.Is(err, ErrConsumed) {
		t.Fatalf("re-put of a consumed ref with a newer timestamp: %v, want ErrConsumed", err)
	}
	if _, err := putClaim(t, s, nodeKey(1), now, d, b2.Ref); !errors.Is(err, ErrConsumed) {
		t.Fatalf("claim of a consumed ref: %v, want ErrConsumed", err)
	}
	s.Close()
	s = openStore(t, dir, nil)
	assertExact(t, s, Counts{Devices: 1, Bundles: 1, Consumed: 2})
	if _, err := s.PutBundle(ctx, bundle(d, now-3, "kp1", false)); !errors.Is(err, ErrConsumed) {
		t.Fatalf("re-put after reopen: %v, want ErrConsumed", err)
	}
	// Consuming the last bundle empties the device.
	mustConsume(t, s, d, now+1, Stored, b3.Ref)
	assertExact(t, s, Counts{Consumed: 3})
}

// A consume notice naming a ref held under another device changes nothing.
func TestConsumeForeignRef(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), nil)
	now := uint64(time.Now().UnixMilli())
	a, b := dev(1), dev(2)
	ba := bundle(a, now, "a-kp", false)
	bb := bundle(b, now, "b-kp", false)
	mustPut(t, s, ba, Stored)
	mustPut(t, s, bb, Stored)
	n, info := consumeOf(b, now, bb.Ref, ba.Ref)
	if _, err := s.PutConsume(ctx, n, info); !errors.Is(err, ErrForeignRef) {
		t.Fatalf("PutConsume of a foreign ref: %v", err)
	}
	assertExact(t, s, Counts{Devices: 2, Bundles: 2})
	if c, _ := s.Consumed(ctx, b, bb.Ref); c {
		t.Fatal("a refused notice left a tombstone")
	}
	// A ref never seen is not foreign: the tombstone keeps it out later.
	var unseen protocol.Ref
	unseen[0] = 9
	mustConsume(t, s, b, now, Stored, unseen)
	if _, err := s.PutBundle(ctx, &Bundle{Bundle: protocol.Bundle{DeviceID: b, Payload: protocol.BundlePayload(now, []byte("x"))},
		BundleInfo: protocol.BundleInfo{TimestampMS: now, Ref: unseen}}); !errors.Is(err, ErrConsumed) {
		t.Fatalf("a bundle consumed before it arrived: %v", err)
	}
}

// The tombstones of a device are bounded: a notice that would take it over
// MaxConsumedPerDevice is OverQuota and changes nothing; refs already
// tombstoned do not count again.
func TestConsumeQuota(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), func(o *Options) { o.MaxConsumedPerDevice = 3 })
	now := uint64(time.Now().UnixMilli())
	d := dev(1)
	var refs []protocol.Ref
	for i := 0; i < 5; i++ {
		b := bundle(d, now-uint64(i), fmt.Sprint("kp", i), false)
		mustPut(t, s, b, Stored)
		refs = append(refs, b.Ref)
	}
	mustConsume(t, s, d, now, Stored, refs[0], refs[1])
	mustConsume(t, s, d, now+1, OverQuota, refs[2], refs[3])
	assertExact(t, s, Counts{Devices: 1, Bundles: 3, Consumed: 2})
	if c, _ := s.Consumed(ctx, d, refs[2]); c {
		t.Fatal("an over-quota notice left a tombstone")
	}
	mustConsume(t, s, d, now+2, Stored, refs[0], refs[1], refs[2])
	assertExact(t, s, Counts{Devices: 1, Bundles: 2, Consumed: 3})
}

// PutClaim's contract: the ref must be held under the device and usable;
// one claim per ref, the winner by protocol.ClaimWins.
func TestPutClaimKeepsTheWinner(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(1_000_000_000_000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.ClockSkew = -1 })
	now := uint64(clk.Now().UnixMilli())
	a, b := dev(1), dev(2)
	ba := bundle(a, now, "a-kp", false)
	mustPut(t, s, ba, Stored)
	ended := bundle(a, now, "ended", false)
	ended.NotAfterMS = int64(now) + 10
	mustPut(t, s, ended, Stored)
	var unknown protocol.Ref
	if _, err := putClaim(t, s, nodeKey(1), now, a, unknown); !errors.Is(err, ErrRefNotHeld) {
		t.Fatalf("claim of an unknown ref: %v", err)
	}
	if _, err := putClaim(t, s, nodeKey(1), now, b, ba.Ref); !errors.Is(err, ErrForeignRef) {
		t.Fatalf("claim of another device's ref: %v", err)
	}
	clk.Advance(time.Second)
	if _, err := putClaim(t, s, nodeKey(1), now, a, ended.Ref); !errors.Is(err, ErrRefNotHeld) {
		t.Fatalf("claim of a bundle whose lifetime ended: %v", err)
	}
	mustClaim(t, s, nodeKey(1), now+100, a, ba.Ref, Stored)
	mustClaim(t, s, nodeKey(1), now+100, a, ba.Ref, Duplicate) // the same notice
	mustClaim(t, s, nodeKey(2), now+200, a, ba.Ref, Duplicate) // later: loses
	mustClaim(t, s, nodeKey(3), now+50, a, ba.Ref, Refreshed)  // earlier: wins
	assertExact(t, s, Counts{Devices: 1, Bundles: 2, Claims: 1})
	var held *Notice
	if ns, err := s.NoticesByID(ctx, protocol.Shard(a, protocol.DefaultShardCount), nil, allIDs(t, s, a)); err != nil || len(ns) != 1 {
		t.Fatalf("notices: %v, %v", ns, err)
	} else {
		held = ns[0]
	}
	if held.Claim == nil || held.Claim.NodeKey != protocol.Key(nodeKey(3).Public().(ed25519.PublicKey)) {
		t.Fatalf("held claim %+v, want node 3's", held)
	}
	bs, err := s.Bundles(ctx, a)
	if err != nil || len(bs) != 1 || !bs[0].Claimed {
		t.Fatalf("Bundles: %+v, %v; want one, claimed", bs, err)
	}
	if l, err := s.LatestBundle(ctx, a); err != nil || !l.Claimed {
		t.Fatalf("LatestBundle: %+v, %v; want claimed", l, err)
	}
	if c, err := s.ClaimCandidates(ctx, a, 0, 10); err != nil || len(c) != 0 {
		t.Fatalf("candidates after the only bundle was claimed: %v, %v", c, err)
	}
}

// allIDs returns the item IDs of every notice of d's shard.
func allIDs(t *testing.T, s *Store, d protocol.Key) map[uint64]bool {
	t.Helper()
	items, err := s.PrefixItems(context.Background(), NoticeSet, protocol.Shard(d, protocol.DefaultShardCount), nil)
	if err != nil {
		t.Fatal(err)
	}
	ids := map[uint64]bool{}
	for _, h := range items {
		ids[protocol.ItemID(h)] = true
	}
	return ids
}

// Every distinct claim notice of a last-resort ref is a hand-out: counted
// and Refreshed, so gossip forwards it and every node counts it.
func TestLastResortHandOutsAreCounted(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), nil)
	now := uint64(time.Now().UnixMilli())
	d := dev(1)
	old := bundle(d, now-10, "lr-old", true)
	lr := bundle(d, now, "lr", true)
	mustPut(t, s, old, Stored)
	mustPut(t, s, lr, Stored)
	mustPut(t, s, bundle(d, now, "one-time", false), Stored)
	mustClaim(t, s, nodeKey(1), now, d, lr.Ref, Stored)
	mustClaim(t, s, nodeKey(2), now+1, d, lr.Ref, Refreshed)
	mustClaim(t, s, nodeKey(3), now-1, d, lr.Ref, Refreshed)
	mustClaim(t, s, nodeKey(3), now-1, d, lr.Ref, Duplicate)
	mustClaim(t, s, nodeKey(4), now, d, old.Ref, Stored)
	c, err := s.ClaimCounts(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	if want := (ClaimCounts{OneTime: 1, LastResort: 2, LastResortHandedOut: 3}); c != want {
		t.Fatalf("counts %+v, want %+v", c, want)
	}
	got, err := s.LastResortBundle(ctx, d, 0)
	if err != nil || got.Ref != lr.Ref || !got.Claimed {
		t.Fatalf("LastResortBundle: %+v, %v", got, err)
	}
}

// Concurrent claimers of one ref: exactly one gets Stored.
func TestConcurrentClaimsHaveOneWinner(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	now := uint64(time.Now().UnixMilli())
	d := dev(1)
	b := bundle(d, now, "kp", false)
	mustPut(t, s, b, Stored)
	const claimers = 16
	outcomes := make([]PutOutcome, claimers)
	var wg sync.WaitGroup
	for i := 0; i < claimers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, info := claimOf(nodeKey(byte(i)), now+uint64(i%3), d, b.Ref)
			o, err := s.PutClaim(context.Background(), n, info)
			if err != nil {
				t.Error(err)
			}
			outcomes[i] = o
		}()
	}
	wg.Wait()
	stored := 0
	for _, o := range outcomes {
		if o == Stored {
			stored++
		}
	}
	if stored != 1 {
		t.Fatalf("%d claimers got Stored (%v), want exactly 1", stored, outcomes)
	}
	assertExact(t, s, Counts{Devices: 1, Bundles: 1, Claims: 1})
}

// ClaimCandidates: unclaimed usable one-time bundles of the suite, oldest
// first, up to the limit.
func TestClaimCandidates(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(1_000_000_000_000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now })
	now := uint64(clk.Now().UnixMilli())
	d := dev(1)
	var want []uint64
	for i := 0; i < 6; i++ {
		ts := now - uint64(i)*1000
		mustPut(t, s, mlsBundle(d, ts, 1, fmt.Sprint(i), false), Stored)
		if i != 2 {
			want = append([]uint64{ts}, want...)
		}
	}
	mustClaim(t, s, nodeKey(1), now, d, mlsBundle(d, now-2000, 1, "2", false).Ref, Stored)
	mustPut(t, s, mlsBundle(d, now-9000, 3, "suite3", false), Stored)
	mustPut(t, s, mlsBundle(d, now-8000, 1, "lr", true), Stored)
	mustPut(t, s, bundle(d, now-7000, "opaque", false), Stored)
	ended := mlsBundle(d, now-10000, 1, "ended", false)
	ended.NotAfterMS = int64(now) - 1
	mustPut(t, s, ended, Stored)

	got, err := s.ClaimCandidates(ctx, d, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fmtTS(got...) != fmt.Sprint(want) {
		t.Fatalf("suite 1 candidates %s, want %v (oldest first, no claimed, last-resort, ended, other suite or opaque)", fmtTS(got...), want)
	}
	if got, _ := s.ClaimCandidates(ctx, d, 1, 2); fmtTS(got...) != fmt.Sprint(want[:2]) {
		t.Fatalf("limit 2: %s", fmtTS(got...))
	}
	if got, _ := s.ClaimCandidates(ctx, d, 3, 0); len(got) != 1 || got[0].TimestampMS != now-9000 {
		t.Fatalf("suite 3: %s", fmtTS(got...))
	}
	if got, _ := s.ClaimCandidates(ctx, d, 0, 0); len(got) != 7 || got[0].TimestampMS != now-9000 {
		t.Fatalf("any suite: %s", fmtTS(got...))
	}
	if _, err := s.LastResortBundle(ctx, d, 3); !errors.Is(err, ErrNotFound) {
		t.Fatalf("last-resort of suite 3: %v", err)
	}
	if _, err := s.LastResortBundle(ctx, dev(9), 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("last-resort of an unknown device: %v", err)
	}
	c, _ := s.ClaimCounts(ctx, d)
	if want := (ClaimCounts{OneTime: 7, LastResort: 1}); c != want {
		t.Fatalf("counts %+v, want %+v", c, want)
	}
}

// BenchmarkClaim measures a local claim's store work: ClaimCandidates of
// a device holding 100 one-time bundles, then PutClaim of the oldest (run
// with -benchtime=Nx, N at most devices*100; -sync to fsync each write).
func BenchmarkClaim(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprint("sync=", sync), func(b *testing.B) {
			ctx := context.Background()
			s, err := Open(Options{Dir: b.TempDir(), NoSync: !sync})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			devices := (b.N + 99) / 100
			now := uint64(time.Now().UnixMilli())
			for d := 0; d < devices; d++ {
				for i := 0; i < 100; i++ {
					var k protocol.Key
					binary.BigEndian.PutUint32(k[:], uint32(d))
					k[31] = 0xd
					if _, err := s.PutBundle(ctx, mlsBundle(k, now-uint64(i), 1, fmt.Sprint(d, "-", i), false)); err != nil {
						b.Fatal(err)
					}
				}
			}
			node := nodeKey(1)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				var k protocol.Key
				binary.BigEndian.PutUint32(k[:], uint32(i%devices))
				k[31] = 0xd
				c, err := s.ClaimCandidates(ctx, k, 1, 64)
				if err != nil || len(c) == 0 {
					b.Fatalf("candidates: %d, %v", len(c), err)
				}
				n, info := claimOf(node, now, k, c[0].Ref)
				if o, err := s.PutClaim(ctx, n, info); err != nil || o != Stored {
					b.Fatalf("PutClaim: %v, %v", o, err)
				}
			}
		})
	}
}

// ConsumeNotices lists a device's consume notices newest first, at most
// limit, and none of another device's.
func TestConsumeNoticesNewestFirst(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), nil)
	now := uint64(time.Now().UnixMilli())
	d, other := dev(1), dev(2)
	order := []uint64{3, 0, 4, 1, 2} // stored out of timestamp order
	for _, i := range order {
		mustConsume(t, s, d, now+i, Stored, protocol.Ref{byte(i + 1)})
	}
	mustConsume(t, s, other, now+9, Stored, protocol.Ref{0xee})
	got, err := s.ConsumeNotices(ctx, d, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("got %d notices, want 3", len(got))
	}
	for i, n := range got {
		ts, _, err := protocol.DecodeConsumePayload(n.Payload)
		if err != nil || n.DeviceID != d || ts != now+4-uint64(i) {
			t.Errorf("notice %d: device %s ts %d (%v); want device %s ts %d", i, n.DeviceID, ts, err, d, now+4-uint64(i))
		}
	}
	if all, err := s.ConsumeNotices(ctx, d, 16); err != nil || len(all) != len(order) {
		t.Errorf("limit 16: %d notices, %v; want %d", len(all), err, len(order))
	}
	if none, err := s.ConsumeNotices(ctx, dev(3), 16); err != nil || len(none) != 0 {
		t.Errorf("a device without notices: %d, %v", len(none), err)
	}
}

// A bundle floor whose ref is consumed no longer applies: Floor reports
// none and RaiseFloor writes a lower version over it. An account floor is
// not affected by tombstones, and a live floor still refuses lower ones.
func TestConsumedBundleFloorNoLongerApplies(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), nil)
	now := time.Now().UnixMilli()
	d := dev(1)
	cmp := func(a, b Floor) int {
		switch va, vb := a.TimestampMS+a.Lamport, b.TimestampMS+b.Lamport; {
		case va > vb:
			return 1
		case va < vb:
			return -1
		}
		return 0
	}
	high := Floor{TimestampMS: 20, Ref: protocol.Ref{2}, UntilMS: now + 3_600_000}
	low := Floor{TimestampMS: 10, Ref: protocol.Ref{1}, UntilMS: now + 3_600_000}
	highAcc := Floor{Lamport: 20, UntilMS: now + 3_600_000}
	lowAcc := Floor{Lamport: 10, UntilMS: now + 3_600_000}
	for _, kind := range []FloorKind{FloorBundle, FloorAccount} {
		h, l := high, low
		if kind == FloorAccount {
			h, l = highAcc, lowAcc
		}
		if wrote, err := s.RaiseFloor(ctx, kind, d, h, now, cmp); err != nil || !wrote {
			t.Fatalf("raise %c: %v, %v", kind, wrote, err)
		}
		if wrote, err := s.RaiseFloor(ctx, kind, d, l, now, cmp); err != nil || wrote {
			t.Fatalf("a lower floor over a live one (%c): wrote %v, %v", kind, wrote, err)
		}
	}
	mustConsume(t, s, d, uint64(now), Stored, high.Ref)
	if _, ok, err := s.Floor(ctx, FloorBundle, d, now); err != nil || ok {
		t.Fatalf("the floor of a consumed bundle still applies (%v)", err)
	}
	if f, ok, err := s.Floor(ctx, FloorAccount, d, now); err != nil || !ok || f.Lamport != highAcc.Lamport {
		t.Fatalf("an account floor was voided by a bundle tombstone: %v, %v", ok, err)
	}
	if wrote, err := s.RaiseFloor(ctx, FloorBundle, d, low, now, cmp); err != nil || !wrote {
		t.Fatalf("a lower floor over a consumed one: wrote %v, %v", wrote, err)
	}
	if f, ok, err := s.Floor(ctx, FloorBundle, d, now); err != nil || !ok || f.Ref != low.Ref {
		t.Fatalf("floor after the consume: %+v, %v, %v; want the lower one", f, ok, err)
	}
}

// HasConsumeNotice reports exactly the stored notices.
func TestHasConsumeNotice(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir(), nil)
	d := dev(1)
	n, info := consumeOf(d, uint64(time.Now().UnixMilli()), protocol.Ref{1})
	if has, err := s.HasConsumeNotice(ctx, d, info.Hash); err != nil || has {
		t.Fatalf("before: %v, %v", has, err)
	}
	if _, err := s.PutConsume(ctx, n, info); err != nil {
		t.Fatal(err)
	}
	if has, err := s.HasConsumeNotice(ctx, d, info.Hash); err != nil || !has {
		t.Fatalf("after: %v, %v", has, err)
	}
	if has, err := s.HasConsumeNotice(ctx, dev(2), info.Hash); err != nil || has {
		t.Fatalf("another device: %v, %v", has, err)
	}
}
