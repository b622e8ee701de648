package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// assertNoticeDigests checks that every shard's live notice digest equals a
// full scan of its records, and that the scan's items are those NoticesByID
// returns.
func assertNoticeDigests(t *testing.T, s *Store) (items int) {
	t.Helper()
	ctx := context.Background()
	for shard := 0; shard < s.opts.ShardCount; shard++ {
		live := s.ShardDigest(NoticeSet, shard)
		scanned, children, _, err := s.PrefixDigests(ctx, NoticeSet, shard, nil)
		if err != nil {
			t.Fatal(err)
		}
		if live.Fingerprint() != scanned.Fingerprint() || live.Count != scanned.Count {
			t.Fatalf("shard %d: live notice digest (%d items) differs from a scan (%d)", shard, live.Count, scanned.Count)
		}
		var sum uint64
		for _, c := range children {
			sum += c.Count
		}
		if sum != scanned.Count {
			t.Fatalf("children hold %d of %d items", sum, scanned.Count)
		}
		hashes, err := s.PrefixItems(ctx, NoticeSet, shard, nil)
		if err != nil {
			t.Fatal(err)
		}
		ids := map[uint64]bool{}
		for _, h := range hashes {
			ids[protocol.ItemID(h)] = true
		}
		ns, err := s.NoticesByID(ctx, shard, nil, ids)
		if err != nil {
			t.Fatal(err)
		}
		if len(ns) != len(hashes) {
			t.Fatalf("shard %d: NoticesByID returned %d of %d notices", shard, len(ns), len(hashes))
		}
		for _, n := range ns {
			if (n.Claim == nil) == (n.Consume == nil) {
				t.Fatalf("a notice with %v claim and %v consume", n.Claim != nil, n.Consume != nil)
			}
		}
		items += len(hashes)
	}
	return items
}

// The notice digests stay exact through a random mix of bundle puts,
// claims, consumes, quota and budget evictions and prunes, and a reopen.
func TestNoticeDigestsFollowEveryWrite(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	dir := t.TempDir()
	sz := int64(bundleBytes(bundle(dev(0), 1, "kp-0-00", false)))
	opts := func(o *Options) {
		o.Now = clk.Now
		o.MaxPerDevice = 6
		o.Retention = time.Hour
		o.MaxBytes = 80 * sz
		o.ShardCount = 4
	}
	s := openStore(t, dir, opts)
	rng := rand.New(rand.NewPCG(9, 9))
	var refs [][2]any // (device, ref) put so far
	var sawClaims, sawTombs int64
	for i := 0; i < 600; i++ {
		now := uint64(clk.Now().UnixMilli())
		d := dev(byte(rng.IntN(12)))
		switch op := rng.IntN(10); {
		case op < 4:
			b := bundle(d, now-uint64(rng.IntN(1_800_000)), fmt.Sprintf("kp-%d-%02d", d[0], rng.IntN(30)), rng.IntN(5) == 0)
			if _, err := s.PutBundle(ctx, b); err != nil && !errors.Is(err, ErrConsumed) && !errors.Is(err, ErrStoreFull) {
				t.Fatal(err)
			}
			refs = append(refs, [2]any{d, b.Ref})
		case op < 7 && len(refs) > 0:
			r := refs[rng.IntN(len(refs))]
			_, err := putClaim(t, s, nodeKey(byte(rng.IntN(4))), now-uint64(rng.IntN(5)), r[0].(protocol.Key), r[1].(protocol.Ref))
			if err != nil && !errors.Is(err, ErrRefNotHeld) && !errors.Is(err, ErrConsumed) && !errors.Is(err, ErrStoreFull) {
				t.Fatal(err)
			}
		case op < 9 && len(refs) > 0:
			r := refs[rng.IntN(len(refs))]
			n, info := consumeOf(r[0].(protocol.Key), now-uint64(rng.IntN(1000)), r[1].(protocol.Ref))
			if _, err := s.PutConsume(ctx, n, info); err != nil && !errors.Is(err, ErrStoreFull) {
				t.Fatal(err)
			}
		default:
			clk.Advance(time.Duration(rng.IntN(4)) * time.Minute)
			if _, err := s.Prune(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if i%100 == 99 {
			assertNoticeDigests(t, s)
			c := s.Counts()
			sawClaims, sawTombs = max(sawClaims, c.Claims), max(sawTombs, c.Consumed)
			t.Logf("op %d: %+v, bytes %d", i, c, s.Bytes())
		}
	}
	if sawClaims == 0 || sawTombs == 0 {
		t.Fatalf("the mix held no claims (%d) or tombstones (%d) at any check", sawClaims, sawTombs)
	}
	c := s.Counts()
	t.Logf("after the mix: %+v", c)
	items := assertNoticeDigests(t, s)
	assertExact(t, s, c)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, opts)
	if s.repaired.Total() != 0 {
		t.Fatalf("reopen repaired %+v", s.repaired)
	}
	if got := assertNoticeDigests(t, s); got != items {
		t.Fatalf("%d notices after reopen, %d before", got, items)
	}
	assertExact(t, s, c)
}

// Tombstones and consume notices go when their time has passed; then the
// bundle may be stored again.
func TestPruneDropsTombstonesAndConsumeNotices(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.Retention = time.Hour })
	now := uint64(clk.Now().UnixMilli())
	d := dev(1)
	b := bundle(d, now, "kp", false)
	mustPut(t, s, b, Stored)
	mustConsume(t, s, d, now, Stored, b.Ref)
	clk.Advance(30 * time.Minute)
	mustConsume(t, s, d, now+30*60_000, Stored, b.Ref) // a later notice extends the tombstone
	bytesHeld := s.Bytes()
	clk.Advance(31 * time.Minute)
	st, err := s.Prune(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Tombstones != 0 || st.Consumes != 1 {
		t.Fatalf("prune at 61 min: %+v, want the first notice only", st)
	}
	if c, _ := s.Consumed(ctx, d, b.Ref); !c {
		t.Fatal("the extended tombstone was pruned")
	}
	if s.Bytes() >= bytesHeld {
		t.Fatalf("bytes %d after a prune, %d before", s.Bytes(), bytesHeld)
	}
	clk.Advance(30 * time.Minute)
	if st, err = s.Prune(ctx); err != nil || st.Tombstones != 1 || st.Consumes != 1 {
		t.Fatalf("prune at 91 min: %+v, %v", st, err)
	}
	assertExact(t, s, Counts{})
	if s.Bytes() != 0 {
		t.Fatalf("bytes %d with nothing held", s.Bytes())
	}
	mustPut(t, s, bundle(d, uint64(clk.Now().UnixMilli()), "kp", false), Stored)
}

// A schema 2 data dir (no global ref index) is migrated on Open: the index
// is built, so a foreign ref is found, and the schema is 3.
func TestOpenMigratesSchema2(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir, nil)
	now := uint64(time.Now().UnixMilli())
	a := dev(1)
	ba := bundle(a, now, "a-kp", false)
	mustPut(t, s, ba, Stored)
	rawUpdate(t, s, func(txn *badger.Txn) error {
		if err := txn.Delete(globalRefKey(ba.Ref, a)); err != nil {
			return err
		}
		return txn.Set(schemaKey, []byte{0, 0, 0, 2})
	})
	s.Close()
	s = openStore(t, dir, nil)
	if s.repaired.GlobalRefs != 1 {
		t.Fatalf("repairs %+v, want the global ref index rebuilt", s.repaired)
	}
	n, info := consumeOf(dev(2), now, ba.Ref)
	if _, err := s.PutConsume(ctx, n, info); !errors.Is(err, ErrForeignRef) {
		t.Fatalf("consume of a foreign ref after the migration: %v", err)
	}
	s.Close()
	s = openStore(t, dir, nil)
	if s.repaired.Total() != 0 {
		t.Fatalf("second open repaired %+v", s.repaired)
	}
}

// Open deletes a claim record whose bundle is gone and single-use records
// that do not decode.
func TestOpenRepairsNotices(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, nil)
	now := uint64(time.Now().UnixMilli())
	d := dev(1)
	b := bundle(d, now, "kp", false)
	mustPut(t, s, b, Stored)
	mustClaim(t, s, nodeKey(1), now, d, b.Ref, Stored)
	var orphan protocol.Ref
	orphan[0] = 7
	n, _ := claimOf(nodeKey(1), now, d, orphan)
	rawUpdate(t, s, func(txn *badger.Txn) error {
		if err := txn.Set(claimKey(d, orphan), encodeClaimValue(&claimRecord{HandedOut: 1, Notice: *n})); err != nil {
			return err
		}
		if err := txn.Set(consumedKey(d, orphan), []byte{1, 2, 3}); err != nil {
			return err
		}
		return txn.Set(noticeKey(d, noticeConsume, [32]byte{1}), []byte("junk"))
	})
	s.Close()
	s = openStore(t, dir, nil)
	if s.repaired.Claims != 1 || s.repaired.Malformed != 2 {
		t.Fatalf("repairs %+v, want 1 orphan claim and 2 malformed records", s.repaired)
	}
	assertExact(t, s, Counts{Devices: 1, Bundles: 1, Claims: 1})
}

// Claim records, consume notices and tombstones count against MaxBytes; a
// consume notice that does not fit and cannot make room is ErrStoreFull
// and changes nothing.
func TestNoticesCountAgainstTheBudget(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	now := uint64(clk.Now().UnixMilli())
	d := dev(1)
	b := bundle(d, now, "kp", false)
	s := openStore(t, t.TempDir(), func(o *Options) {
		o.Now = clk.Now
		o.MaxBytes = int64(bundleBytes(b)) + claimBytes
		o.MaxConsumeBytes = -1
	})
	mustPut(t, s, b, Stored)
	mustClaim(t, s, nodeKey(1), now, d, b.Ref, Stored)
	if want := int64(bundleBytes(b)) + claimBytes; s.Bytes() != want {
		t.Fatalf("bytes %d, want %d", s.Bytes(), want)
	}
	var refs []protocol.Ref
	for i := 0; i < 40; i++ {
		var r protocol.Ref
		r[0], r[1] = 1, byte(i)
		refs = append(refs, r)
	}
	n, info := consumeOf(d, now, refs...)
	if _, err := s.PutConsume(ctx, n, info); !errors.Is(err, ErrStoreFull) {
		t.Fatalf("a consume notice over the budget: %v, want ErrStoreFull", err)
	}
	assertExact(t, s, Counts{Devices: 1, Bundles: 1, Claims: 1})
	// Naming the held bundle frees its bytes and its claim's: it fits.
	mustConsume(t, s, d, now, Stored, b.Ref)
	assertExact(t, s, Counts{Consumed: 1})
	if want := tombstoneBytes + consumeBytes(len(protocol.ConsumePayload(now, refs[:1]))); s.Bytes() != want {
		t.Fatalf("bytes %d, want %d", s.Bytes(), want)
	}
}

// FuzzDecodeNoticeRecords feeds arbitrary bytes to the decoders of claim
// records, consume records and tombstones: none may panic, and what
// decodes re-encodes to the same bytes.
func FuzzDecodeNoticeRecords(f *testing.F) {
	d := dev(1)
	var ref protocol.Ref
	ref[0] = 5
	n, info := claimOf(nodeKey(1), 1000, d, ref)
	f.Add(encodeClaimValue(&claimRecord{HandedOut: 3, Notice: *n, Info: info}), ref[:])
	cn, cinfo := consumeOf(d, 1000, ref)
	f.Add(encodeConsumeValue(cn), cinfo.Hash[:])
	f.Add(encodeTombstone(123, false), ref[:])
	f.Add(encodeTombstone(123, true), ref[:])
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, v, id []byte) {
		var key [32]byte
		copy(key[:], id)
		if r, err := decodeClaimValue(d, key, v); err == nil {
			if !bytes.Equal(encodeClaimValue(r), v) || r.Info.DeviceID != d || r.Info.Ref != key {
				t.Fatal("claim record does not round-trip")
			}
		}
		if n, info, err := decodeConsumeValue(d, key, v); err == nil {
			if !bytes.Equal(encodeConsumeValue(n), v) || info.Hash != key || len(info.Refs) == 0 {
				t.Fatal("consume record does not round-trip")
			}
		}
		if until, unheld, err := decodeTombstoneFlag(v); err == nil && !bytes.Equal(encodeTombstone(until, unheld), v) {
			t.Fatal("tombstone does not round-trip")
		}
		if len(v) == noticeKeyLen {
			noticeID(v)
		}
	})
}

// Consume notices and tombstones have their own share of the budget
// (MaxConsumeBytes): past it a notice is ErrStoreFull and changes nothing,
// and bundles still fit; a prune gives the share back.
func TestConsumeRecordsHaveTheirOwnBudget(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	now := uint64(clk.Now().UnixMilli())
	one := tombstoneBytes + consumeBytes(len(protocol.ConsumePayload(now, make([]protocol.Ref, 1))))
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.Retention = time.Hour; o.MaxConsumeBytes = 3 * one })
	for i := 0; i < 4; i++ {
		var r protocol.Ref
		r[0] = byte(i)
		n, info := consumeOf(dev(byte(i)), now, r)
		got, err := s.PutConsume(ctx, n, info)
		if i < 3 && (err != nil || got != Stored) {
			t.Fatalf("notice %d: %v, %v", i, got, err)
		}
		if i == 3 && !errors.Is(err, ErrStoreFull) {
			t.Fatalf("notice over the consume budget: %v, %v; want ErrStoreFull", got, err)
		}
	}
	assertExact(t, s, Counts{Consumed: 3})
	mustPut(t, s, bundle(dev(9), now, "kp", false), Stored)
	clk.Advance(2 * time.Hour)
	if _, err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	var r protocol.Ref
	r[0] = 3
	mustConsume(t, s, dev(3), uint64(clk.Now().UnixMilli()), Stored, r)
	assertExact(t, s, Counts{Consumed: 1})
}

// A claim record goes with its bundle on every delete path: quota
// eviction, budget eviction, retention prune, lifetime prune, consume.
func TestClaimRecordsGoWithTheirBundle(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	now := uint64(clk.Now().UnixMilli())
	sz := int64(bundleBytes(bundle(dev(0), 1, "kp-x", false)))
	s := openStore(t, t.TempDir(), func(o *Options) {
		o.Now = clk.Now
		o.MaxPerDevice = 2
		o.Retention = time.Hour
		o.ClockSkew = time.Minute
		o.MaxBytes = 4*sz + claimBytes
		o.MaxConsumeBytes = -1
	})
	claimed := func(b *Bundle) *Bundle {
		t.Helper()
		mustPut(t, s, b, Stored)
		mustClaim(t, s, nodeKey(1), now, b.DeviceID, b.Ref, Stored)
		return b
	}
	// Quota: a third bundle of device 1 evicts its oldest, claimed one.
	claimed(bundle(dev(1), now-2000, "kp-a", false))
	claimed(bundle(dev(1), now-1000, "kp-b", false))
	mustPut(t, s, bundle(dev(1), now, "kp-c", false), Stored)
	assertExact(t, s, Counts{Devices: 1, Bundles: 2, Claims: 1})
	// Lifetime: a claimed bundle whose KeyPackage ends is pruned with its claim.
	ending := bundle(dev(2), now, "kp-d", false)
	ending.NotAfterMS = int64(now) + 1000
	claimed(ending)
	assertExact(t, s, Counts{Devices: 2, Bundles: 3, Claims: 2})
	clk.Advance(2 * time.Minute)
	if n, err := s.pruneLifetimes(ctx); err != nil || n != 1 {
		t.Fatalf("lifetime prune: %d, %v", n, err)
	}
	assertExact(t, s, Counts{Devices: 1, Bundles: 2, Claims: 1})
	// Budget: new bundles of other devices evict the oldest, claimed one.
	for i := 0; i < 3; i++ {
		mustPut(t, s, bundle(dev(byte(10+i)), now+uint64(i)+1, fmt.Sprint("kp-n", i), false), Stored)
	}
	c := s.Counts()
	if c.Claims != 0 || c.Bundles != 4 {
		t.Fatalf("after budget evictions: %+v, want the claimed bundle evicted with its claim", c)
	}
	assertExact(t, s, c)
	// Retention: everything ends, claims with it.
	claimed(bundle(dev(3), now+10, "kp-e", false))
	clk.Advance(2 * time.Hour)
	if _, err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	assertExact(t, s, Counts{})
	if s.Bytes() != 0 {
		t.Fatalf("bytes %d with nothing held", s.Bytes())
	}
}
