package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls"
)

// Schema 1 had the same records without h0 in their keys:
//
//	b/<device>/<^ts>/<ref>, l/<device>/<^ts>/<ref>, r/<device>/<ref> -> ts u64,
//	n/<device>, a/<account>
//
// Their lengths differ from schema 2's, so both can be told apart in one
// prefix while a migration is under way.
const (
	v1BundleKeyLen  = 2 + protocol.KeySize + 1 + 8 + 1 + protocol.RefSize
	v1RefKeyLen     = 2 + protocol.KeySize + 1 + protocol.RefSize
	v1CountKeyLen   = 2 + protocol.KeySize
	v1AccountKeyLen = 2 + protocol.KeySize
)

// migrateChunk bounds the records moved by one transaction.
const migrateChunk = 256

// errUnknownSchema is returned by Open for a data dir it cannot read.
var errUnknownSchema = errors.New("storage: unknown schema")

// openSchema reads the data dir's schema and brings it to schemaVersion,
// or refuses it. It reports whether it migrated.
func (s *Store) openSchema() (migrated bool, err error) {
	var ver uint32
	var present, records bool
	err = s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(schemaKey)
		switch {
		case err == nil:
			present = true
			return item.Value(func(v []byte) error {
				if len(v) != 4 {
					return fmt.Errorf("%w: schema value %x", errUnknownSchema, v)
				}
				ver = binary.BigEndian.Uint32(v)
				return nil
			})
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		it := txn.NewIterator(badger.IteratorOptions{})
		defer it.Close()
		it.Rewind()
		records = it.Valid()
		return nil
	})
	if err != nil && !errors.Is(err, errUnknownSchema) {
		return false, fmt.Errorf("storage: read schema: %w", err)
	}
	refuse := func(what string) error {
		return fmt.Errorf("%w: the data dir %s %s; this build reads schema %d and migrates schemas 1 and 2. "+
			"Run the kpnode version that wrote it, or move the directory away to start empty "+
			"(a full node syncs its shards back from its peers)", errUnknownSchema, s.opts.Dir, what, schemaVersion)
	}
	switch {
	case err != nil:
		return false, refuse(err.Error())
	case !present && records:
		return false, refuse("holds records but no schema version")
	case !present:
		return false, s.setSchema()
	case ver == schemaVersion:
		return false, nil
	case ver == 1:
		return true, s.migrateV1()
	case ver == 2:
		// Schema 3 adds the single-use records and the global ref index
		// (g/), which the consistency check that follows builds from r/.
		s.log.Info("storage: migrating the data dir from schema 2 to 3 (global ref index)", "dir", s.opts.Dir)
		return true, nil
	default:
		return false, refuse(fmt.Sprintf("has schema %d", ver))
	}
}

func (s *Store) setSchema() error {
	return s.db.Update(func(txn *badger.Txn) error {
		return txn.Set(schemaKey, binary.BigEndian.AppendUint32(nil, schemaVersion))
	})
}

// migrateV1 rewrites schema 1 keys as schema 2 keys. Each record moves in
// one transaction with its old keys' deletion, so a migration stopped
// halfway (crash, kill) resumes where it stopped on the next Open; the n/
// counts are rebuilt by the consistency check that follows, and the
// schema is set to 2 by Open after that.
func (s *Store) migrateV1() error {
	s.log.Info("storage: migrating the data dir from schema 1 to 2 (keys ordered by shard)", "dir", s.opts.Dir)
	bundles, err := s.migrateFamily([]byte{prefixBundle, '/'}, v1BundleKeyLen, s.migrateV1Bundle)
	if err != nil {
		return fmt.Errorf("storage: migrate bundles: %w", err)
	}
	accounts, err := s.migrateFamily([]byte{prefixAccount, '/'}, v1AccountKeyLen, func(txn *badger.Txn, k []byte) error {
		item, err := txn.Get(k)
		if err != nil {
			return err
		}
		v, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		var acct protocol.Key
		copy(acct[:], k[2:])
		if len(v) > accountValueHdr+protocol.MaxPayloadSize {
			// Accepted before the payload cap: no peer would take it now.
			s.log.Warn("storage: migrate: dropping an account bundle over the payload cap", "account", acct, "bytes", len(v)-accountValueHdr)
			return txn.Delete(k)
		}
		if err := txn.Set(accountKey(acct), v); err != nil {
			return err
		}
		return txn.Delete(k)
	})
	if err != nil {
		return fmt.Errorf("storage: migrate accounts: %w", err)
	}
	// What is left of schema 1: dangling l/ and r/ entries and the counts,
	// which the consistency check rebuilds.
	var leftovers int
	for _, f := range []struct {
		prefix byte
		keyLen int
	}{{prefixLastResort, v1BundleKeyLen}, {prefixRef, v1RefKeyLen}, {prefixCount, v1CountKeyLen}} {
		n, err := s.migrateFamily([]byte{f.prefix, '/'}, f.keyLen, func(txn *badger.Txn, k []byte) error { return txn.Delete(k) })
		if err != nil {
			return fmt.Errorf("storage: migrate: drop schema 1 indexes: %w", err)
		}
		leftovers += n
	}
	s.log.Info("storage: migrated records to schema 2", "bundles", bundles, "accounts", accounts, "old_index_entries", leftovers)
	return nil
}

// migrateV1Bundle moves one schema 1 bundle (b/, its l/ twin and r/).
func (s *Store) migrateV1Bundle(txn *badger.Txn, k []byte) error {
	var dev protocol.Key
	copy(dev[:], k[2:])
	ts := ^binary.BigEndian.Uint64(k[2+protocol.KeySize+1:])
	var ref protocol.Ref
	copy(ref[:], k[2+protocol.KeySize+1+8+1:])
	item, err := txn.Get(k)
	if err != nil {
		return err
	}
	v, err := item.ValueCopy(nil)
	if err != nil {
		return err
	}
	b := &Bundle{Bundle: protocol.Bundle{DeviceID: dev}, BundleInfo: protocol.BundleInfo{TimestampMS: ts, Ref: ref}}
	oldL := append([]byte{prefixLastResort}, k[1:]...)
	oldR := append(append(append([]byte{prefixRef, '/'}, dev[:]...), '/'), ref[:]...)
	if err := decodeBundleValue(b, v); err != nil {
		// Damaged: not carried over (the check would drop it anyway).
		s.log.Warn("storage: migrate: dropping a damaged bundle", "device", dev, "err", err)
	} else if len(b.Payload) > protocol.MaxPayloadSize {
		// Accepted before the payload cap: no peer would take it now, and
		// offering it by sync would only cost peers work.
		s.log.Warn("storage: migrate: dropping a bundle over the payload cap", "device", dev, "bytes", len(b.Payload))
	} else {
		nk := bundleKey(prefixBundle, dev, ts, ref)
		// Schema 1 kept no KeyPackage lifetime: read it from the
		// KeyPackage, so a bundle whose lifetime has ended is not served.
		if b.NotAfterMS = v1NotAfterMS(b.Payload); b.NotAfterMS != 0 {
			v = encodeBundleValue(b)
			if err := txn.Set(lifetimeKey(b.NotAfterMS, nk), nil); err != nil {
				return err
			}
		}
		if err := txn.Set(nk, v); err != nil {
			return err
		}
		if _, err := txn.Get(oldL); err == nil {
			if err := txn.Set(lastResortTwin(nk), nil); err != nil {
				return err
			}
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		if err := txn.Set(refKey(dev, ref), refValue{TS: ts, NotAfterMS: b.NotAfterMS, Bytes: bundleBytes(b)}.encode()); err != nil {
			return err
		}
		if err := txn.Set(timeKey(nk), nil); err != nil {
			return err
		}
	}
	for _, old := range [][]byte{k, oldL, oldR} {
		if err := txn.Delete(old); err != nil {
			return err
		}
	}
	return nil
}

// migrateFamily calls move for every key under prefix of length keyLen
// (schema 1 keys; schema 2 keys have other lengths and are skipped), at
// most migrateChunk per transaction, and returns how many it moved.
func (s *Store) migrateFamily(prefix []byte, keyLen int, move func(txn *badger.Txn, k []byte) error) (int, error) {
	total := 0
	var after []byte // resume the scan past the last key moved
	for {
		var chunk [][]byte
		err := s.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
			defer it.Close()
			if after == nil {
				it.Rewind()
			} else {
				it.Seek(after)
			}
			for ; it.Valid() && len(chunk) < migrateChunk; it.Next() {
				k := it.Item().Key()
				if len(k) == keyLen && !bytes.Equal(k, after) {
					chunk = append(chunk, it.Item().KeyCopy(nil))
				}
			}
			return nil
		})
		if err != nil || len(chunk) == 0 {
			return total, err
		}
		txn := s.db.NewTransaction(true)
		for _, k := range chunk {
			err := move(txn, k)
			if errors.Is(err, badger.ErrTxnTooBig) {
				if err = txn.Commit(); err == nil {
					txn = s.db.NewTransaction(true)
					err = move(txn, k)
				}
			}
			if err != nil {
				txn.Discard()
				return total, err
			}
		}
		if err := txn.Commit(); err != nil {
			return total, err
		}
		total += len(chunk)
		after = chunk[len(chunk)-1]
	}
}

// v1NotAfterMS returns the end of the lifetime of a bundle payload's
// KeyPackage in Unix ms (clamped to year 9999, as validation does), or 0
// when the key_package does not parse as one (opaque mode).
func v1NotAfterMS(payload []byte) int64 {
	_, kp, err := protocol.SplitBundlePayload(payload)
	if err != nil {
		return 0
	}
	parsed, err := mls.Parse(kp)
	if err != nil {
		return 0
	}
	const maxUnix = 253402300799 // 9999-12-31T23:59:59Z
	return int64(min(parsed.LeafNode.Lifetime.NotAfter, maxUnix)) * 1000
}
