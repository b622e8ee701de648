package storage

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// Records of single use (see the layout in keys.go):
//
//	v/<h0>/<device 32>/c/<ref 32>     -> claim record: hand-outs u64 ‖ node_key 32 ‖ signature 64 ‖ payload 88
//	v/<h0>/<device 32>/q/<sha256 32>  -> consume record: signature 64 ‖ payload
//	z/<h0>/<device 32>/<ref 32>       -> tombstone: until_ms u64
//	g/<ref 32>/<device 32>            -> empty: the devices a ref is held under
const (
	prefixNotice    = 'v'
	prefixConsumed  = 'z'
	prefixGlobalRef = 'g'

	noticeClaim   = 'c'
	noticeConsume = 'q'

	noticeKeyLen    = 2 + groupLen + 1 + 1 + 1 + 32
	consumedKeyLen  = 2 + groupLen + 1 + protocol.RefSize
	globalRefKeyLen = 2 + protocol.RefSize + 1 + protocol.KeySize

	claimValueLen    = 8 + protocol.KeySize + protocol.SignatureSize + protocol.ClaimPayloadSize
	consumeValueHdr  = protocol.SignatureSize
	tombstoneValLen  = 8
	noticeKindOffset = 2 + groupLen + 1
)

// What the single-use records cost in the store budget (MaxBytes): the
// value plus a fixed overhead for keys and headers, smaller than a
// bundle's since they have no index entries.
const (
	noticeOverhead = 128
	claimBytes     = int64(claimValueLen + noticeOverhead)
	tombstoneBytes = int64(noticeOverhead)
)

func consumeBytes(payloadLen int) int64 {
	return int64(consumeValueHdr + payloadLen + noticeOverhead)
}

func noticeKey(dev protocol.Key, kind byte, id [32]byte) []byte {
	k := append(groupKey(prefixNotice, dev, noticeKeyLen), '/', kind, '/')
	return append(k, id[:]...)
}

func noticePrefix(dev protocol.Key, kind byte) []byte {
	return append(groupKey(prefixNotice, dev, noticeKeyLen), '/', kind, '/')
}

func claimKey(dev protocol.Key, ref protocol.Ref) []byte { return noticeKey(dev, noticeClaim, ref) }

func consumedKey(dev protocol.Key, ref protocol.Ref) []byte {
	k := append(groupKey(prefixConsumed, dev, consumedKeyLen), '/')
	return append(k, ref[:]...)
}

func globalRefKey(ref protocol.Ref, dev protocol.Key) []byte {
	k := make([]byte, 0, globalRefKeyLen)
	k = append(k, prefixGlobalRef, '/')
	k = append(k, ref[:]...)
	k = append(k, '/')
	return append(k, dev[:]...)
}

func globalRefPrefix(ref protocol.Ref) []byte {
	k := make([]byte, 0, globalRefKeyLen)
	k = append(k, prefixGlobalRef, '/')
	k = append(k, ref[:]...)
	return append(k, '/')
}

// noticeID returns the kind and the last 32 bytes (ref or payload hash) of
// a v/ key of noticeKeyLen bytes.
func noticeID(k []byte) (kind byte, id [32]byte) {
	copy(id[:], k[len(k)-32:])
	return k[noticeKindOffset], id
}

// claimRecord is a stored claim: the winning notice and the hand-outs
// counted for the ref (last-resort refs count every distinct notice).
type claimRecord struct {
	HandedOut uint64
	Notice    protocol.ClaimNotice
	Info      protocol.ClaimInfo
}

func encodeClaimValue(r *claimRecord) []byte {
	v := make([]byte, 0, claimValueLen)
	v = binary.BigEndian.AppendUint64(v, r.HandedOut)
	v = append(v, r.Notice.NodeKey[:]...)
	v = append(v, r.Notice.Signature[:]...)
	return append(v, r.Notice.Payload...)
}

// decodeClaimValue decodes a claim record stored under (dev, ref): the
// payload must name them.
func decodeClaimValue(dev protocol.Key, ref protocol.Ref, v []byte) (*claimRecord, error) {
	if len(v) != claimValueLen {
		return nil, fmt.Errorf("%w: claim record of %d bytes", errCorrupt, len(v))
	}
	r := &claimRecord{HandedOut: binary.BigEndian.Uint64(v)}
	copy(r.Notice.NodeKey[:], v[8:])
	copy(r.Notice.Signature[:], v[8+protocol.KeySize:])
	r.Notice.Payload = append([]byte(nil), v[8+protocol.KeySize+protocol.SignatureSize:]...)
	ts, d, rf, err := protocol.DecodeClaimPayload(r.Notice.Payload)
	if err != nil {
		return nil, fmt.Errorf("%w: claim record: %w", errCorrupt, err)
	}
	if d != dev || rf != ref {
		return nil, fmt.Errorf("%w: claim record names another device or ref", errCorrupt)
	}
	r.Info = protocol.ClaimInfo{TimestampMS: ts, DeviceID: d, Ref: rf, Hash: protocol.ClaimHash(&r.Notice)}
	return r, nil
}

func encodeConsumeValue(n *protocol.ConsumeNotice) []byte {
	v := make([]byte, 0, consumeValueHdr+len(n.Payload))
	v = append(v, n.Signature[:]...)
	return append(v, n.Payload...)
}

// decodeConsumeValue decodes a consume record stored under (dev, id): id
// must be the payload's hash.
func decodeConsumeValue(dev protocol.Key, id [32]byte, v []byte) (*protocol.ConsumeNotice, protocol.ConsumeInfo, error) {
	var info protocol.ConsumeInfo
	if len(v) < consumeValueHdr || len(v) > consumeValueHdr+protocol.MaxConsumePayloadSize {
		return nil, info, fmt.Errorf("%w: consume record of %d bytes", errCorrupt, len(v))
	}
	n := &protocol.ConsumeNotice{DeviceID: dev}
	copy(n.Signature[:], v)
	n.Payload = append([]byte(nil), v[consumeValueHdr:]...)
	ts, refs, err := protocol.DecodeConsumePayload(n.Payload)
	if err != nil {
		return nil, info, fmt.Errorf("%w: consume record: %w", errCorrupt, err)
	}
	if sha256.Sum256(n.Payload) != id {
		return nil, info, fmt.Errorf("%w: consume record under another hash", errCorrupt)
	}
	return n, protocol.ConsumeInfo{TimestampMS: ts, Refs: refs, Hash: id}, nil
}

// A tombstone's value is its until (u64 BE), followed by a flag byte 1
// when the store did not hold the ref's bundle as it was written (those
// are capped per device: MaxUnheldConsumedPerDevice). Tombstones written
// before the flag existed have no flag byte and count as held.
func encodeTombstone(untilMS int64, unheld bool) []byte {
	v := binary.BigEndian.AppendUint64(nil, uint64(untilMS))
	if unheld {
		v = append(v, 1)
	}
	return v
}

func decodeTombstone(v []byte) (int64, error) {
	until, _, err := decodeTombstoneFlag(v)
	return until, err
}

func decodeTombstoneFlag(v []byte) (until int64, unheld bool, err error) {
	switch {
	case len(v) == tombstoneValLen:
	case len(v) == tombstoneValLen+1 && v[tombstoneValLen] == 1:
		unheld = true
	default:
		return 0, false, fmt.Errorf("%w: tombstone of %d bytes", errCorrupt, len(v))
	}
	return int64(binary.BigEndian.Uint64(v)), unheld, nil
}

// noticeItem is one notice's sync item, for the in-memory digests.
type noticeItem struct {
	dev  protocol.Key
	hash [32]byte
}

// noticeDelta collects what a transaction did to the single-use records,
// applied to the counters and digests after it commits.
type noticeDelta struct {
	added, removed []noticeItem
	claims, tombs  int64
}

func (d *noticeDelta) reset() { *d = noticeDelta{} }

func (s *Store) applyNotices(d *noticeDelta) {
	s.claims.Add(d.claims)
	s.tombs.Add(d.tombs)
	s.digests.updateNotices(d.added, d.removed)
}

// claimItemOf returns the sync item of a decoded claim record.
func claimItemOf(r *claimRecord) noticeItem {
	return noticeItem{dev: r.Info.DeviceID, hash: protocol.ClaimItem(r.Info)}
}

// getClaim reads the claim record of (dev, ref), nil when there is none.
func getClaim(txn *badger.Txn, dev protocol.Key, ref protocol.Ref) (*claimRecord, error) {
	item, err := txn.Get(claimKey(dev, ref))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r *claimRecord
	err = item.Value(func(v []byte) (err error) {
		r, err = decodeClaimValue(dev, ref, v)
		return err
	})
	return r, err
}

// dropRefRecords deletes what hangs off a (device, ref) that is no longer
// held: its global index entry and its claim record. A claim record that
// does not decode is deleted without a digest change (it was never in one).
func dropRefRecords(txn *badger.Txn, dev protocol.Key, ref protocol.Ref, nd *noticeDelta) (freed int64, err error) {
	if err := txn.Delete(globalRefKey(ref, dev)); err != nil {
		return 0, err
	}
	ck := claimKey(dev, ref)
	item, err := txn.Get(ck)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	var r *claimRecord
	if err := item.Value(func(v []byte) error {
		r, _ = decodeClaimValue(dev, ref, v)
		return nil
	}); err != nil {
		return 0, err
	}
	if err := txn.Delete(ck); err != nil {
		return 0, err
	}
	if r != nil && nd != nil {
		nd.removed = append(nd.removed, claimItemOf(r))
		nd.claims--
	}
	return int64(claimBytes), nil
}

// consumedUntil returns the until of (dev, ref)'s tombstone and whether
// one is stored (live or not).
func consumedUntil(txn *badger.Txn, dev protocol.Key, ref protocol.Ref) (int64, bool, error) {
	item, err := txn.Get(consumedKey(dev, ref))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	var until int64
	err = item.Value(func(v []byte) (err error) {
		until, err = decodeTombstone(v)
		return err
	})
	return until, err == nil, err
}

// heldElsewhere reports whether ref is held under a device other than dev
// and not under dev itself (with MLS validation off one ref may be held
// under two devices; a device may name its own).
func heldElsewhere(txn *badger.Txn, dev protocol.Key, ref protocol.Ref) (bool, error) {
	it := txn.NewIterator(badger.IteratorOptions{Prefix: globalRefPrefix(ref)})
	defer it.Close()
	other := false
	for it.Rewind(); it.Valid(); it.Next() {
		k := it.Item().Key()
		if len(k) != globalRefKeyLen {
			continue
		}
		var d protocol.Key
		copy(d[:], k[len(k)-protocol.KeySize:])
		if d == dev {
			return false, nil
		}
		other = true
	}
	return other, nil
}

func uint64FromBE(v []byte) uint64 { return binary.BigEndian.Uint64(v) }

// recountNotices adds the notice records to dig and returns the claim
// records, tombstones, the bytes all of them cost and the bytes the
// consume records (notices and tombstones) cost. A record that does not
// decode is not counted (the startup check deletes it).
func recountNotices(txn *badger.Txn, dig *shardDigests) (claims, tombs, size, consumeSize int64, err error) {
	it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixNotice, '/'}, PrefetchValues: true})
	for it.Rewind(); it.Valid(); it.Next() {
		k := it.Item().Key()
		if len(k) != noticeKeyLen {
			continue
		}
		dev := keyOf(k)
		kind, id := noticeID(k)
		err := it.Item().Value(func(v []byte) error {
			switch kind {
			case noticeClaim:
				if r, err := decodeClaimValue(dev, id, v); err == nil {
					dig.addNotice(claimItemOf(r))
					claims++
					size += claimBytes
				}
			case noticeConsume:
				if _, info, err := decodeConsumeValue(dev, id, v); err == nil {
					dig.addNotice(noticeItem{dev: dev, hash: protocol.ConsumeItem(dev, info)})
					size += consumeBytes(len(v) - consumeValueHdr)
					consumeSize += consumeBytes(len(v) - consumeValueHdr)
				}
			}
			return nil
		})
		if err != nil {
			it.Close()
			return 0, 0, 0, 0, err
		}
	}
	it.Close()
	it = txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixConsumed, '/'}})
	defer it.Close()
	for it.Rewind(); it.Valid(); it.Next() {
		if len(it.Item().Key()) == consumedKeyLen {
			tombs++
			size += tombstoneBytes
			consumeSize += tombstoneBytes
		}
	}
	return claims, tombs, size, consumeSize, nil
}

// pruneConsumed deletes the consume tombstones whose until has passed and
// the consume notices whose timestamp plus the retention has, pruneChunk
// per transaction, checking each again inside it.
func (s *Store) pruneConsumed(ctx context.Context) (tombs, notices int, err error) {
	defer recoverCorrupt(&err)
	now := s.opts.Now().UnixMilli()
	retention := s.opts.Retention.Milliseconds()
	dueTomb := func(k, v []byte) bool {
		until, err := decodeTombstone(v)
		return err != nil || len(k) != consumedKeyLen || until <= now
	}
	dueNotice := func(k, v []byte) bool {
		if len(k) != noticeKeyLen {
			return false // the startup check's to delete
		}
		kind, id := noticeID(k)
		if kind != noticeConsume {
			return false
		}
		_, info, err := decodeConsumeValue(keyOf(k), id, v)
		return err == nil && int64(min(info.TimestampMS, uint64(math.MaxInt64/2)))+retention <= now
	}
	tombs, err = s.pruneWhere(ctx, prefixConsumed, dueTomb, func(txn *badger.Txn, k, v []byte, nd *noticeDelta) (int64, error) {
		if len(k) == consumedKeyLen {
			nd.tombs--
			return tombstoneBytes, nil
		}
		return 0, nil
	})
	if err != nil {
		return tombs, 0, err
	}
	notices, err = s.pruneWhere(ctx, prefixNotice, dueNotice, func(txn *badger.Txn, k, v []byte, nd *noticeDelta) (int64, error) {
		dev := keyOf(k)
		_, id := noticeID(k)
		_, info, _ := decodeConsumeValue(dev, id, v)
		nd.removed = append(nd.removed, noticeItem{dev: dev, hash: protocol.ConsumeItem(dev, info)})
		return consumeBytes(len(v) - consumeValueHdr), nil
	})
	return tombs, notices, err
}

// pruneWhere deletes the keys of family p whose (key, value) are due,
// calling gone for each deletion (inside the transaction) for the
// counters, digests and bytes it frees.
func (s *Store) pruneWhere(ctx context.Context, p byte, due func(k, v []byte) bool,
	gone func(txn *badger.Txn, k, v []byte, nd *noticeDelta) (int64, error)) (int, error) {
	var keys [][]byte
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{p, '/'}, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if err := it.Item().Value(func(v []byte) error {
				if due(it.Item().Key(), v) {
					keys = append(keys, it.Item().KeyCopy(nil))
				}
				return nil
			}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	total := 0
	for len(keys) > 0 {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		chunk := keys[:min(len(keys), pruneChunk)]
		keys = keys[len(chunk):]
		var nd noticeDelta
		var freed int64
		n := 0
		err := s.update(ctx, func(txn *badger.Txn) error {
			nd.reset()
			freed, n = 0, 0
			for _, k := range chunk {
				item, err := txn.Get(k)
				if errors.Is(err, badger.ErrKeyNotFound) {
					continue
				}
				if err != nil {
					return err
				}
				v, err := item.ValueCopy(nil)
				if err != nil {
					return err
				}
				if !due(k, v) {
					continue // rewritten meanwhile
				}
				f, err := gone(txn, k, v, &nd)
				if err != nil {
					return err
				}
				if err := txn.Delete(k); err != nil {
					return err
				}
				freed += f
				n++
			}
			return nil
		})
		if err != nil {
			return total, err
		}
		s.bytes.Add(-freed)
		s.consumeBytes.Add(-freed) // both pruned families are consume records
		s.applyNotices(&nd)
		total += n
	}
	return total, nil
}

// ConsumeNotices returns up to limit of dev's stored consume notices,
// newest first (by signed timestamp, then payload hash), so a fetch answer
// can carry them to a requester that remembers a consumed bundle. A record
// that does not decode is skipped (the startup check deletes it).
func (s *Store) ConsumeNotices(ctx context.Context, dev protocol.Key, limit int) (_ []*protocol.ConsumeNotice, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if limit <= 0 {
		return nil, nil
	}
	type entry struct {
		n    *protocol.ConsumeNotice
		ts   uint64
		hash [32]byte
	}
	newer := func(a, b entry) bool {
		if a.ts != b.ts {
			return a.ts > b.ts
		}
		return string(a.hash[:]) < string(b.hash[:])
	}
	// top holds the newest limit entries seen, newest first; a device may
	// hold many notices, so at most limit are kept in memory.
	var top []entry
	err = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: noticePrefix(dev, noticeConsume)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := it.Item().Key()
			if len(k) != noticeKeyLen {
				continue
			}
			_, id := noticeID(k)
			var e entry
			if err := it.Item().Value(func(v []byte) error {
				n, info, err := decodeConsumeValue(dev, id, v)
				if err == nil {
					e = entry{n: n, ts: info.TimestampMS, hash: id}
				}
				return nil
			}); err != nil {
				return err
			}
			if e.n == nil || (len(top) == limit && !newer(e, top[len(top)-1])) {
				continue
			}
			i := sort.Search(len(top), func(i int) bool { return newer(e, top[i]) })
			if len(top) < limit {
				top = append(top, entry{})
			}
			copy(top[i+1:], top[i:len(top)-1])
			top[i] = e
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("storage: consume notices: %w", err)
	}
	out := make([]*protocol.ConsumeNotice, len(top))
	for i, e := range top {
		out[i] = e.n
	}
	return out, nil
}

// HasConsumeNotice reports whether dev's consume notice with payload hash
// hash is stored, so a caller can skip verifying a notice it already holds.
func (s *Store) HasConsumeNotice(ctx context.Context, dev protocol.Key, hash [32]byte) (has bool, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return false, err
	}
	err = s.db.View(func(txn *badger.Txn) error {
		_, err := txn.Get(noticeKey(dev, noticeConsume, hash))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		has = err == nil
		return err
	})
	if err != nil {
		return false, fmt.Errorf("storage: has consume notice: %w", err)
	}
	return has, nil
}
