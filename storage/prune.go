package storage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dgraph-io/badger/v4"
)

// PruneStats counts what one Prune removed.
type PruneStats struct {
	Bundles       int // past the retention
	LifetimeEnded int // KeyPackage lifetime ended more than ClockSkew ago
	Accounts      int
	Tombstones    int // consume tombstones past their until
	Consumes      int // consume notices past their timestamp plus the retention
}

// pruneChunk bounds the deletions of one transaction.
const pruneChunk = 512

// Prune deletes bundles whose signed timestamp and account bundles whose
// last update are older than the retention, and bundles whose KeyPackage
// lifetime ended more than ClockSkew ago.
func (s *Store) Prune(ctx context.Context) (st PruneStats, err error) {
	defer recoverCorrupt(&err)
	cutoff := s.opts.Now().Add(-s.opts.Retention).UnixMilli()
	if cutoff <= 0 {
		return st, nil
	}
	st.Bundles, err = s.pruneIndex(ctx, prefixTime, func(ts uint64) bool { return ts < uint64(cutoff) })
	if err != nil {
		return st, fmt.Errorf("storage: prune bundles: %w", err)
	}
	st.LifetimeEnded, err = s.pruneLifetimes(ctx)
	if err != nil {
		return st, err
	}
	st.Accounts, err = s.pruneAccounts(ctx, cutoff)
	if err != nil {
		return st, fmt.Errorf("storage: prune accounts: %w", err)
	}
	if err := s.pruneTombstones(ctx); err != nil {
		return st, fmt.Errorf("storage: prune tombstones: %w", err)
	}
	st.Tombstones, st.Consumes, err = s.pruneConsumed(ctx)
	if err != nil {
		return st, fmt.Errorf("storage: prune consume records: %w", err)
	}
	return st, nil
}

// pruneBundles deletes the given b/ keys in one transaction, re-checking
// each inside it so a concurrent put is never undone. idx, if not nil, are
// the index entries the keys were found by (one per key), deleted too,
// even when their bundle is already gone.
func (s *Store) pruneBundles(ctx context.Context, keys, idx [][]byte) (int, error) {
	var removed, emptied int
	var freed int64
	var deleted [][]byte
	var nd noticeDelta
	err := s.update(ctx, func(txn *badger.Txn) error {
		removed, emptied, freed, deleted = 0, 0, 0, nil
		nd.reset()
		for i, k := range keys {
			if idx != nil {
				if err := txn.Delete(idx[i]); err != nil {
					return err
				}
			}
			if k == nil {
				continue
			}
			if _, err := txn.Get(k); errors.Is(err, badger.ErrKeyNotFound) {
				continue // evicted or refreshed meanwhile
			} else if err != nil {
				return err
			}
			dev := keyOf(k)
			held, err := getCount(txn, dev) // sees this transaction's own updates
			if err != nil {
				return err
			}
			rv, err := deleteBundleRecord(txn, k, true, &nd)
			if err != nil {
				return err
			}
			freed += int64(rv.Bytes)
			if err := setCount(txn, dev, held-1); err != nil {
				return err
			}
			if held-1 <= 0 {
				emptied++
			}
			deleted = append(deleted, k)
			removed++
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	s.bundles.Add(-int64(removed))
	s.devices.Add(-int64(emptied))
	s.bytes.Add(-freed)
	s.digests.updateBundles(nil, deleted)
	s.applyNotices(&nd)
	return removed, nil
}

func (s *Store) pruneAccounts(ctx context.Context, cutoff int64) (int, error) {
	var stale [][]byte
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixAccount, '/'}, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var a Account
			if err := it.Item().Value(func(v []byte) error { return decodeAccountValue(&a, v) }); err != nil {
				return err
			}
			if a.UpdatedAtMS < cutoff {
				stale = append(stale, it.Item().KeyCopy(nil))
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	total := 0
	for len(stale) > 0 {
		n := min(pruneChunk, len(stale))
		chunk := stale[:n]
		stale = stale[n:]
		var removed int
		var gone []*Account
		err := s.update(ctx, func(txn *badger.Txn) error {
			removed, gone = 0, nil
			for _, k := range chunk {
				item, err := txn.Get(k)
				if errors.Is(err, badger.ErrKeyNotFound) {
					continue
				}
				if err != nil {
					return err
				}
				var a Account
				if err := item.Value(func(v []byte) error { return decodeAccountValue(&a, v) }); err != nil {
					return err
				}
				if a.UpdatedAtMS >= cutoff {
					continue // updated meanwhile
				}
				if err := txn.Delete(k); err != nil {
					return err
				}
				a.AccountPub = keyOf(k)
				until := s.opts.Now().Add(s.opts.Retention).UnixMilli()
				tomb := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, a.Lamport), uint64(until))
				if err := txn.Set(tombstoneKey(a.AccountPub), tomb); err != nil {
					return err
				}
				gone = append(gone, &a)
				removed++
			}
			return nil
		})
		if err != nil {
			return total, err
		}
		s.accounts.Add(-int64(removed))
		for _, a := range gone {
			s.bytes.Add(-accountBytes(a))
			s.digests.updateAccount(nil, a)
		}
		total += removed
	}
	return total, nil
}

// gcValueLog reclaims value-log space after deletions.
func (s *Store) gcValueLog() {
	for i := 0; i < 8; i++ {
		if err := s.db.RunValueLogGC(0.5); err != nil {
			return // badger.ErrNoRewrite and friends: nothing (more) to do
		}
	}
}

// pruneTombstones deletes account tombstones whose time has passed.
func (s *Store) pruneTombstones(ctx context.Context) error {
	now := s.opts.Now().UnixMilli()
	var expired [][]byte
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixTombstone, '/'}, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			err := it.Item().Value(func(v []byte) error {
				if len(v) == 16 && int64(binary.BigEndian.Uint64(v[8:])) <= now {
					expired = append(expired, it.Item().KeyCopy(nil))
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil || len(expired) == 0 {
		return err
	}
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	for _, k := range expired {
		if err := wb.Delete(k); err != nil {
			return err
		}
	}
	return wb.Flush()
}

// pruneLifetimes deletes the bundles whose KeyPackage lifetime ended more
// than ClockSkew ago: no node's validation accepts them any more, so sync
// cannot bring them back. The e/ index makes this a scan of exactly those.
func (s *Store) pruneLifetimes(ctx context.Context) (n int, err error) {
	defer recoverCorrupt(&err)
	cutoff := s.opts.Now().Add(-s.opts.ClockSkew).UnixMilli()
	n, err = s.pruneIndex(ctx, prefixLifetime, func(na uint64) bool { return int64(na) < cutoff })
	if err != nil {
		return n, fmt.Errorf("storage: lifetime prune: %w", err)
	}
	return n, nil
}

// pruneIndex deletes the bundles of an index (t/ or e/, ordered by a u64)
// from its start while due(value) holds, pruneChunk per transaction.
func (s *Store) pruneIndex(ctx context.Context, prefix byte, due func(uint64) bool) (int, error) {
	total := 0
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		var keys, idx [][]byte
		err := s.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefix, '/'}})
			defer it.Close()
			for it.Rewind(); it.Valid() && len(keys) < pruneChunk; it.Next() {
				k := it.Item().KeyCopy(nil)
				v, bkey, err := parseIndexKey(k)
				if err != nil {
					// Not an entry this build wrote: drop it, keep the bundle.
					keys, idx = append(keys, nil), append(idx, k)
					continue
				}
				if !due(v) {
					break
				}
				keys, idx = append(keys, bkey), append(idx, k)
			}
			return nil
		})
		if err != nil || len(keys) == 0 {
			return total, err
		}
		n, err := s.pruneBundles(ctx, keys, idx)
		total += n
		if err != nil || len(keys) < pruneChunk {
			return total, err
		}
	}
}
