// Package storage keeps bundles and account bundles in an embedded Badger
// database on disk.
//
// Bundles are kept per device, newest by signed timestamp first, at most
// MaxPerDevice of them; "latest" is the greatest signed timestamp (ties: the
// smaller bundle ref), preferring a last-resort bundle when the device has
// one. A bundle ref stored twice keeps the newer timestamp, so a replayed old
// bundle never becomes latest and never extends its retention. Account bundles
// follow the lamport rule. A background loop prunes what the retention ends.
//
// Every write that returns nil is committed (and, with SyncWrites, synced to
// disk) before the call returns.
package storage
