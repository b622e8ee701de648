// Package storage keeps bundles and account bundles in an embedded Badger
// database on disk.
//
// Bundles are kept per device, newest by signed timestamp first, at most
// MaxPerDevice of them; "latest" is the greatest signed timestamp (ties: the
// smaller bundle ref), preferring a last-resort bundle when the device has
// one. A bundle ref stored twice keeps the newer timestamp, so a replayed old
// bundle never becomes latest and never extends its retention. Account bundles
// follow the lamport rule. A bundle whose KeyPackage lifetime has ended is
// never served or offered to sync, and is pruned once the clock skew has
// passed. A background loop prunes what the retention or the lifetime
// ends. MaxBytes bounds the store: see budget.go for the eviction order.
//
// Single use (claims.go, notices.go): a claim record marks a bundle as
// handed out, one per ref, the winner by protocol.ClaimWins; it goes with
// its bundle. A consume notice deletes the device's named bundles and
// leaves a tombstone per ref until its timestamp plus the retention, so
// the bundle is ErrConsumed by every path until then. Claim and consume
// notices are each shard's third sync set (NoticeSet).
//
// Keys lead with the byte of sha256(key) the shard is taken from, so a
// shard's items are a few contiguous ranges (see keys.go). Open migrates
// an older layout and repairs any drift between records and their indexes.
//
// Every write that returns nil is committed (and, with SyncWrites, synced to
// disk) before the call returns.
package storage
