package storage

import (
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// writeV1 writes bundles and accounts with schema 1's keys, as the store of
// commit 6f5071b wrote them, into a Badger database at dir.
func writeV1(t *testing.T, dir string, schema bool, bundles []*Bundle, accounts []*Account) {
	t.Helper()
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	counts := map[protocol.Key]uint32{}
	err = db.Update(func(txn *badger.Txn) error {
		if schema {
			if err := txn.Set(schemaKey, binary.BigEndian.AppendUint32(nil, 1)); err != nil {
				return err
			}
		}
		for _, b := range bundles {
			bk := append(append([]byte{prefixBundle, '/'}, b.DeviceID[:]...), '/')
			bk = binary.BigEndian.AppendUint64(bk, ^b.TimestampMS)
			bk = append(append(bk, '/'), b.Ref[:]...)
			if err := txn.Set(bk, encodeBundleValue(b)); err != nil {
				return err
			}
			if b.LastResort {
				if err := txn.Set(append([]byte{prefixLastResort}, bk[1:]...), nil); err != nil {
					return err
				}
			}
			rk := append(append(append([]byte{prefixRef, '/'}, b.DeviceID[:]...), '/'), b.Ref[:]...)
			if err := txn.Set(rk, binary.BigEndian.AppendUint64(nil, b.TimestampMS)); err != nil {
				return err
			}
			counts[b.DeviceID]++
		}
		for d, n := range counts {
			if err := txn.Set(append([]byte{prefixCount, '/'}, d[:]...), binary.BigEndian.AppendUint32(nil, n)); err != nil {
				return err
			}
		}
		for _, a := range accounts {
			if err := txn.Set(append([]byte{prefixAccount, '/'}, a.AccountPub[:]...), encodeAccountValue(a)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// testSet is a spread of bundles and accounts over every shard.
func testSet() ([]*Bundle, []*Account) {
	var bs []*Bundle
	var as []*Account
	for d := 0; d < 40; d++ {
		k := dev(byte(d))
		for i := 0; i < 3; i++ {
			b := bundle(k, uint64(1000*(i+1)), fmt.Sprint(d, "/", i), i == 0)
			b.ReceivedAtMS = 1
			bs = append(bs, b)
		}
		as = append(as, account(dev(byte(100+d)), uint64(d+1), byte(d)))
	}
	return bs, as
}

// wantDigests are the shard digests of a set, computed from the records.
func wantDigests(bs []*Bundle, as []*Account, count int) (bundles, accounts []protocol.Digest) {
	bundles, accounts = make([]protocol.Digest, count), make([]protocol.Digest, count)
	for _, b := range bs {
		bundles[protocol.Shard(b.DeviceID, count)].Add(protocol.BundleItem(b.DeviceID, b.TimestampMS, b.Ref))
	}
	for _, a := range as {
		accounts[protocol.Shard(a.AccountPub, count)].Add(protocol.AccountItem(a.AccountPub, a.Lamport, a.Payload))
	}
	return bundles, accounts
}

func assertHolds(t *testing.T, s *Store, bs []*Bundle, as []*Account) {
	t.Helper()
	ctx := context.Background()
	wb, wa := wantDigests(bs, as, s.opts.ShardCount)
	for shard := 0; shard < s.opts.ShardCount; shard++ {
		for _, c := range []struct {
			kind SetKind
			want protocol.Digest
		}{{BundleSet, wb[shard]}, {AccountSet, wa[shard]}} {
			if got := s.ShardDigest(c.kind, shard); got.Fingerprint() != c.want.Fingerprint() {
				t.Fatalf("kind %d shard %d: digest of %d items, want %d", c.kind, shard, got.Count, c.want.Count)
			}
			scanned, _, _, err := s.PrefixDigests(ctx, c.kind, shard, nil)
			if err != nil || scanned.Fingerprint() != c.want.Fingerprint() {
				t.Fatalf("kind %d shard %d: scanned %d items (%v), want %d", c.kind, shard, scanned.Count, err, c.want.Count)
			}
		}
	}
	for _, b := range bs {
		if b.LastResort {
			got, err := s.LatestBundle(ctx, b.DeviceID)
			if err != nil || got.Ref != b.Ref || string(got.Payload) != string(b.Payload) {
				t.Fatalf("latest of %x: %+v %v", b.DeviceID[:1], got, err)
			}
		}
	}
	for _, a := range as {
		got, err := s.Account(ctx, a.AccountPub)
		if err != nil || got.Lamport != a.Lamport || string(got.Payload) != string(a.Payload) {
			t.Fatalf("account %x: %+v %v", a.AccountPub[:1], got, err)
		}
	}
	devices := map[protocol.Key]bool{}
	for _, b := range bs {
		devices[b.DeviceID] = true
	}
	assertExact(t, s, Counts{Devices: int64(len(devices)), Bundles: int64(len(bs)), Accounts: int64(len(as))})
}

// An existing schema 1 data dir is migrated on Open: everything is served,
// the digests are those of the same records, and no schema 1 key is left.
func TestOpenMigratesSchema1(t *testing.T) {
	dir := t.TempDir()
	bs, as := testSet()
	writeV1(t, dir, true, bs, as)
	s := openStore(t, dir, nil)
	assertHolds(t, s, bs, as)
	assertNoV1Keys(t, s)
	// Writes work on the migrated store, and a reopen does not migrate again.
	mustPut(t, s, bundle(dev(1), 9000, "new", false), Stored)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, nil)
	if s.repaired.Total() != 0 {
		t.Fatalf("reopen after migration repaired %+v", s.repaired)
	}
	assertHolds(t, s, append(bs, bundle(dev(1), 9000, "new", false)), as)
}

// A migration stopped halfway (some records moved, schema still 1) is
// finished by the next Open.
func TestOpenFinishesAHalfDoneMigration(t *testing.T) {
	dir := t.TempDir()
	bs, as := testSet()
	writeV1(t, dir, true, bs, as)
	s := openStore(t, dir, nil)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Half of the records back to schema 1 keys, beside the moved ones.
	raw, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	err = raw.Update(func(txn *badger.Txn) error {
		for _, b := range bs[:len(bs)/2] {
			if err := txn.Delete(bundleKey(prefixBundle, b.DeviceID, b.TimestampMS, b.Ref)); err != nil {
				return err
			}
			if err := txn.Delete(bundleKey(prefixLastResort, b.DeviceID, b.TimestampMS, b.Ref)); err != nil {
				return err
			}
			if err := txn.Delete(refKey(b.DeviceID, b.Ref)); err != nil {
				return err
			}
		}
		for _, a := range as[:len(as)/2] {
			if err := txn.Delete(accountKey(a.AccountPub)); err != nil {
				return err
			}
		}
		return nil
	})
	raw.Close()
	if err != nil {
		t.Fatal(err)
	}
	writeV1(t, dir, true, bs[:len(bs)/2], as[:len(as)/2])
	s = openStore(t, dir, nil)
	assertHolds(t, s, bs, as)
	assertNoV1Keys(t, s)
}

func assertNoV1Keys(t *testing.T, s *Store) {
	t.Helper()
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()
			switch {
			case k[0] == prefixBundle || k[0] == prefixLastResort:
				if len(k) != bundleKeyLen {
					return fmt.Errorf("schema 1 key %q left", k[:2])
				}
			case k[0] == prefixRef && len(k) != refKeyLen, k[0] == prefixCount && len(k) != countKeyLen,
				k[0] == prefixAccount && len(k) != accountKeyLen:
				return fmt.Errorf("schema 1 key %q left", k[:2])
			case string(k) == string(schemaKey):
				v, _ := it.Item().ValueCopy(nil)
				if binary.BigEndian.Uint32(v) != schemaVersion {
					return fmt.Errorf("schema %x after migration", v)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A data dir of an unknown schema, or with records and no schema, is
// refused with a message that says what to do.
func TestOpenRefusesUnknownSchema(t *testing.T) {
	dir := t.TempDir()
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(txn *badger.Txn) error { return txn.Set(schemaKey, binary.BigEndian.AppendUint32(nil, 9)) })
	db.Close()
	_, err = Open(Options{Dir: dir, NoSync: true})
	if !errors.Is(err, errUnknownSchema) || !strings.Contains(err.Error(), "schema 9") || !strings.Contains(err.Error(), "move the directory away") {
		t.Fatalf("Open of schema 9: %v", err)
	}

	dir = t.TempDir()
	bs, as := testSet()
	writeV1(t, dir, false, bs, as)
	if _, err := Open(Options{Dir: dir, NoSync: true}); !errors.Is(err, errUnknownSchema) {
		t.Fatalf("Open of records without a schema: %v", err)
	}
}

// A sync scan of one shard visits only that shard's items, for any S.
func TestShardScanVisitsOnlyItsShard(t *testing.T) {
	ctx := context.Background()
	for _, count := range []int{1, 3, 8, 256} {
		s := openStore(t, t.TempDir(), func(o *Options) { o.ShardCount = count })
		perShard := make([]int, count)
		perShardPrefix := make([]int, count) // under the one-byte prefix 0x07
		for d := 0; d < 300; d++ {
			var k protocol.Key
			k[0], k[1], k[2] = byte(d), byte(d>>8), byte(d)
			if d%2 == 0 {
				k[0] = 7
			}
			for i := 0; i < 2; i++ {
				mustPut(t, s, bundle(k, uint64(1000+i), fmt.Sprint(d, "/", i), false), Stored)
			}
			perShard[protocol.Shard(k, count)] += 2
			if k[0] == 7 {
				perShardPrefix[protocol.Shard(k, count)] += 2
			}
		}
		for shard := 0; shard < count; shard++ {
			for _, c := range []struct {
				prefix []byte
				want   int
			}{{nil, perShard[shard]}, {[]byte{7}, perShardPrefix[shard]}} {
				before := s.scanned.Load()
				d, _, _, err := s.PrefixDigests(ctx, BundleSet, shard, c.prefix)
				if err != nil {
					t.Fatal(err)
				}
				visited := s.scanned.Load() - before
				if int(d.Count) != c.want || int(visited) != c.want {
					t.Fatalf("S=%d shard %d prefix %x: %d items, %d visited, want %d", count, shard, c.prefix, d.Count, visited, c.want)
				}
			}
		}
	}
}

// BenchmarkShardScan: one shard's scan with S=8 costs about 1/8 of the
// store, not the whole store.
func BenchmarkShardScan(b *testing.B) {
	s, err := Open(Options{Dir: b.TempDir(), NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	for d := 0; d < 4000; d++ {
		var k protocol.Key
		binary.BigEndian.PutUint32(k[:], uint32(d))
		if _, err := s.PutBundle(ctx, bundle(k, 1000, fmt.Sprint(d), false)); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	before := s.scanned.Load()
	for i := 0; i < b.N; i++ {
		if _, _, _, err := s.PrefixDigests(ctx, BundleSet, i%s.opts.ShardCount, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(s.scanned.Load()-before)/float64(b.N), "items/scan")
}

// The migration drops records over the payload cap (accepted before it
// existed) and reads the KeyPackage lifetime that schema 1 did not keep, so
// an ended KeyPackage is not served after the upgrade.
func TestMigrationDropsOversizedAndReadsLifetimes(t *testing.T) {
	now := time.Now()
	dir := t.TempDir()
	kp, signer, err := mlstest.Generate(mlstest.Options{Suite: 0x0001, LastResort: true,
		NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	var d protocol.Key
	copy(d[:], signer.Public().(ed25519.PublicKey))
	ts := uint64(now.Add(-2 * time.Hour).UnixMilli())
	ended := &Bundle{Bundle: protocol.Bundle{DeviceID: d, Payload: protocol.BundlePayload(ts, kp)}, BundleInfo: protocol.BundleInfo{TimestampMS: ts, LastResort: true, Ref: protocol.KeyPackageRef(kp)}}
	usable := bundle(d, ts-1000, "opaque, no lifetime", false)
	huge := bundle(dev(9), ts, strings.Repeat("x", protocol.MaxPayloadSize), false)
	writeV1(t, dir, true, []*Bundle{ended, usable, huge}, nil)
	s := openStore(t, dir, nil)
	if got, err := s.Bundles(context.Background(), dev(9)); err != nil || len(got) != 0 {
		t.Fatalf("oversized bundle after migration: %d, %v", len(got), err)
	}
	got, err := s.LatestBundle(context.Background(), d)
	if err != nil || got.Ref != usable.Ref {
		t.Fatalf("latest after migration: %+v, %v; want the usable opaque bundle, not the ended KeyPackage", got, err)
	}
	if c := s.Counts(); c.Bundles != 2 {
		t.Fatalf("counts %+v, want the 2 bundles of d", c)
	}
}
