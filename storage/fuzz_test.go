package storage

import (
	"bytes"
	"reflect"
	"testing"
)

// FuzzDecodeRecords feeds arbitrary bytes to every decoder of stored keys
// and values: none may panic, and what decodes re-encodes to an equal record.
func FuzzDecodeRecords(f *testing.F) {
	b := bundle(dev(1), 1000, "kp", true)
	b.NotAfterMS = 123456
	f.Add(encodeBundleValue(b))
	f.Add(encodeBundleValue(bundle(dev(1), 1000, "kp", false)))
	f.Add(encodeAccountValue(account(dev(2), 3, 1)))
	f.Add(refValue{TS: 1, NotAfterMS: 2, Bytes: 3}.encode())
	f.Add(bundleKey(prefixBundle, dev(1), 1000, b.Ref))
	f.Add(timeKey(bundleKey(prefixBundle, dev(1), 1000, b.Ref)))
	f.Add(lifetimeKey(5, bundleKey(prefixBundle, dev(1), 1000, b.Ref)))
	f.Fuzz(func(t *testing.T, v []byte) {
		var got Bundle
		if decodeBundleValue(&got, v) == nil {
			var again Bundle
			if err := decodeBundleValue(&again, encodeBundleValue(&got)); err != nil || !reflect.DeepEqual(got, again) {
				t.Fatalf("bundle value does not round-trip: %v", err)
			}
		}
		var a Account
		if decodeAccountValue(&a, v) == nil && !bytes.Equal(encodeAccountValue(&a), v) {
			t.Fatal("account value does not round-trip")
		}
		if rv, err := decodeRefValue(v); err == nil && !bytes.Equal(rv.encode(), v) {
			t.Fatal("ref value does not round-trip")
		}
		if dev, ts, ref, err := parseBundleKey(v); err == nil {
			if d2, ts2, ref2, err := parseBundleKey(bundleKey(prefixBundle, dev, ts, ref)); err != nil || d2 != dev || ts2 != ts || ref2 != ref {
				t.Fatal("bundle key does not round-trip")
			}
		}
		if _, bkey, err := parseIndexKey(v); err == nil {
			parseBundleKey(bkey)
		}
		for _, n := range []int{bundleKeyLen, refKeyLen, countKeyLen, accountKeyLen} {
			wellFormed(v, n)
		}
	})
}
