package storage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// assertExact checks that the live counters and shard digests agree with a
// full recount, that the consistency check finds nothing to repair, and
// that the store holds want bundles.
func assertExact(t *testing.T, s *Store, want Counts) {
	t.Helper()
	live, liveBytes, liveConsume := s.Counts(), s.Bytes(), s.consumeBytes.Load()
	var digests, notices []protocol.Digest
	for shard := 0; shard < s.opts.ShardCount; shard++ {
		digests = append(digests, s.ShardDigest(BundleSet, shard))
		notices = append(notices, s.ShardDigest(NoticeSet, shard))
	}
	if rep, err := s.checkConsistency(false); err != nil || rep.Total() != 0 {
		t.Fatalf("consistency check: %+v %v", rep, err)
	}
	if err := s.recount(); err != nil {
		t.Fatal(err)
	}
	if got := s.Counts(); got != live {
		t.Fatalf("live counts %+v differ from a recount %+v", live, got)
	}
	if got := s.Bytes(); got != liveBytes {
		t.Fatalf("live byte count %d differs from a recount %d", liveBytes, got)
	}
	if got := s.consumeBytes.Load(); got != liveConsume {
		t.Fatalf("live consume byte count %d differs from a recount %d", liveConsume, got)
	}
	for shard, d := range digests {
		if d.Fingerprint() != s.ShardDigest(BundleSet, shard).Fingerprint() {
			t.Fatalf("shard %d: live digest differs from a recount", shard)
		}
		if notices[shard].Fingerprint() != s.ShardDigest(NoticeSet, shard).Fingerprint() {
			t.Fatalf("shard %d: live notice digest differs from a recount", shard)
		}
	}
	if live != want {
		t.Fatalf("counts %+v, want %+v", live, want)
	}
}

func heldTS(t *testing.T, s *Store, d protocol.Key) string {
	t.Helper()
	all, err := s.Bundles(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	for _, b := range all {
		got = append(got, b.TimestampMS)
	}
	return fmt.Sprint(got)
}

// Issue 7, problem 5: after --max-per-device is lowered between restarts,
// refreshing bundles beyond the new quota left the count wrong and an r/
// entry dangling; a later write panicked (index out of range) and the
// dangling entry made the bundle look like a duplicate.
func TestLoweredMaxPerDeviceKeepsCountsAndIndexesExact(t *testing.T) {
	dir := t.TempDir()
	d := dev(1)
	s := openStore(t, dir, func(o *Options) { o.MaxPerDevice = 5 })
	for i := uint64(1); i <= 5; i++ {
		mustPut(t, s, bundle(d, i*1000, fmt.Sprint("kp", i), false), Stored)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir, func(o *Options) { o.MaxPerDevice = 2 })
	// kp1 refreshed, but still older than the two newest: not kept, and
	// the device is evicted down to the new quota.
	mustPut(t, s, bundle(d, 1500, "kp1", false), OverQuota)
	assertExact(t, s, Counts{Devices: 1, Bundles: 2})
	if got := heldTS(t, s, d); got != "[5000 4000]" {
		t.Fatalf("held %s, want [5000 4000]", got)
	}
	mustPut(t, s, bundle(d, 2500, "kp2", false), OverQuota)
	mustPut(t, s, bundle(d, 3500, "kp3", false), OverQuota)
	mustPut(t, s, bundle(d, 4500, "kp4", false), Refreshed) // panicked before
	assertExact(t, s, Counts{Devices: 1, Bundles: 2})
	if got := heldTS(t, s, d); got != "[5000 4500]" {
		t.Fatalf("held %s, want [5000 4500]", got)
	}
	// Refs that are no longer held are not duplicates when they come back.
	mustPut(t, s, bundle(d, 2000, "kp2", false), OverQuota)
	mustPut(t, s, bundle(d, 6000, "kp1", false), Stored)
	if got := heldTS(t, s, d); got != "[6000 5000]" {
		t.Fatalf("held %s, want [6000 5000]", got)
	}
	mustPut(t, s, bundle(d, 6000, "kp1", false), Duplicate)
	assertExact(t, s, Counts{Devices: 1, Bundles: 2})

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, func(o *Options) { o.MaxPerDevice = 2 })
	if s.repaired.Total() != 0 {
		t.Fatalf("reopen repaired %+v", s.repaired)
	}
	mustPut(t, s, bundle(d, 7000, "kp7", false), Stored)
	assertExact(t, s, Counts{Devices: 1, Bundles: 2})
}

// rawUpdate writes Badger keys directly, bypassing the store's invariants.
func rawUpdate(t *testing.T, s *Store, fn func(txn *badger.Txn) error) {
	t.Helper()
	if err := s.db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

// Open finds and repairs every kind of drift between b/ and its indexes.
func TestOpenRepairsCorruptedIndexes(t *testing.T) {
	dir := t.TempDir()
	a, b, c := dev(1), dev(2), dev(3)
	s := openStore(t, dir, func(o *Options) { o.MaxPerDevice = 5 })
	for i := uint64(1); i <= 3; i++ {
		mustPut(t, s, bundle(a, i*1000, fmt.Sprint("a", i), i == 1), Stored)
		mustPut(t, s, bundle(b, i*1000, fmt.Sprint("b", i), false), Stored)
	}
	a1, a2, a3 := bundle(a, 1000, "a1", true), bundle(a, 2000, "a2", false), bundle(a, 3000, "a3", false)
	ghost := bundle(b, 9000, "ghost", false)
	now := int64(5000)
	rawUpdate(t, s, func(txn *badger.Txn) error {
		u32 := func(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }
		u64 := func(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }
		for _, op := range []struct {
			k, v []byte
			del  bool
		}{
			{k: countKey(a), v: u32(7)},                                            // wrong count
			{k: refKey(a, a2.Ref), del: true},                                      // b/ without r/
			{k: refKey(a, a3.Ref), v: u64(1234)},                                   // r/ naming another ts
			{k: refKey(b, ghost.Ref), v: u64(9000)},                                // r/ without b/
			{k: bundleKey(prefixLastResort, b, 42, ghost.Ref)},                     // l/ without b/
			{k: countKey(c), v: u32(3)},                                            // count of a device with nothing
			{k: []byte("b/short")},                                                 // malformed key
			{k: accountKey(dev(9)), v: []byte{1, 2}},                               // account value that does not decode
			{k: bundleKey(prefixBundle, a, 500, a1.Ref), v: encodeBundleValue(a1)}, // a1 held twice
			{k: timeKey(bundleKey(prefixBundle, b, 1000, bundle(b, 1000, "b1", false).Ref)), del: true}, // b/ without t/
			{k: lifetimeKey(now, bundleKey(prefixBundle, c, 1, ghost.Ref))},                             // e/ without b/
		} {
			var err error
			if op.del {
				err = txn.Delete(op.k)
			} else {
				err = txn.Set(op.k, op.v)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir, func(o *Options) { o.MaxPerDevice = 5 })
	// The time index is rebuilt: its 5 entries dropped, 6 written; the
	// lifetime index: its one dangling entry dropped.
	want := Repairs{Malformed: 2, DuplicateRef: 1, Refs: 2, DanglingRefs: 1, LastResort: 1, Counts: 2, TimeIndex: 11, LifetimeIdx: 1}
	if s.repaired != want {
		t.Fatalf("repaired %+v, want %+v", s.repaired, want)
	}
	assertExact(t, s, Counts{Devices: 2, Bundles: 6})
	if got := heldTS(t, s, a); got != "[3000 2000 1000]" {
		t.Fatalf("device a holds %s", got)
	}
	// The repaired indexes work: a2 and a3 are duplicates again, the ghost
	// is not, and the last-resort bundle is still preferred.
	mustPut(t, s, a2, Duplicate)
	mustPut(t, s, a3, Duplicate)
	mustPut(t, s, ghost, Stored)
	if b, err := s.LatestBundle(context.Background(), a); err != nil || b.Ref != a1.Ref {
		t.Fatalf("latest of a: %+v %v", b, err)
	}
	assertExact(t, s, Counts{Devices: 2, Bundles: 7})
}

// A record damaged on disk fails the call that reads it with errCorrupt;
// nothing panics.
func TestCorruptValueIsAnErrorNotAPanic(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	d := dev(1)
	b := bundle(d, 1000, "kp", false)
	mustPut(t, s, b, Stored)
	rawUpdate(t, s, func(txn *badger.Txn) error {
		if err := txn.Set(bundleKey(prefixBundle, d, 1000, b.Ref), []byte{1, 2, 3}); err != nil {
			return err
		}
		return txn.Set(refKey(d, b.Ref), []byte{1})
	})
	if _, err := s.LatestBundle(context.Background(), d); !errors.Is(err, errCorrupt) {
		t.Fatalf("LatestBundle of a damaged record: %v, want errCorrupt", err)
	}
	if _, err := s.PutBundle(context.Background(), bundle(d, 2000, "kp", false)); !errors.Is(err, errCorrupt) {
		t.Fatalf("PutBundle over a damaged ref: %v, want errCorrupt", err)
	}
}
