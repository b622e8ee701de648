package storage

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"sync"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// SetKind selects the bundle, account or notice set of a shard.
type SetKind int

// The kinds of record sets sync reconciles (NoticeSet: claims.go).
const (
	BundleSet SetKind = iota
	AccountSet
)

// shardDigests keeps the digest of every shard's bundle and account sets in
// memory, updated after each commit, so that comparing whole shards with a
// peer costs nothing when they agree.
type shardDigests struct {
	mu       sync.Mutex
	count    int
	bundles  []protocol.Digest
	accounts []protocol.Digest
	notices  []protocol.Digest
}

func newShardDigests(count int) *shardDigests {
	return &shardDigests{count: count, bundles: make([]protocol.Digest, count), accounts: make([]protocol.Digest, count),
		notices: make([]protocol.Digest, count)}
}

// replace installs digests computed by a full scan.
func (d *shardDigests) replace(from *shardDigests) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.count, d.bundles, d.accounts, d.notices = from.count, from.bundles, from.accounts, from.notices
}

// addNotice is for scans that own d (no lock).
func (d *shardDigests) addNotice(it noticeItem) {
	d.notices[protocol.Shard(it.dev, d.count)].Add(it.hash)
}

func (d *shardDigests) updateNotices(added, removed []noticeItem) {
	if len(added)+len(removed) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, it := range added {
		d.notices[protocol.Shard(it.dev, d.count)].Add(it.hash)
	}
	for _, it := range removed {
		d.notices[protocol.Shard(it.dev, d.count)].Remove(it.hash)
	}
}

func bundleKeyItem(bkey []byte, count int) (int, [32]byte, error) {
	dev, ts, ref, err := parseBundleKey(bkey)
	if err != nil {
		return 0, [32]byte{}, err
	}
	return protocol.Shard(dev, count), protocol.BundleItem(dev, ts, ref), nil
}

// addBundleKey is for scans that own d (no lock).
func (d *shardDigests) addBundleKey(bkey []byte) error {
	shard, h, err := bundleKeyItem(bkey, d.count)
	if err != nil {
		return err
	}
	d.bundles[shard].Add(h)
	return nil
}

func (d *shardDigests) addAccount(a *Account) {
	d.accounts[protocol.Shard(a.AccountPub, d.count)].Add(protocol.AccountItem(a.AccountPub, a.Lamport, a.Payload))
}

func (d *shardDigests) updateBundles(added, removed [][]byte) {
	if len(added)+len(removed) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, k := range added {
		if shard, h, err := bundleKeyItem(k, d.count); err == nil {
			d.bundles[shard].Add(h)
		}
	}
	for _, k := range removed {
		if shard, h, err := bundleKeyItem(k, d.count); err == nil {
			d.bundles[shard].Remove(h)
		}
	}
}

func (d *shardDigests) updateAccount(added, removed *Account) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if added != nil {
		d.accounts[protocol.Shard(added.AccountPub, d.count)].Add(protocol.AccountItem(added.AccountPub, added.Lamport, added.Payload))
	}
	if removed != nil {
		d.accounts[protocol.Shard(removed.AccountPub, d.count)].Remove(protocol.AccountItem(removed.AccountPub, removed.Lamport, removed.Payload))
	}
}

// ShardDigest returns the digest of a shard's whole bundle or account set.
func (s *Store) ShardDigest(kind SetKind, shard int) protocol.Digest {
	s.digests.mu.Lock()
	defer s.digests.mu.Unlock()
	if shard < 0 || shard >= s.digests.count {
		return protocol.Digest{}
	}
	switch kind {
	case AccountSet:
		return s.digests.accounts[shard]
	case NoticeSet:
		return s.digests.notices[shard]
	}
	return s.digests.bundles[shard]
}

// SyncItem is one record of a set, as sync scans it.
type SyncItem struct {
	Key  protocol.Key // device_id or account_pub
	Hash [32]byte     // the item hash (protocol.BundleItem / AccountItem)
	key  []byte       // its Badger key
}

// scanSet calls fn for every item of a shard's set whose key starts with
// prefix (0 to 31 bytes of device_id or account_pub). Keys lead with h0,
// so the shard is the 256/S ranges h0 = shard, shard+S, ... with prefix
// appended, and nothing outside them is read. Items come grouped by h0,
// in key order within a group (one key's items are adjacent).
func (s *Store) scanSet(ctx context.Context, kind SetKind, shard int, prefix []byte, fn func(SyncItem) error) error {
	if kind == NoticeSet {
		return s.scanNotices(ctx, shard, prefix, func(it SyncItem, _ *Notice) error { return fn(it) })
	}
	p, keyLen := byte(prefixBundle), bundleKeyLen
	if kind == AccountSet {
		p, keyLen = prefixAccount, accountKeyLen
	}
	return s.scanShard(ctx, p, keyLen, kind == AccountSet, shard, prefix, func(item *badger.Item) error {
		k := item.Key()
		si := SyncItem{Key: keyOf(k), key: item.KeyCopy(nil)}
		if kind == AccountSet {
			a, err := accountFromItem(item)
			if err != nil {
				return err
			}
			si.Hash = protocol.AccountItem(a.AccountPub, a.Lamport, a.Payload)
		} else {
			dev, ts, ref, err := parseBundleKey(k)
			if err != nil {
				return err
			}
			si.Hash = protocol.BundleItem(dev, ts, ref)
		}
		return fn(si)
	})
}

// scanNotices calls fn for every claim and consume record of a shard under
// prefix, with its sync item and the decoded notice. A record that does not
// decode is skipped (the startup check deletes it).
func (s *Store) scanNotices(ctx context.Context, shard int, prefix []byte, fn func(SyncItem, *Notice) error) error {
	return s.scanShard(ctx, prefixNotice, noticeKeyLen, true, shard, prefix, func(item *badger.Item) error {
		k := item.Key()
		dev := keyOf(k)
		kind, id := noticeID(k)
		si := SyncItem{Key: dev, key: item.KeyCopy(nil)}
		var n *Notice
		err := item.Value(func(v []byte) error {
			switch kind {
			case noticeClaim:
				r, err := decodeClaimValue(dev, id, v)
				if err != nil {
					return nil
				}
				si.Hash = protocol.ClaimItem(r.Info)
				notice := r.Notice
				n = &Notice{Claim: &notice}
			case noticeConsume:
				cn, info, err := decodeConsumeValue(dev, id, v)
				if err != nil {
					return nil
				}
				si.Hash = protocol.ConsumeItem(dev, info)
				n = &Notice{Consume: cn}
			}
			return nil
		})
		if err != nil || n == nil {
			return err
		}
		return fn(si, n)
	})
}

// scanShard calls fn for every key of family p (of keyLen bytes) in the
// shard's ranges under prefix. Keys lead with h0, so the shard is the
// 256/S ranges h0 = shard, shard+S, ... with prefix appended, and nothing
// outside them is read.
func (s *Store) scanShard(ctx context.Context, p byte, keyLen int, values bool, shard int, prefix []byte, fn func(*badger.Item) error) error {
	if len(prefix) >= protocol.KeySize {
		return fmt.Errorf("storage: sync prefix of %d bytes", len(prefix))
	}
	if shard < 0 || shard >= s.opts.ShardCount {
		return fmt.Errorf("storage: shard %d of %d", shard, s.opts.ShardCount)
	}
	return s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{p, '/'}, PrefetchValues: values})
		defer it.Close()
		n := 0
		dbPrefix := make([]byte, 0, 4+len(prefix))
		for h := shard; h < 256; h += s.opts.ShardCount {
			dbPrefix = append(append(dbPrefix[:0], p, '/', byte(h), '/'), prefix...)
			for it.Seek(dbPrefix); it.ValidForPrefix(dbPrefix); it.Next() {
				s.scanned.Add(1)
				if n++; n%4096 == 0 && ctx.Err() != nil {
					return ctx.Err()
				}
				item := it.Item()
				if k := item.Key(); len(k) != keyLen {
					return fmt.Errorf("%w: key of %d bytes in a %c/ scan", errCorrupt, len(k), p)
				}
				if err := fn(item); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// PrefixDigests returns the digest of a shard's items under prefix, of
// each of its 256 children (prefix ‖ b), and how many distinct keys the
// items have, in one scan.
func (s *Store) PrefixDigests(ctx context.Context, kind SetKind, shard int, prefix []byte) (all protocol.Digest, children [256]protocol.Digest, keys int, err error) {
	defer recoverCorrupt(&err)
	var last protocol.Key
	err = s.scanSet(ctx, kind, shard, prefix, func(it SyncItem) error {
		all.Add(it.Hash)
		children[it.Key[len(prefix)]].Add(it.Hash)
		if keys == 0 || it.Key != last {
			keys++
			last = it.Key
		}
		return nil
	})
	return all, children, keys, err
}

// PrefixItems returns the item hashes of a shard's items under prefix.
func (s *Store) PrefixItems(ctx context.Context, kind SetKind, shard int, prefix []byte) (_ [][32]byte, err error) {
	defer recoverCorrupt(&err)
	var items []SyncItem
	err = s.scanSet(ctx, kind, shard, prefix, func(it SyncItem) error {
		items = append(items, it)
		return nil
	})
	// Key order, as one scan of device_ids would give (a key's own items
	// keep their order: a device's newest first).
	sort.SliceStable(items, func(i, j int) bool { return bytes.Compare(items[i].Key[:], items[j].Key[:]) < 0 })
	out := make([][32]byte, len(items))
	for i, it := range items {
		out[i] = it.Hash
	}
	return out, err
}

// BundlesByID returns the bundles under prefix whose item IDs are in ids,
// leaving out those whose KeyPackage lifetime has ended: they are held
// until ClockSkew after the end (so they stay in the digests and are not
// pulled again) but never offered.
func (s *Store) BundlesByID(ctx context.Context, shard int, prefix []byte, ids map[uint64]bool) (_ []*Bundle, err error) {
	defer recoverCorrupt(&err)
	var keys [][]byte
	if err := s.scanSet(ctx, BundleSet, shard, prefix, func(it SyncItem) error {
		if ids[protocol.ItemID(it.Hash)] {
			keys = append(keys, it.key)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	now := s.opts.Now().UnixMilli()
	var out []*Bundle
	err = s.db.View(func(txn *badger.Txn) error {
		for _, k := range keys {
			item, err := txn.Get(k)
			if err == badger.ErrKeyNotFound {
				continue // pruned or evicted since the scan
			}
			if err != nil {
				return err
			}
			b, err := bundleFromItem(item)
			if err != nil {
				return err
			}
			if b.usable(now) { // an ended KeyPackage is held, never sent
				out = append(out, b)
			}
		}
		return nil
	})
	return out, err
}

// AccountsByID returns the account bundles under prefix whose item IDs are in ids.
func (s *Store) AccountsByID(ctx context.Context, shard int, prefix []byte, ids map[uint64]bool) (_ []*Account, err error) {
	defer recoverCorrupt(&err)
	var out []*Account
	err = s.scanSet(ctx, AccountSet, shard, prefix, func(it SyncItem) error {
		if !ids[protocol.ItemID(it.Hash)] {
			return nil
		}
		a, err := s.Account(ctx, it.Key)
		if err == nil && protocol.ItemID(protocol.AccountItem(a.AccountPub, a.Lamport, a.Payload)) == protocol.ItemID(it.Hash) {
			out = append(out, a)
		}
		return nil
	})
	return out, err
}

func accountFromItem(item *badger.Item) (*Account, error) {
	a := &Account{}
	if len(item.Key()) != accountKeyLen {
		return nil, fmt.Errorf("%w: account key of %d bytes", errCorrupt, len(item.Key()))
	}
	a.AccountPub = keyOf(item.Key())
	if err := item.Value(func(v []byte) error { return decodeAccountValue(a, v) }); err != nil {
		return nil, err
	}
	return a, nil
}
