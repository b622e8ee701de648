package storage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// Floors: the highest version of a record a node has served for a key of a
// shard it does not hold, so that a holder answering with an older record
// (a rollback) is refused even after a restart has emptied the lookup cache.
//
//	f/<kind 1>/<key 32> -> floor value (see encodeFloor)
//
// A floor is written only for a record that validated, so the table holds at
// most one entry per key that exists in the network and was looked up here.
// Every floor carries the time after which it is void (UntilMS): a bundle's
// no later than its signed timestamp plus the retention (and the end of its
// KeyPackage lifetime), an account's the retention after it was last seen;
// PruneFloors deletes void floors. A bundle floor whose (device, ref) is
// tombstoned (the bundle was consumed) no longer applies either: the
// holders' real latest is then older than it, and must be accepted.
const prefixFloor = 'f'

// FloorKind names the kind of record a floor is for.
type FloorKind byte

// Floor kinds.
const (
	FloorBundle  FloorKind = 'b'
	FloorAccount FloorKind = 'a'
)

// Floor is a record version. Bundles use LastResort, TimestampMS and Ref
// (compared by the "latest" rule); accounts use Lamport and PayloadHash
// (SHA-256 of the payload; compared by the convergence rule).
type Floor struct {
	LastResort  bool
	TimestampMS uint64
	Ref         protocol.Ref
	Lamport     uint64
	PayloadHash [32]byte
	// UntilMS is when the floor stops applying, Unix ms.
	UntilMS int64
}

// Floor value: version 1 ‖ flags 1 ‖ until_ms 8 ‖ ts or lamport 8 ‖ ref or payload hash 32.
const (
	floorValueVersion = 1
	floorValueLen     = 1 + 1 + 8 + 8 + 32
	floorKeyLen       = 2 + 1 + 1 + protocol.KeySize
)

func floorKey(kind FloorKind, key protocol.Key) []byte {
	k := make([]byte, 0, floorKeyLen)
	k = append(k, prefixFloor, '/', byte(kind), '/')
	return append(k, key[:]...)
}

func encodeFloor(kind FloorKind, f Floor) []byte {
	v := make([]byte, 0, floorValueLen)
	var flags byte
	if f.LastResort {
		flags |= flagLastResort
	}
	v = append(v, floorValueVersion, flags)
	v = binary.BigEndian.AppendUint64(v, uint64(f.UntilMS))
	if kind == FloorBundle {
		v = binary.BigEndian.AppendUint64(v, f.TimestampMS)
		return append(v, f.Ref[:]...)
	}
	v = binary.BigEndian.AppendUint64(v, f.Lamport)
	return append(v, f.PayloadHash[:]...)
}

func decodeFloor(kind FloorKind, v []byte) (Floor, error) {
	var f Floor
	if len(v) != floorValueLen || v[0] != floorValueVersion {
		return f, fmt.Errorf("%w: floor value of %d bytes", errCorrupt, len(v))
	}
	f.LastResort = v[1]&flagLastResort != 0
	f.UntilMS = int64(binary.BigEndian.Uint64(v[2:]))
	a := binary.BigEndian.Uint64(v[10:])
	if kind == FloorBundle {
		f.TimestampMS = a
		copy(f.Ref[:], v[18:])
	} else {
		f.Lamport = a
		copy(f.PayloadHash[:], v[18:])
	}
	return f, nil
}

// Floor returns the floor of a key, if one applies at nowMS: not past its
// UntilMS and, for a bundle, of a ref not consumed.
func (s *Store) Floor(ctx context.Context, kind FloorKind, key protocol.Key, nowMS int64) (Floor, bool, error) {
	var f Floor
	found := false
	err := s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(floorKey(kind, key))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		} else if err != nil {
			return err
		}
		if err := item.Value(func(v []byte) error {
			f, err = decodeFloor(kind, v)
			return err
		}); err != nil {
			return err
		}
		found, err = floorApplies(txn, kind, key, f, nowMS)
		return err
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return Floor{}, false, ErrClosed
	}
	if err != nil || !found {
		return Floor{}, false, err
	}
	return f, true, nil
}

// floorApplies reports whether f, the floor of key, applies at nowMS: it
// is not past its UntilMS and, for a bundle floor, its ref is not consumed.
func floorApplies(txn *badger.Txn, kind FloorKind, key protocol.Key, f Floor, nowMS int64) (bool, error) {
	if f.UntilMS <= nowMS {
		return false, nil
	}
	if kind != FloorBundle {
		return true, nil
	}
	until, ok, err := consumedUntil(txn, key, f.Ref)
	if err != nil {
		return false, err
	}
	return !ok || until <= nowMS, nil
}

// RaiseFloor records f as the floor of a key unless a floor that still
// applies at nowMS (see Floor) is higher. cmp(a, b) orders versions: positive when a is
// higher than b, zero for the same version (whose UntilMS is then extended).
// It reports whether it wrote.
func (s *Store) RaiseFloor(ctx context.Context, kind FloorKind, key protocol.Key, f Floor, nowMS int64, cmp func(a, b Floor) int) (bool, error) {
	k := floorKey(kind, key)
	var wrote bool
	err := s.update(ctx, func(txn *badger.Txn) error {
		wrote = false
		item, err := txn.Get(k)
		switch {
		case errors.Is(err, badger.ErrKeyNotFound):
		case err != nil:
			return err
		default:
			var old Floor
			if err := item.Value(func(v []byte) error { old, err = decodeFloor(kind, v); return err }); err != nil {
				return err
			}
			applies, err := floorApplies(txn, kind, key, old, nowMS)
			if err != nil {
				return err
			}
			if applies {
				switch c := cmp(f, old); {
				case c < 0:
					return nil
				case c == 0 && f.UntilMS <= old.UntilMS:
					return nil
				}
			}
		}
		wrote = true
		return txn.Set(k, encodeFloor(kind, f))
	})
	return wrote, err
}

// PruneFloors deletes every floor that no longer applies at nowMS and
// returns how many it deleted.
func (s *Store) PruneFloors(ctx context.Context, nowMS int64) (int, error) {
	var void [][]byte
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixFloor, '/'}, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if err := ctx.Err(); err != nil {
				return err
			}
			item := it.Item()
			k := item.KeyCopy(nil)
			if len(k) != floorKeyLen {
				void = append(void, k)
				continue
			}
			err := item.Value(func(v []byte) error {
				f, err := decodeFloor(FloorKind(k[2]), v)
				if err != nil || f.UntilMS <= nowMS {
					void = append(void, k)
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	deleted := 0
	for len(void) > 0 {
		batch := void[:min(len(void), 1000)]
		void = void[len(batch):]
		n := 0
		// Check again in the writing transaction: a lookup may have raised
		// the floor since the scan.
		if err := s.update(ctx, func(txn *badger.Txn) error {
			n = 0
			for _, k := range batch {
				if len(k) == floorKeyLen {
					item, err := txn.Get(k)
					if errors.Is(err, badger.ErrKeyNotFound) {
						continue
					} else if err != nil {
						return err
					}
					keep := false
					if err := item.Value(func(v []byte) error {
						f, err := decodeFloor(FloorKind(k[2]), v)
						keep = err == nil && f.UntilMS > nowMS
						return nil
					}); err != nil {
						return err
					}
					if keep {
						continue
					}
				}
				if err := txn.Delete(k); err != nil {
					return err
				}
				n++
			}
			return nil
		}); err != nil {
			return deleted, err
		}
		deleted += n
	}
	return deleted, nil
}
