package storage

import (
	"context"
	"errors"
	"fmt"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// RefClaim returns what a claim of dev's ref meets: the bundle held under
// (dev, ref), usable now (Claimed set), and the claim notice held for it
// with its info (nil when the ref is unclaimed). ErrNotFound when the ref
// is not held under dev, is consumed, or its KeyPackage lifetime has
// ended. An owner answering a request that names refs reads it per ref.
func (s *Store) RefClaim(ctx context.Context, dev protocol.Key, ref protocol.Ref) (_ *Bundle, _ *protocol.ClaimNotice, _ protocol.ClaimInfo, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return nil, nil, protocol.ClaimInfo{}, err
	}
	nowMS := s.opts.Now().UnixMilli()
	var (
		b    *Bundle
		held *claimRecord
	)
	err = s.db.View(func(txn *badger.Txn) error {
		if until, ok, err := consumedUntil(txn, dev, ref); err != nil {
			return err
		} else if ok && until > nowMS {
			return ErrNotFound
		}
		item, err := txn.Get(refKey(dev, ref))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return ErrNotFound
		} else if err != nil {
			return err
		}
		rv, err := refFromItem(item)
		if err != nil {
			return err
		}
		if rv.NotAfterMS != 0 && rv.NotAfterMS < nowMS {
			return ErrNotFound
		}
		item, err = txn.Get(bundleKey(prefixBundle, dev, rv.TS, ref))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return ErrNotFound
		} else if err != nil {
			return err
		}
		if b, err = bundleFromItem(item); err != nil {
			return err
		}
		if held, err = getClaim(txn, dev, ref); err != nil {
			return err
		}
		b.Claimed = held != nil
		return nil
	})
	if errors.Is(err, ErrNotFound) {
		return nil, nil, protocol.ClaimInfo{}, ErrNotFound
	}
	if err != nil {
		return nil, nil, protocol.ClaimInfo{}, fmt.Errorf("storage: ref claim: %w", err)
	}
	if held == nil {
		return b, nil, protocol.ClaimInfo{}, nil
	}
	n := held.Notice
	return b, &n, held.Info, nil
}
