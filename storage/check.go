package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// recoverCorrupt turns a panic in a storage call into an error wrapping
// errCorrupt, so that a record damaged on disk fails the one call that
// reads it instead of taking the process down.
func recoverCorrupt(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("%w: panic: %v", errCorrupt, r)
	}
}

// Repairs counts what the startup consistency check fixed.
type Repairs struct {
	Malformed    int // keys of a wrong shape and values that do not decode, deleted
	DuplicateRef int // older b/ copies of a ref held twice, deleted
	Refs         int // r/ entries missing or naming the wrong timestamp, rewritten
	DanglingRefs int // r/ entries without their b/, deleted
	LastResort   int // l/ entries without their b/, deleted
	Counts       int // n/ counts that differed from the device's b/ keys, rewritten
	TimeIndex    int // t/ entries dropped and written again (the index is rebuilt when it drifted)
	LifetimeIdx  int // e/ entries dropped and written again (likewise)
	GlobalRefs   int // g/ entries dropped and written again (likewise; after the migration to schema 3, the build)
	Claims       int // claim records whose bundle is gone, deleted
}

// Total is the number of repairs.
func (r Repairs) Total() int {
	return r.Malformed + r.DuplicateRef + r.Refs + r.DanglingRefs + r.LastResort + r.Counts + r.TimeIndex + r.LifetimeIdx +
		r.GlobalRefs + r.Claims
}

func (r Repairs) logAttrs() []any {
	return []any{"malformed", r.Malformed, "duplicate_refs", r.DuplicateRef, "refs", r.Refs,
		"dangling_refs", r.DanglingRefs, "last_resort", r.LastResort, "counts", r.Counts,
		"time_index", r.TimeIndex, "lifetime_index", r.LifetimeIdx, "global_refs", r.GlobalRefs, "claims", r.Claims}
}

// family iterates one per-device key family (b/, l/, r/ or n/) group by
// group, where a group is one device's keys. All four families sort by
// their group first, so the check walks them side by side and holds one
// device's keys at a time.
type family struct {
	it       *badger.Iterator
	keyLen   int
	values   bool // r/ and n/: the (small, inline) values are needed
	onBadKey func(k []byte)
}

type entry struct {
	key, val []byte
}

func newFamily(txn *badger.Txn, prefix byte, keyLen int, values bool, onBadKey func([]byte)) *family {
	f := &family{it: txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefix, '/'}}), keyLen: keyLen, values: values, onBadKey: onBadKey}
	f.it.Rewind()
	f.skipBad()
	return f
}

// skipBad moves past keys of the wrong length, reporting each.
func (f *family) skipBad() {
	for ; f.it.Valid() && !wellFormed(f.it.Item().Key(), f.keyLen); f.it.Next() {
		f.onBadKey(f.it.Item().KeyCopy(nil))
	}
}

// group returns the current key's group, or nil when the family is done.
func (f *family) group() []byte {
	if !f.it.Valid() {
		return nil
	}
	return keyGroup(f.it.Item().Key())
}

// take returns the entries of group g and moves past them.
func (f *family) take(g []byte) ([]entry, error) {
	var out []entry
	for f.it.Valid() && bytes.Equal(keyGroup(f.it.Item().Key()), g) {
		e := entry{key: f.it.Item().KeyCopy(nil)}
		if f.values {
			v, err := f.it.Item().ValueCopy(nil)
			if err != nil {
				return nil, err
			}
			e.val = v
		}
		out = append(out, e)
		f.it.Next()
		f.skipBad()
	}
	return out, nil
}

// checkConsistency walks every per-device key (keys only, plus the 8-byte
// r/ and 4-byte n/ values) and repairs drift between them: the n/ count
// equals the device's b/ keys, every r/ names an existing b/ with the same
// timestamp, every b/ has its r/, every l/ has its b/, and a ref is held
// once. It runs on Open, before any writer. After a migration, which
// leaves the counts to it, what it rebuilds is expected and logged at Info.
func (s *Store) checkConsistency(migrated bool) (Repairs, error) {
	var rep Repairs
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	var werr error
	del := func(k []byte) {
		if err := wb.Delete(k); err != nil && werr == nil {
			werr = err
		}
	}
	set := func(k, v []byte) {
		if err := wb.Set(k, v); err != nil && werr == nil {
			werr = err
		}
	}
	bad := func(k []byte) { rep.Malformed++; del(k) }
	seed := maphash.MakeSeed()
	want := newIndexSums(seed) // what t/ and e/ should hold, from the b/ walk
	have := newIndexSums(seed) // what they hold
	err := s.db.View(func(txn *badger.Txn) error {
		if err := have.scan(txn); err != nil {
			return err
		}
		// Account bundles: a key of the wrong shape cannot be looked up and
		// a value that does not decode cannot be served or synced.
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixAccount, '/'}, PrefetchValues: true})
		for it.Rewind(); it.Valid(); it.Next() {
			if !wellFormed(it.Item().Key(), accountKeyLen) {
				bad(it.Item().KeyCopy(nil))
			} else if _, err := accountFromItem(it.Item()); errors.Is(err, errCorrupt) {
				bad(it.Item().KeyCopy(nil))
			} else if err != nil {
				it.Close()
				return err
			}
		}
		it.Close()
		fb := newFamily(txn, prefixBundle, bundleKeyLen, false, bad)
		defer fb.it.Close()
		fl := newFamily(txn, prefixLastResort, bundleKeyLen, false, bad)
		defer fl.it.Close()
		fr := newFamily(txn, prefixRef, refKeyLen, true, bad)
		defer fr.it.Close()
		fn := newFamily(txn, prefixCount, countKeyLen, true, bad)
		defer fn.it.Close()
		for {
			var g []byte
			for _, f := range []*family{fb, fl, fr, fn} {
				if fg := f.group(); fg != nil && (g == nil || bytes.Compare(fg, g) < 0) {
					g = fg
				}
			}
			if g == nil {
				return werr
			}
			g = bytes.Clone(g)
			bs, err := fb.take(g)
			if err != nil {
				return err
			}
			ls, err := fl.take(g)
			if err != nil {
				return err
			}
			rs, err := fr.take(g)
			if err != nil {
				return err
			}
			ns, err := fn.take(g)
			if err != nil {
				return err
			}
			if err := s.repairDevice(txn, &rep, want, bs, ls, rs, ns, set, del); err != nil {
				return err
			}
			if werr != nil {
				return werr
			}
		}
	})
	if err != nil {
		return rep, fmt.Errorf("storage: consistency check: %w", err)
	}
	if err := wb.Flush(); err != nil {
		return rep, fmt.Errorf("storage: consistency repair: %w", err)
	}
	if want.time != have.time {
		n, err := s.rebuildIndex(prefixTime)
		if err != nil {
			return rep, fmt.Errorf("storage: rebuild the time index: %w", err)
		}
		rep.TimeIndex = n
	}
	if want.lifetime != have.lifetime {
		n, err := s.rebuildIndex(prefixLifetime)
		if err != nil {
			return rep, fmt.Errorf("storage: rebuild the lifetime index: %w", err)
		}
		rep.LifetimeIdx = n
	}
	if want.global != have.global {
		n, err := s.rebuildGlobalRefs()
		if err != nil {
			return rep, fmt.Errorf("storage: rebuild the global ref index: %w", err)
		}
		rep.GlobalRefs = n
	}
	if err := s.checkNotices(&rep); err != nil {
		return rep, fmt.Errorf("storage: check notices: %w", err)
	}
	if rep.Total() > 0 && migrated {
		s.log.Info("storage: rebuilt indexes after the migration", rep.logAttrs()...)
	} else if rep.Total() > 0 {
		s.log.Warn("storage: repaired drift between records and indexes on open", rep.logAttrs()...)
	} else {
		s.log.Debug("storage: consistency check found no drift")
	}
	return rep, nil
}

// repairDevice checks one device's keys (each list in key order). It
// reads a bundle's value only to rebuild its r/ entry; a value that does
// not decode then is deleted with its keys.
func (s *Store) repairDevice(txn *badger.Txn, rep *Repairs, want *indexSums, bs, ls, rs, ns []entry, set func(k, v []byte), del func(k []byte)) error {
	// b/ keys run newest first: the first copy of a ref is its newest.
	kept := make(map[protocol.Ref][]byte, len(bs)) // ref -> its b/ key
	notAfter := make(map[protocol.Ref]int64, len(bs))
	var dev protocol.Key
	for _, e := range bs {
		d, _, ref, err := parseBundleKey(e.key)
		if err != nil { // cannot happen: lengths were checked
			rep.Malformed++
			del(e.key)
			continue
		}
		dev = d
		if _, dup := kept[ref]; dup {
			rep.DuplicateRef++
			del(e.key)
			del(lastResortTwin(e.key))
			continue
		}
		kept[ref] = e.key
	}
	// rewriteRef rebuilds an r/ entry from the bundle's value, or drops a
	// bundle whose value is damaged.
	rewriteRef := func(rk []byte, ref protocol.Ref) error {
		bkey := kept[ref]
		item, err := txn.Get(bkey)
		if err != nil {
			return err
		}
		b, err := bundleFromItem(item)
		if errors.Is(err, errCorrupt) {
			rep.Malformed++
			del(bkey)
			del(lastResortTwin(bkey))
			del(rk)
			delete(kept, ref)
			return nil
		}
		if err != nil {
			return err
		}
		rep.Refs++
		set(rk, refValue{TS: b.TimestampMS, NotAfterMS: b.NotAfterMS, Bytes: bundleBytes(b)}.encode())
		notAfter[ref] = b.NotAfterMS
		return nil
	}
	seen := make(map[protocol.Ref]bool, len(rs))
	for _, e := range rs {
		ref := refOfRefKey(e.key)
		bkey, ok := kept[ref]
		if !ok {
			rep.DanglingRefs++
			del(e.key)
			continue
		}
		seen[ref] = true
		_, ts, _, _ := parseBundleKey(bkey)
		if rv, err := decodeRefValue(e.val); err != nil || rv.TS != ts {
			if err := rewriteRef(e.key, ref); err != nil {
				return err
			}
		} else {
			notAfter[ref] = rv.NotAfterMS
		}
	}
	for ref := range kept {
		if !seen[ref] {
			if err := rewriteRef(refKey(dev, ref), ref); err != nil {
				return err
			}
		}
	}
	held := make(map[string]bool, len(kept))
	for ref, k := range kept {
		held[string(k)] = true
		want.add(k, notAfter[ref])
		want.global += maphash.Bytes(want.seed, globalRefKey(ref, dev))
	}
	for _, e := range ls {
		if !held[string(bundleTwin(e.key))] {
			rep.LastResort++
			del(e.key)
		}
	}
	have := 0 // an absent n/ is a count of 0
	var nkey []byte
	for _, e := range ns {
		nkey = e.key
		have = -1 // malformed unless it is 4 bytes
		if len(e.val) == 4 {
			have = int(binary.BigEndian.Uint32(e.val))
		}
	}
	if want := len(kept); have != want || (want == 0 && nkey != nil) {
		rep.Counts++
		switch {
		case want == 0:
			del(nkey)
		case nkey != nil:
			set(nkey, binary.BigEndian.AppendUint32(nil, uint32(want)))
		default:
			set(countKey(dev), binary.BigEndian.AppendUint32(nil, uint32(want)))
		}
	}
	return nil
}

// indexSums summarise the t/ and e/ indexes as sums of a hash of their
// entries, so that the check compares them with the b/ keys in constant
// memory; an index that differs is rebuilt.
type indexSums struct {
	seed                   maphash.Seed
	time, lifetime, global uint64
}

func newIndexSums(seed maphash.Seed) *indexSums { return &indexSums{seed: seed} }

func (x *indexSums) add(bkey []byte, notAfterMS int64) {
	x.time += maphash.Bytes(x.seed, bkey)
	if notAfterMS != 0 {
		x.lifetime += maphash.Bytes(x.seed, lifetimeKey(notAfterMS, bkey))
	}
}

// scan sums the t/ and e/ entries as add would have (keys only).
func (x *indexSums) scan(txn *badger.Txn) error {
	for _, prefix := range []byte{prefixTime, prefixLifetime, prefixGlobalRef} {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefix, '/'}})
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()
			if prefix == prefixGlobalRef {
				x.global += maphash.Bytes(x.seed, k)
				continue
			}
			if prefix == prefixLifetime {
				x.lifetime += maphash.Bytes(x.seed, k)
				continue
			}
			_, bkey, err := parseIndexKey(k)
			if err != nil || !bytes.Equal(timeKey(bkey), k) {
				x.time++ // a malformed entry: the sums differ, the index is rebuilt
				continue
			}
			x.time += maphash.Bytes(x.seed, bkey)
		}
		it.Close()
	}
	return nil
}

// rebuildIndex drops every entry of t/ or e/ and writes it again from the
// b/ keys (t/) or the r/ entries (e/). It runs only when the check found
// the index drifted.
func (s *Store) rebuildIndex(prefix byte) (n int, err error) {
	drop := s.db.NewWriteBatch()
	defer drop.Cancel()
	err = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefix, '/'}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
			if err := drop.Delete(it.Item().KeyCopy(nil)); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		err = drop.Flush()
	}
	if err != nil {
		return 0, err
	}
	add := s.db.NewWriteBatch()
	defer add.Cancel()
	err = s.db.View(func(txn *badger.Txn) error {
		if prefix == prefixTime {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixBundle, '/'}})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				n++
				if err := add.Set(timeKey(it.Item().KeyCopy(nil)), nil); err != nil {
					return err
				}
			}
			return nil
		}
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixRef, '/'}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			rv, err := refFromItem(it.Item())
			if err != nil {
				return err
			}
			if rv.NotAfterMS == 0 {
				continue
			}
			k := it.Item().Key()
			bkey := bundleKey(prefixBundle, keyOf(k), rv.TS, refOfRefKey(k))
			n++
			if err := add.Set(lifetimeKey(rv.NotAfterMS, bkey), nil); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		err = add.Flush()
	}
	return n, err
}

// rebuildGlobalRefs drops every g/ entry and writes it again from the r/
// entries. It runs when the check found the index drifted, and once after
// the migration to schema 3 (which added it).
func (s *Store) rebuildGlobalRefs() (int, error) {
	n, err := s.rebuildFrom(prefixGlobalRef, prefixRef, func(k []byte) []byte {
		if len(k) != refKeyLen {
			return nil
		}
		return globalRefKey(refOfRefKey(k), keyOf(k))
	})
	return n, err
}

// rebuildFrom drops every key of family drop and writes, for every key of
// family from, the key entry(k) (none when nil), with an empty value.
func (s *Store) rebuildFrom(drop, from byte, entry func(k []byte) []byte) (n int, err error) {
	del := s.db.NewWriteBatch()
	defer del.Cancel()
	err = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{drop, '/'}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
			if err := del.Delete(it.Item().KeyCopy(nil)); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		err = del.Flush()
	}
	if err != nil {
		return 0, err
	}
	add := s.db.NewWriteBatch()
	defer add.Cancel()
	err = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{from, '/'}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if k := entry(it.Item().Key()); k != nil {
				n++
				if err := add.Set(k, nil); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err == nil {
		err = add.Flush()
	}
	return n, err
}

// checkNotices deletes the single-use records that cannot be used: keys
// of a wrong shape, values that do not decode, and claim records whose
// bundle is gone (cheap: one point lookup per claim).
func (s *Store) checkNotices(rep *Repairs) error {
	wb := s.db.NewWriteBatch()
	defer wb.Cancel()
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixNotice, '/'}, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().KeyCopy(nil)
			if !wellFormed(k, noticeKeyLen) || k[2+groupLen] != '/' || k[noticeKindOffset+1] != '/' {
				rep.Malformed++
				if err := wb.Delete(k); err != nil {
					return err
				}
				continue
			}
			dev := keyOf(k)
			kind, id := noticeID(k)
			var bad bool
			if err := it.Item().Value(func(v []byte) error {
				switch kind {
				case noticeClaim:
					_, err := decodeClaimValue(dev, id, v)
					bad = err != nil
				case noticeConsume:
					_, _, err := decodeConsumeValue(dev, id, v)
					bad = err != nil
				default:
					bad = true
				}
				return nil
			}); err != nil {
				return err
			}
			if bad {
				rep.Malformed++
				if err := wb.Delete(k); err != nil {
					return err
				}
				continue
			}
			if kind != noticeClaim {
				continue
			}
			switch _, err := txn.Get(refKey(dev, id)); {
			case errors.Is(err, badger.ErrKeyNotFound):
				rep.Claims++
				if err := wb.Delete(k); err != nil {
					return err
				}
			case err != nil:
				return err
			}
		}
		zt := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixConsumed, '/'}, PrefetchValues: true})
		defer zt.Close()
		for zt.Rewind(); zt.Valid(); zt.Next() {
			k := zt.Item().KeyCopy(nil)
			bad := !wellFormed(k, consumedKeyLen)
			if !bad {
				if err := zt.Item().Value(func(v []byte) error {
					_, err := decodeTombstone(v)
					bad = err != nil
					return nil
				}); err != nil {
					return err
				}
			}
			if bad {
				rep.Malformed++
				if err := wb.Delete(k); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return wb.Flush()
}
