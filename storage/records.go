package storage

import (
	"errors"

	"github.com/dgraph-io/badger/v4"
)

// refFromItem decodes an r/ item.
func refFromItem(item *badger.Item) (refValue, error) {
	var rv refValue
	err := item.Value(func(v []byte) (err error) {
		rv, err = decodeRefValue(v)
		return err
	})
	return rv, err
}

// bundleMeta returns what is known about the bundle at bkey: from its r/
// entry when that names this timestamp (ok), else from its value.
func bundleMeta(txn *badger.Txn, bkey []byte) (rv refValue, ok bool, err error) {
	dev, ts, ref, err := parseBundleKey(bkey)
	if err != nil {
		return rv, false, err
	}
	switch item, err := txn.Get(refKey(dev, ref)); {
	case err == nil:
		if rv, err := refFromItem(item); err == nil && rv.TS == ts {
			return rv, true, nil
		}
	case !errors.Is(err, badger.ErrKeyNotFound):
		return rv, false, err
	}
	item, err := txn.Get(bkey)
	if err != nil {
		return rv, false, err
	}
	b, err := bundleFromItem(item)
	if err != nil {
		return rv, false, err
	}
	return refValue{TS: ts, NotAfterMS: b.NotAfterMS, Bytes: bundleBytes(b)}, false, nil
}

// deleteBundleRecord deletes the bundle at bkey with its l/ twin and its
// index entries, and its r/ entry too when dropRef (a refresh rewrites
// it instead), with the ref's global index entry and claim record (into
// nd). It returns what the bundle was, its Bytes what the deletion freed
// for the budget.
func deleteBundleRecord(txn *badger.Txn, bkey []byte, dropRef bool, nd *noticeDelta) (refValue, error) {
	rv, refOK, err := bundleMeta(txn, bkey)
	if err != nil {
		return rv, err
	}
	if err := txn.Delete(bkey); err != nil {
		return rv, err
	}
	if err := txn.Delete(lastResortTwin(bkey)); err != nil {
		return rv, err
	}
	if err := txn.Delete(timeKey(bkey)); err != nil {
		return rv, err
	}
	if rv.NotAfterMS != 0 {
		if err := txn.Delete(lifetimeKey(rv.NotAfterMS, bkey)); err != nil {
			return rv, err
		}
	}
	if dropRef && refOK {
		dev, _, ref, _ := parseBundleKey(bkey)
		if err := txn.Delete(refKey(dev, ref)); err != nil {
			return rv, err
		}
		freed, err := dropRefRecords(txn, dev, ref, nd)
		if err != nil {
			return rv, err
		}
		rv.Bytes += uint32(freed)
	}
	return rv, nil
}
