package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// The store budget. Anyone can mint device keys, so the per-device quota
// does not bound the store; MaxBytes does. The bytes counted are logical:
// each record's payload plus recordOverhead for its keys, indexes and
// header (Badger's own overhead on disk comes on top, see README).
//
// A bundle put that would go over the budget evicts other devices'
// bundles, at most evictPerPut of them, in this order:
//
//  1. bundles whose KeyPackage lifetime has ended (held only until the
//     clock skew has passed, never served), earliest end first;
//  2. then the bundles with the oldest signed timestamp in the store,
//     but only ones strictly older than the bundle being stored: a new
//     bundle never pushes out a newer one.
//
// If that does not make room the put fails with ErrStoreFull and changes
// nothing. Account bundles are never evicted (they are the device lists);
// an account put that needs room evicts bundles in the same order (any
// signed timestamp qualifies in step 2), else fails with ErrStoreFull.

// ErrStoreFull: the store budget (or the disk) has no room for the record.
// Nothing was written; reads keep working.
var ErrStoreFull = errors.New("storage: store full")

// evictPerPut bounds the work one put spends making room.
const evictPerPut = 32

// DefaultMaxBytes is the default store budget: 4 GiB of records.
const DefaultMaxBytes = 4 << 30

// DefaultMinFreeDisk is the default free-disk reserve: Badger's value log
// file (256 MiB, mapped at twice that) and memtables (32 MiB each) are
// written through memory maps, and a flush or compaction needs room too.
const DefaultMinFreeDisk = 512 << 20

// Time index: t/<ts u64>/<b/ key> -> empty, every bundle by its signed
// timestamp, oldest first: the retention prune and the budget's eviction
// read a prefix of it.
const prefixTime = 't'

func timeKey(bkey []byte) []byte {
	_, ts, _, _ := parseBundleKey(bkey)
	k := make([]byte, 0, 2+8+1+len(bkey))
	k = append(k, prefixTime, '/')
	k = binary.BigEndian.AppendUint64(k, ts)
	k = append(k, '/')
	return append(k, bkey...)
}

// parseIndexKey returns the u64 and the b/ key of a t/ or e/ key.
func parseIndexKey(k []byte) (uint64, []byte, error) {
	if len(k) != 2+8+1+bundleKeyLen {
		return 0, nil, fmt.Errorf("%w: index key of %d bytes", errCorrupt, len(k))
	}
	return binary.BigEndian.Uint64(k[2:]), k[11:], nil
}

// Bytes returns the logical bytes the store holds (see Options.MaxBytes).
func (s *Store) Bytes() int64 { return s.bytes.Load() }

// MaxBytes returns the store budget (0: none).
func (s *Store) MaxBytes() int64 { return max(s.opts.MaxBytes, 0) }

// eviction is what makeRoom removed, for the caller's counters.
type eviction struct {
	freed   int64
	bundles int64
	emptied int64       // devices left with no bundle
	removed [][]byte    // b/ keys, for the digests
	notices noticeDelta // claim records that went with their bundles
}

// makeRoom evicts other devices' bundles in txn until need bytes are
// free: ended KeyPackages first, then bundles older than olderThan. self's
// bundles are left alone (the caller has already applied its quota).
func (s *Store) makeRoom(txn *badger.Txn, need int64, olderThan uint64, self *protocol.Key) (eviction, error) {
	var ev eviction
	nowMS := s.opts.Now().UnixMilli()
	seen := map[string]bool{}
	evict := func(bkey []byte) (bool, error) {
		if seen[string(bkey)] {
			return false, nil
		}
		seen[string(bkey)] = true
		if _, err := txn.Get(bkey); errors.Is(err, badger.ErrKeyNotFound) {
			return false, nil // a stale index entry
		} else if err != nil {
			return false, err
		}
		dev := keyOf(bkey)
		if self != nil && dev == *self {
			return false, nil
		}
		held, err := getCount(txn, dev)
		if err != nil {
			return false, err
		}
		rv, err := deleteBundleRecord(txn, bkey, true, &ev.notices)
		if err != nil {
			return false, err
		}
		if err := setCount(txn, dev, held-1); err != nil {
			return false, err
		}
		if held-1 <= 0 {
			ev.emptied++
		}
		ev.freed += int64(rv.Bytes)
		ev.bundles++
		ev.removed = append(ev.removed, bkey)
		return true, nil
	}
	// scan walks an index oldest first, evicting while ok(value) holds.
	scan := func(prefix byte, ok func(v uint64) bool) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefix, '/'}})
		defer it.Close()
		tried := 0
		for it.Rewind(); it.Valid() && ev.freed < need && ev.bundles < evictPerPut && tried < 4*evictPerPut; it.Next() {
			tried++
			v, bkey, err := parseIndexKey(it.Item().Key())
			if err != nil {
				continue
			}
			if !ok(v) {
				return nil
			}
			if _, err := evict(bytesClone(bkey)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := scan(prefixLifetime, func(na uint64) bool { return int64(na) < nowMS }); err != nil {
		return ev, err
	}
	if ev.freed < need {
		if err := scan(prefixTime, func(ts uint64) bool { return ts < olderThan }); err != nil {
			return ev, err
		}
	}
	if ev.freed < need {
		return ev, fmt.Errorf("%w: %d bytes held of %d, no room for %d more", ErrStoreFull, s.bytes.Load(), s.opts.MaxBytes, need-ev.freed)
	}
	return ev, nil
}

func accountBytes(a *Account) int64 { return int64(len(a.Payload) + recordOverhead) }

func bytesClone(b []byte) []byte { return append([]byte(nil), b...) }

// over returns how far adding delta bytes would take the store over its
// budget (<= 0: it fits).
func (s *Store) over(delta int64) int64 {
	if s.opts.MaxBytes <= 0 || delta <= 0 {
		return 0
	}
	return s.bytes.Load() + delta - s.opts.MaxBytes
}

// checkDisk refuses a write of about n bytes when the filesystem would
// keep less than MinFreeDisk free. A filesystem that cannot say is not
// checked.
func (s *Store) checkDisk(n int) error {
	if s.opts.MinFreeDisk <= 0 {
		return nil
	}
	free, err := s.diskFree()
	if err != nil {
		return nil
	}
	if free-int64(n) < s.opts.MinFreeDisk {
		return fmt.Errorf("%w: the disk has %d bytes free, below the reserve of %d", ErrStoreFull, free, s.opts.MinFreeDisk)
	}
	return nil
}

// mapWriteErr turns a full disk into ErrStoreFull. Badger commits a
// transaction whole or not at all, so a failed write leaves nothing behind.
func mapWriteErr(err error) error {
	if err != nil && errors.Is(err, syscall.ENOSPC) && !errors.Is(err, ErrStoreFull) {
		return fmt.Errorf("%w: disk full: %w", ErrStoreFull, err)
	}
	return err
}
