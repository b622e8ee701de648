package storage

import (
	"context"
	"errors"

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

var errUnimplemented = errors.New("storage: not implemented yet")

// ClaimCandidates returns up to limit one-time bundles of dev that are
// usable now, not claimed and not consumed, of cipher suite suite (0: any),
// oldest signed timestamp first (so older KeyPackages go before they end).
func (s *Store) ClaimCandidates(ctx context.Context, dev protocol.Key, suite uint16, limit int) ([]*Bundle, error) {
	return nil, errUnimplemented
}

// LastResortBundle returns dev's latest usable last-resort bundle of suite
// (0: any), or ErrNotFound.
func (s *Store) LastResortBundle(ctx context.Context, dev protocol.Key, suite uint16) (*Bundle, error) {
	return nil, errUnimplemented
}

// PutClaim records a validated claim notice, atomically:
//   - Stored: the ref had no claim and now has this one (a local claimer
//     that gets Stored has won the ref);
//   - Refreshed: the notice wins over the stored claim and replaces it, or
//     (last-resort ref) it is another hand-out and was counted;
//   - Duplicate: this or a winning claim is already held.
//
// Errors: ErrRefNotHeld, ErrForeignRef, ErrConsumed.
func (s *Store) PutClaim(ctx context.Context, n *protocol.ClaimNotice, info protocol.ClaimInfo) (PutOutcome, error) {
	return 0, errUnimplemented
}

// PutConsume records a validated consume notice, atomically: it deletes the
// device's named bundles (and their claims), writes a tombstone per ref
// until info.TimestampMS + Retention, and stores the notice for sync.
// Stored: new; Duplicate: already held; OverQuota: the device would hold
// more than MaxConsumedPerDevice tombstones (nothing changed). ErrForeignRef:
// a named ref is held under another device (nothing changed).
func (s *Store) PutConsume(ctx context.Context, n *protocol.ConsumeNotice, info protocol.ConsumeInfo) (PutOutcome, error) {
	return 0, errUnimplemented
}

// Consumed reports whether dev's ref is tombstoned.
func (s *Store) Consumed(ctx context.Context, dev protocol.Key, ref protocol.Ref) (bool, error) {
	return false, errUnimplemented
}

// ClaimCounts counts dev's bundles for GET /v1/keypackages/{device_id}/count.
func (s *Store) ClaimCounts(ctx context.Context, dev protocol.Key) (ClaimCounts, error) {
	return ClaimCounts{}, errUnimplemented
}

// NoticesByID returns the shard's notices under prefix whose item IDs are
// in ids (sync's wants of NoticeSet).
func (s *Store) NoticesByID(ctx context.Context, shard int, prefix []byte, ids map[uint64]bool) ([]*Notice, error) {
	return nil, errUnimplemented
}
