package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"sort"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// Single use: claims and consume notices (protocol/README.md, "Single use").
//
// A claim notice marks one bundle ref of a device as handed out; the store
// keeps one claim per ref, the winner by protocol.ClaimWins, so every node
// converges on the same one. A consume notice deletes the device's named
// bundles and leaves a tombstone per ref until its timestamp plus the
// retention, so the bundle cannot come back by any path. Both kinds of
// notice are the items of each shard's NoticeSet, which sync reconciles.

// Sentinel errors of the single-use records.
var (
	// ErrConsumed: the bundle's ref is tombstoned by a consume notice.
	ErrConsumed = errors.New("storage: keypackage consumed")
	// ErrForeignRef: a notice names a ref this store holds under another
	// device.
	ErrForeignRef = errors.New("storage: ref held under another device")
	// ErrRefNotHeld: a claim names a ref the store does not hold under the
	// device (or whose KeyPackage lifetime has ended).
	ErrRefNotHeld = errors.New("storage: ref not held")
	// ErrConsumeQuota: the device holds MaxConsumedPerDevice tombstones;
	// a notice that names more is refused until some expire.
	ErrConsumeQuota = errors.New("storage: too many consumed keypackages for the device")
)

// NoticeSet is the third set sync reconciles: a shard's claim and consume
// notices, keyed by device_id.
const NoticeSet SetKind = AccountSet + 1

// DefaultMaxConsumedPerDevice bounds the tombstones a device may hold: a
// consume notice that would take it over is refused (OverQuota).
const DefaultMaxConsumedPerDevice = 4096

// MaxUnheldConsumedPerDevice bounds the live tombstones a device may hold
// for refs this store did not hold when they were written: refs a consume
// notice names over it are not tombstoned (the held ones still are), so
// minted devices naming refs nobody holds cannot fill the consume share.
const MaxUnheldConsumedPerDevice = 256

// ClaimCounts is what GET /v1/keypackages/{device_id}/count serves.
type ClaimCounts struct {
	// OneTime: one-time bundles not claimed, not consumed, usable now.
	OneTime int
	// LastResort: last-resort bundles held and usable now.
	LastResort int
	// LastResortHandedOut: claim notices seen for the latest last-resort
	// bundle (how often it was handed out).
	LastResortHandedOut int64
}

// Notice is one stored notice: exactly one field is set.
type Notice struct {
	Claim   *protocol.ClaimNotice
	Consume *protocol.ConsumeNotice
}

// ClaimCandidates returns up to limit one-time bundles of dev that are
// usable now, not claimed and not consumed, of cipher suite suite (0: any),
// oldest signed timestamp first (so older KeyPackages go before they end).
// A limit of 0 or less means no limit.
func (s *Store) ClaimCandidates(ctx context.Context, dev protocol.Key, suite uint16, limit int) (_ []*Bundle, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	now := s.opts.Now().UnixMilli()
	var out []*Bundle
	err = s.db.View(func(txn *badger.Txn) error {
		claimed, err := claimedRefs(txn, dev)
		if err != nil {
			return err
		}
		it := txn.NewIterator(badger.IteratorOptions{Prefix: devicePrefix(prefixBundle, dev), PrefetchValues: true, PrefetchSize: 16})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			b, err := bundleFromItem(it.Item())
			if err != nil {
				return err
			}
			if _, c := claimed[b.Ref]; c || b.LastResort || !b.usable(now) || !suiteMatches(b, suite) {
				continue
			}
			out = append(out, b)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("storage: claim candidates: %w", err)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].TimestampMS != out[j].TimestampMS {
			return out[i].TimestampMS < out[j].TimestampMS
		}
		return bytes.Compare(out[i].Ref[:], out[j].Ref[:]) < 0
	})
	if limit > 0 && len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

// suiteMatches reports whether b's key_package is of cipher suite suite
// (0: any). A header that does not parse matches only suite 0.
func suiteMatches(b *Bundle, suite uint16) bool {
	if suite == 0 {
		return true
	}
	_, kp, err := protocol.SplitBundlePayload(b.Payload)
	if err != nil {
		return false
	}
	got, ok := protocol.KeyPackageCipherSuite(kp)
	return ok && got == suite
}

// claimedRefs returns dev's claimed refs with their hand-out counts (keys
// and small values only).
func claimedRefs(txn *badger.Txn, dev protocol.Key) (map[protocol.Ref]uint64, error) {
	it := txn.NewIterator(badger.IteratorOptions{Prefix: noticePrefix(dev, noticeClaim), PrefetchValues: true})
	defer it.Close()
	out := map[protocol.Ref]uint64{}
	for it.Rewind(); it.Valid(); it.Next() {
		k := it.Item().Key()
		if len(k) != noticeKeyLen {
			continue
		}
		_, ref := noticeID(k)
		var n uint64
		if err := it.Item().Value(func(v []byte) error {
			if len(v) == claimValueLen {
				n = uint64FromBE(v)
			}
			return nil
		}); err != nil {
			return nil, err
		}
		out[ref] = n
	}
	return out, nil
}

// setClaimed sets Claimed on bs from dev's claim records.
func setClaimed(txn *badger.Txn, dev protocol.Key, bs ...*Bundle) error {
	if len(bs) == 0 {
		return nil
	}
	claimed, err := claimedRefs(txn, dev)
	if err != nil {
		return err
	}
	for _, b := range bs {
		_, b.Claimed = claimed[b.Ref]
	}
	return nil
}

// LastResortBundle returns dev's latest usable last-resort bundle of suite
// (0: any), or ErrNotFound.
func (s *Store) LastResortBundle(ctx context.Context, dev protocol.Key, suite uint16) (_ *Bundle, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	now := s.opts.Now().UnixMilli()
	var out *Bundle
	err = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: devicePrefix(prefixLastResort, dev)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item, err := txn.Get(bundleTwin(it.Item().Key()))
			if errors.Is(err, badger.ErrKeyNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			b, err := bundleFromItem(item)
			if err != nil {
				return err
			}
			if b.usable(now) && suiteMatches(b, suite) {
				out = b
				return setClaimed(txn, dev, b)
			}
		}
		return ErrNotFound
	})
	if errors.Is(err, ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("storage: last-resort bundle: %w", err)
	}
	return out, nil
}

// PutClaim records a validated claim notice, atomically:
//   - Stored: the ref had no claim and now has this one (a local claimer
//     that gets Stored has won the ref);
//   - Refreshed: the notice wins over the stored claim and replaces it, or
//     (last-resort ref) it is another hand-out and was counted;
//   - Duplicate: this or a winning claim is already held.
//
// Errors: ErrRefNotHeld, ErrForeignRef, ErrConsumed.
func (s *Store) PutClaim(ctx context.Context, n *protocol.ClaimNotice, info protocol.ClaimInfo) (outcome PutOutcome, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if len(n.Payload) != protocol.ClaimPayloadSize {
		return 0, fmt.Errorf("storage: put claim: payload of %d bytes", len(n.Payload))
	}
	if err := s.checkDisk(claimValueLen); err != nil {
		return 0, fmt.Errorf("storage: put claim: %w", err)
	}
	dev, ref := info.DeviceID, info.Ref
	defer s.locks.lock(dev)()
	nowMS := s.opts.Now().UnixMilli()
	var (
		nd                        noticeDelta
		dBytes, dBundles, dDevice int64
		evicted                   [][]byte
	)
	err = s.update(ctx, func(txn *badger.Txn) error {
		outcome, dBytes, dBundles, dDevice, evicted = 0, 0, 0, 0, nil
		nd.reset()
		if until, ok, err := consumedUntil(txn, dev, ref); err != nil {
			return err
		} else if ok && until > nowMS {
			return ErrConsumed
		}
		item, err := txn.Get(refKey(dev, ref))
		if errors.Is(err, badger.ErrKeyNotFound) {
			if other, err := heldElsewhere(txn, dev, ref); err != nil {
				return err
			} else if other {
				return ErrForeignRef
			}
			return ErrRefNotHeld
		}
		if err != nil {
			return err
		}
		rv, err := refFromItem(item)
		if err != nil {
			return err
		}
		if rv.NotAfterMS != 0 && rv.NotAfterMS < nowMS {
			return ErrRefNotHeld
		}
		lastResort := false
		switch _, err := txn.Get(bundleKey(prefixLastResort, dev, rv.TS, ref)); {
		case err == nil:
			lastResort = true
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		held, err := getClaim(txn, dev, ref)
		if err != nil {
			return err
		}
		rec := &claimRecord{HandedOut: 1, Notice: *n, Info: info}
		switch {
		case held == nil:
			outcome = Stored
			dBytes = int64(claimBytes)
			nd.claims++
		case held.Info.Hash == info.Hash:
			outcome = Duplicate
			return nil
		case protocol.ClaimWins(info, held.Info):
			outcome = Refreshed
			rec.HandedOut = held.HandedOut
			if lastResort {
				rec.HandedOut++
			}
		case lastResort:
			// Another hand-out of the last-resort bundle: counted, the
			// winning notice kept.
			outcome = Refreshed
			rec = held
			rec.HandedOut++
		default:
			outcome = Duplicate
			return nil
		}
		if rec != held {
			if held != nil {
				nd.removed = append(nd.removed, claimItemOf(held))
			}
			nd.added = append(nd.added, claimItemOf(rec))
		}
		if over := s.over(dBytes); over > 0 {
			ev, err := s.makeRoom(txn, over, math.MaxUint64, &dev)
			if err != nil {
				return err
			}
			dBytes -= ev.freed
			dBundles, dDevice, evicted = -ev.bundles, -ev.emptied, ev.removed
			nd.added, nd.removed = append(nd.added, ev.notices.added...), append(nd.removed, ev.notices.removed...)
			nd.claims += ev.notices.claims
		}
		return txn.Set(claimKey(dev, ref), encodeClaimValue(rec))
	})
	if err != nil {
		for _, sentinel := range []error{ErrConsumed, ErrForeignRef, ErrRefNotHeld} {
			if errors.Is(err, sentinel) {
				return 0, sentinel
			}
		}
		return 0, fmt.Errorf("storage: put claim: %w", err)
	}
	s.bytes.Add(dBytes)
	s.bundles.Add(dBundles)
	s.devices.Add(dDevice)
	s.digests.updateBundles(nil, evicted)
	s.applyNotices(&nd)
	return outcome, nil
}

// PutConsume records a validated consume notice, atomically: it deletes the
// device's named bundles (and their claims), writes a tombstone per ref
// until info.TimestampMS + Retention, and stores the notice for sync.
// It never evicts bundles to make room for its records. Refs not held here
// are tombstoned up to MaxUnheldConsumedPerDevice live ones per device,
// and not at all when the consume share (MaxConsumeBytes) or the store is
// full; the held refs are always deleted and tombstoned, so a device's
// consume of what it holds here is never refused for room (the records
// may take the share over by their size less the bundles' bytes freed).
// Stored: new; Duplicate: already held; OverQuota: the device would hold
// more than MaxConsumedPerDevice tombstones, or the notice would tombstone
// nothing new but names refs not held past their cap (nothing changed;
// only the device's own notices count there); ErrStoreFull: full and no named ref is held (nothing
// changed). ErrForeignRef: a named ref is held under another device
// (nothing changed).
func (s *Store) PutConsume(ctx context.Context, n *protocol.ConsumeNotice, info protocol.ConsumeInfo) (outcome PutOutcome, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if len(n.Payload) > protocol.MaxConsumePayloadSize {
		return 0, fmt.Errorf("storage: put consume: payload of %d bytes", len(n.Payload))
	}
	if err := s.checkDisk(len(n.Payload)); err != nil {
		return 0, fmt.Errorf("storage: put consume: %w", err)
	}
	dev := n.DeviceID
	defer s.locks.lock(dev)()
	nowMS := s.opts.Now().UnixMilli()
	until := int64(min(info.TimestampMS, uint64(math.MaxInt64/2))) + s.opts.Retention.Milliseconds()
	var (
		nd                                  noticeDelta
		dBytes, dBundles, dDevice, dConsume int64
		removed                             [][]byte
	)
	err = s.update(ctx, func(txn *badger.Txn) error {
		outcome, dBytes, dBundles, dDevice, dConsume, removed = 0, 0, 0, 0, 0, nil
		nd.reset()
		nk := noticeKey(dev, noticeConsume, info.Hash)
		switch _, err := txn.Get(nk); {
		case err == nil:
			outcome = Duplicate
			return nil
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		for _, ref := range info.Refs {
			if other, err := heldElsewhere(txn, dev, ref); err != nil {
				return err
			} else if other {
				return ErrForeignRef
			}
		}
		live, liveUnheld, err := s.liveTombstones(txn, dev, nowMS)
		if err != nil {
			return err
		}
		// The named bundles held here: deleted first, so their bytes are
		// freed before any consume record is written, and tombstoned
		// whatever the consume share holds.
		heldRef := make(map[protocol.Ref]bool, len(info.Refs))
		var heldKeys [][]byte
		for _, ref := range info.Refs {
			item, err := txn.Get(refKey(dev, ref))
			if errors.Is(err, badger.ErrKeyNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			rv, err := refFromItem(item)
			if err != nil {
				return err
			}
			bkey := bundleKey(prefixBundle, dev, rv.TS, ref)
			if _, err := txn.Get(bkey); errors.Is(err, badger.ErrKeyNotFound) {
				continue // drift the startup check repairs
			} else if err != nil {
				return err
			}
			if !heldRef[ref] {
				heldRef[ref] = true
				heldKeys = append(heldKeys, bkey)
			}
		}
		// The refs to tombstone: the held ones, those already tombstoned
		// (their until may grow), and fresh ones not held up to the
		// device's cap of such tombstones (anyone can mint a device and
		// name refs nobody holds).
		var tomb []protocol.Ref
		unheldFresh, capped := 0, 0
		for _, ref := range info.Refs {
			_, isLive := live[ref]
			switch {
			case heldRef[ref], isLive:
			case liveUnheld+unheldFresh < MaxUnheldConsumedPerDevice:
				unheldFresh++
			default:
				capped++
				continue
			}
			tomb = append(tomb, ref)
		}
		fresh := 0
		for _, ref := range tomb {
			if _, ok := live[ref]; !ok {
				fresh++
			}
		}
		// Over the tombstone quota; or a notice that would change nothing
		// but name refs not held past their cap.
		if len(live)+fresh > s.opts.MaxConsumedPerDevice || (capped > 0 && fresh == 0) {
			outcome = OverQuota
			return nil
		}
		held, err := getCount(txn, dev)
		if err != nil {
			return err
		}
		wasHeld := held
		for _, bkey := range heldKeys {
			gone, err := deleteBundleRecord(txn, bkey, true, &nd)
			if err != nil {
				return err
			}
			dBytes -= int64(gone.Bytes)
			dBundles--
			held--
			removed = append(removed, bkey)
		}
		if len(removed) > 0 {
			if err := setCount(txn, dev, held); err != nil {
				return err
			}
			if held <= 0 && wasHeld > 0 {
				dDevice--
			}
		}
		cost := func(refs []protocol.Ref) (int64, error) {
			c := consumeBytes(len(n.Payload))
			for _, ref := range refs {
				if _, exists, err := consumedUntil(txn, dev, ref); err != nil {
					return 0, err
				} else if !exists {
					c += tombstoneBytes
				}
			}
			return c, nil
		}
		if dConsume, err = cost(tomb); err != nil {
			return err
		}
		shareOver := func() bool {
			max := s.opts.MaxConsumeBytes
			return max > 0 && s.consumeBytes.Load()+dConsume > max
		}
		if shareOver() || s.over(dBytes+dConsume) > 0 {
			// Full: records are never made room for by evicting bundles.
			// Keep only the tombstones of the refs held here (and those
			// already stored); refs not held are dropped.
			kept := tomb[:0]
			for _, ref := range tomb {
				if _, ok := live[ref]; ok || heldRef[ref] {
					kept = append(kept, ref)
				}
			}
			tomb = kept
			if dConsume, err = cost(tomb); err != nil {
				return err
			}
			if len(removed) == 0 && (shareOver() || s.over(dBytes+dConsume) > 0) {
				return fmt.Errorf("%w: consume notices and tombstones hold %d bytes of their %d", ErrStoreFull, s.consumeBytes.Load(), s.opts.MaxConsumeBytes)
			}
			// A notice that deleted bundles here is kept even so: the
			// share (and the store) may go over by its records, less the
			// bytes of the bundles it freed.
		}
		for _, ref := range tomb {
			u := until
			old, exists, err := consumedUntil(txn, dev, ref)
			if err != nil {
				return err
			}
			if exists && old > u {
				u = old
			}
			if !exists {
				nd.tombs++
			}
			// A tombstone keeps its flag: one written for a ref not held
			// stays counted as such while it lives.
			unheld := !heldRef[ref]
			if exists {
				unheld = s.tombUnheld(txn, dev, ref) && !heldRef[ref]
			}
			if err := txn.Set(consumedKey(dev, ref), encodeTombstone(u, unheld)); err != nil {
				return err
			}
		}
		dBytes += dConsume
		nd.added = append(nd.added, noticeItem{dev: dev, hash: protocol.ConsumeItem(dev, info)})
		outcome = Stored
		return txn.Set(nk, encodeConsumeValue(n))
	})
	if err != nil {
		if errors.Is(err, ErrForeignRef) {
			return 0, ErrForeignRef
		}
		return 0, fmt.Errorf("storage: put consume: %w", err)
	}
	s.bytes.Add(dBytes)
	s.consumeBytes.Add(dConsume)
	s.bundles.Add(dBundles)
	s.devices.Add(dDevice)
	s.digests.updateBundles(nil, removed)
	s.applyNotices(&nd)
	return outcome, nil
}

// liveTombstones returns dev's tombstones that still apply at nowMS.
func (s *Store) liveTombstones(txn *badger.Txn, dev protocol.Key, nowMS int64) (map[protocol.Ref]int64, int, error) {
	prefix := append(groupKey(prefixConsumed, dev, consumedKeyLen), '/')
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true})
	defer it.Close()
	out := map[protocol.Ref]int64{}
	unheldN := 0
	for it.Rewind(); it.Valid(); it.Next() {
		k := it.Item().Key()
		if len(k) != consumedKeyLen {
			continue
		}
		var (
			until  int64
			unheld bool
		)
		if err := it.Item().Value(func(v []byte) (err error) {
			until, unheld, err = decodeTombstoneFlag(v)
			return err
		}); err != nil {
			return nil, 0, err
		}
		if until > nowMS {
			out[refOfRefKey(k)] = until
			if unheld {
				unheldN++
			}
		}
	}
	return out, unheldN, nil
}

// tombUnheld reports whether (dev, ref)'s stored tombstone was written for
// a ref not held.
func (s *Store) tombUnheld(txn *badger.Txn, dev protocol.Key, ref protocol.Ref) bool {
	item, err := txn.Get(consumedKey(dev, ref))
	if err != nil {
		return false
	}
	unheld := false
	_ = item.Value(func(v []byte) error {
		_, unheld, _ = decodeTombstoneFlag(v)
		return nil
	})
	return unheld
}

// Consumed reports whether dev's ref is tombstoned.
func (s *Store) Consumed(ctx context.Context, dev protocol.Key, ref protocol.Ref) (consumed bool, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return false, err
	}
	now := s.opts.Now().UnixMilli()
	err = s.db.View(func(txn *badger.Txn) error {
		until, ok, err := consumedUntil(txn, dev, ref)
		consumed = ok && until > now
		return err
	})
	if err != nil {
		return false, fmt.Errorf("storage: consumed: %w", err)
	}
	return consumed, nil
}

// ClaimCounts counts dev's bundles for GET /v1/keypackages/{device_id}/count.
func (s *Store) ClaimCounts(ctx context.Context, dev protocol.Key) (c ClaimCounts, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return c, err
	}
	now := s.opts.Now().UnixMilli()
	err = s.db.View(func(txn *badger.Txn) error {
		c = ClaimCounts{}
		claimed, err := claimedRefs(txn, dev)
		if err != nil {
			return err
		}
		// r/ says which refs are usable, l/ (newest first) which are last-resort.
		usable := map[protocol.Ref]bool{}
		it := txn.NewIterator(badger.IteratorOptions{Prefix: append(groupKey(prefixRef, dev, refKeyLen), '/')})
		for it.Rewind(); it.Valid(); it.Next() {
			if len(it.Item().Key()) != refKeyLen {
				continue
			}
			rv, err := refFromItem(it.Item())
			if err != nil {
				it.Close()
				return err
			}
			usable[refOfRefKey(it.Item().Key())] = rv.NotAfterMS == 0 || rv.NotAfterMS >= now
		}
		it.Close()
		lastResort := map[protocol.Ref]bool{}
		it = txn.NewIterator(badger.IteratorOptions{Prefix: devicePrefix(prefixLastResort, dev)})
		for it.Rewind(); it.Valid(); it.Next() {
			_, _, ref, err := parseBundleKey(it.Item().Key())
			if err != nil {
				continue
			}
			lastResort[ref] = true
			if !usable[ref] {
				continue
			}
			if c.LastResort == 0 {
				c.LastResortHandedOut = int64(claimed[ref])
			}
			c.LastResort++
		}
		it.Close()
		for ref, ok := range usable {
			if _, isClaimed := claimed[ref]; ok && !lastResort[ref] && !isClaimed {
				c.OneTime++
			}
		}
		return nil
	})
	if err != nil {
		return ClaimCounts{}, fmt.Errorf("storage: claim counts: %w", err)
	}
	return c, nil
}

// NoticesByID returns the shard's notices under prefix whose item IDs are
// in ids (sync's wants of NoticeSet).
func (s *Store) NoticesByID(ctx context.Context, shard int, prefix []byte, ids map[uint64]bool) (_ []*Notice, err error) {
	defer recoverCorrupt(&err)
	var out []*Notice
	err = s.scanNotices(ctx, shard, prefix, func(it SyncItem, n *Notice) error {
		if ids[protocol.ItemID(it.Hash)] {
			out = append(out, n)
		}
		return nil
	})
	return out, err
}
