package storage

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/kpnode/kpnode/protocol"
)

// Key layout (schema 3). All integers are big-endian so that byte order is
// numeric order; timestamps are stored inverted (^ts) so a forward scan of a
// device's prefix yields the newest bundle first and, at equal timestamps,
// the smaller ref first, which is exactly the "latest" order.
//
// Every key of a device or account starts with h0 = sha256(key)[0], the
// byte the shard is taken from (shard = h0 mod S), so the items of one
// shard are the 256/S contiguous ranges h0 = s, s+S, ... whatever S is: a
// sync round scans only its shard. Lookups compute h0 from the key.
//
//	b/<h0>/<device 32>/<^ts 8>/<ref 32>  -> bundle value (flags, received_at, signature, [not_after,] payload)
//	l/<h0>/<device 32>/<^ts 8>/<ref 32>  -> empty; the subset of b/ that is last-resort
//	r/<h0>/<device 32>/<ref 32>          -> ts u64 ‖ not_after_ms i64 ‖ bytes u32: dedups a
//	                                        ref, finds its b/ key and says what the bundle
//	                                        costs without reading it
//	n/<h0>/<device 32>                   -> u32 count of the device's bundles; read and
//	                                        written by every put, so concurrent puts
//	                                        to one device conflict and retry
//	a/<h0>/<account 32>                  -> account value (updated_at, lamport, signature, payload)
//	x/<account 32>                       -> lamport u64 ‖ until_ms u64: tombstone of a
//	                                        pruned account; refuses that lamport and
//	                                        older until the retention has passed again
//	t/<ts u64>/<b/ key>                  -> empty; every bundle by signed timestamp,
//	                                        oldest first (retention prune, budget eviction)
//	e/<not_after_ms u64>/<b/ key>        -> empty; bundles with a KeyPackage lifetime,
//	                                        earliest end first (lifetime prune, eviction)
//	v/<h0>/<device 32>/c/<ref 32>        -> claim record: the winning claim notice of the
//	                                        ref (hand-outs u64 ‖ node_key ‖ sig ‖ payload);
//	                                        goes with the bundle on every delete path
//	v/<h0>/<device 32>/q/<sha256 32>     -> consume notice (sig ‖ payload), until its
//	                                        timestamp plus the retention
//	z/<h0>/<device 32>/<ref 32>          -> until_ms u64: consume tombstone; PutBundle of
//	                                        the (device, ref) is ErrConsumed until then
//	g/<ref 32>/<device 32>               -> empty; every device a ref is held under
//	                                        (ErrForeignRef); rebuilt from r/ when it drifts
//	m/schema                             -> schema version u32
//
// Schema 3 added v/, z/ and g/ (notices.go); a schema 2 data dir is
// migrated by building g/ from r/ on Open. v/ and z/ sort by <h0>/<device>
// too, so a shard's notices are as contiguous as its bundles.
//
// b/, l/, r/ and n/ all sort by <h0>/<device> first, so the startup check
// walks them side by side one device at a time. Prefixes 'o' and 'f' are
// reserved for other records of the node.
const (
	prefixBundle     = 'b'
	prefixLastResort = 'l'
	prefixRef        = 'r'
	prefixAccount    = 'a'
	prefixCount      = 'n'
	prefixTombstone  = 'x'
)

var schemaKey = []byte("m/schema")

const schemaVersion = 3

const (
	groupLen      = 1 + 1 + protocol.KeySize // <h0>/<key>
	bundleKeyLen  = 2 + groupLen + 1 + 8 + 1 + protocol.RefSize
	refKeyLen     = 2 + groupLen + 1 + protocol.RefSize
	countKeyLen   = 2 + groupLen
	accountKeyLen = 2 + groupLen
	refValueLen   = 8 + 8 + 4
)

// h0 is the first byte of sha256(key): the shard is h0 mod S.
func h0(k protocol.Key) byte {
	h := sha256.Sum256(k[:])
	return h[0]
}

// groupKey returns prefix/<h0>/<key>, the start of every key of a device
// or account.
func groupKey(prefix byte, k protocol.Key, capacity int) []byte {
	out := make([]byte, 0, capacity)
	out = append(out, prefix, '/', h0(k), '/')
	return append(out, k[:]...)
}

func devicePrefix(prefix byte, dev protocol.Key) []byte {
	return append(groupKey(prefix, dev, bundleKeyLen), '/')
}

func bundleKey(prefix byte, dev protocol.Key, ts uint64, ref protocol.Ref) []byte {
	k := devicePrefix(prefix, dev)
	k = binary.BigEndian.AppendUint64(k, ^ts)
	k = append(k, '/')
	return append(k, ref[:]...)
}

func refKey(dev protocol.Key, ref protocol.Ref) []byte {
	k := append(groupKey(prefixRef, dev, refKeyLen), '/')
	return append(k, ref[:]...)
}

func countKey(dev protocol.Key) []byte { return groupKey(prefixCount, dev, countKeyLen) }

func accountKey(acct protocol.Key) []byte { return groupKey(prefixAccount, acct, accountKeyLen) }

func tombstoneKey(acct protocol.Key) []byte {
	k := make([]byte, 0, 2+protocol.KeySize)
	k = append(k, prefixTombstone, '/')
	return append(k, acct[:]...)
}

// keyOf returns the device or account of a b/, l/, r/, n/ or a/ key
// (of its family's length).
func keyOf(k []byte) protocol.Key {
	var key protocol.Key
	copy(key[:], k[4:4+protocol.KeySize])
	return key
}

// wellFormed reports whether a per-key record's key has its family's
// length and the h0 of its key.
func wellFormed(k []byte, keyLen int) bool {
	return len(k) == keyLen && k[2] == h0(keyOf(k))
}

var errCorrupt = errors.New("storage: corrupt record")

// parseBundleKey splits a b/ or l/ key.
func parseBundleKey(k []byte) (dev protocol.Key, ts uint64, ref protocol.Ref, err error) {
	if len(k) != bundleKeyLen {
		return dev, 0, ref, fmt.Errorf("%w: bundle key of %d bytes", errCorrupt, len(k))
	}
	dev = keyOf(k)
	ts = ^binary.BigEndian.Uint64(k[2+groupLen+1:])
	copy(ref[:], k[2+groupLen+1+8+1:])
	return dev, ts, ref, nil
}

// refValue is what r/ holds about a bundle.
type refValue struct {
	TS         uint64
	NotAfterMS int64
	Bytes      uint32 // the bundle's logical size (see recordBytes)
}

func (r refValue) encode() []byte {
	v := make([]byte, 0, refValueLen)
	v = binary.BigEndian.AppendUint64(v, r.TS)
	v = binary.BigEndian.AppendUint64(v, uint64(r.NotAfterMS))
	return binary.BigEndian.AppendUint32(v, r.Bytes)
}

func decodeRefValue(v []byte) (refValue, error) {
	if len(v) != refValueLen {
		return refValue{}, fmt.Errorf("%w: ref value of %d bytes", errCorrupt, len(v))
	}
	return refValue{
		TS:         binary.BigEndian.Uint64(v),
		NotAfterMS: int64(binary.BigEndian.Uint64(v[8:])),
		Bytes:      binary.BigEndian.Uint32(v[16:]),
	}, nil
}

// recordOverhead is what a record costs in the store budget beyond its
// payload: its keys, index entries and value header, rounded up.
const recordOverhead = 512

func bundleBytes(b *Bundle) uint32 { return uint32(len(b.Payload) + recordOverhead) }

// Bundle value: flags u8 ‖ received_at_ms u64 ‖ signature 64 ‖
// [not_after_ms u64, when flagNotAfter] ‖ payload. Values written before
// the flag existed decode with no lifetime.
const (
	flagLastResort = 1 << 0
	flagNotAfter   = 1 << 1
	bundleValueHdr = 1 + 8 + protocol.SignatureSize
)

func encodeBundleValue(b *Bundle) []byte {
	v := make([]byte, 0, bundleValueHdr+8+len(b.Payload))
	var flags byte
	if b.LastResort {
		flags |= flagLastResort
	}
	if b.NotAfterMS != 0 {
		flags |= flagNotAfter
	}
	v = append(v, flags)
	v = binary.BigEndian.AppendUint64(v, uint64(b.ReceivedAtMS))
	v = append(v, b.Signature[:]...)
	if b.NotAfterMS != 0 {
		v = binary.BigEndian.AppendUint64(v, uint64(b.NotAfterMS))
	}
	return append(v, b.Payload...)
}

func decodeBundleValue(b *Bundle, v []byte) error {
	if len(v) < bundleValueHdr {
		return fmt.Errorf("%w: bundle value of %d bytes", errCorrupt, len(v))
	}
	flags := v[0]
	b.LastResort = flags&flagLastResort != 0
	b.ReceivedAtMS = int64(binary.BigEndian.Uint64(v[1:]))
	copy(b.Signature[:], v[9:])
	v = v[bundleValueHdr:]
	b.NotAfterMS = 0
	if flags&flagNotAfter != 0 {
		if len(v) < 8 {
			return fmt.Errorf("%w: bundle value without its not_after", errCorrupt)
		}
		b.NotAfterMS = int64(binary.BigEndian.Uint64(v))
		v = v[8:]
	}
	b.Payload = append([]byte(nil), v...)
	return nil
}

// usable reports whether a bundle may be served at nowMS: its KeyPackage
// lifetime, if it has one, has not ended.
func (b *Bundle) usable(nowMS int64) bool { return b.NotAfterMS == 0 || b.NotAfterMS >= nowMS }

// Lifetime index: e/<not_after_ms u64>/<b/ key> -> empty, for bundles with
// a KeyPackage lifetime, so the ones whose lifetime has ended are a
// prefix of one scan.
const prefixLifetime = 'e'

func lifetimeKey(notAfterMS int64, bkey []byte) []byte {
	k := make([]byte, 0, 2+8+1+len(bkey))
	k = append(k, prefixLifetime, '/')
	k = binary.BigEndian.AppendUint64(k, uint64(notAfterMS))
	k = append(k, '/')
	return append(k, bkey...)
}

// Account value: updated_at_ms u64 ‖ lamport u64 ‖ signature 64 ‖ payload.
const accountValueHdr = 8 + 8 + protocol.SignatureSize

func encodeAccountValue(a *Account) []byte {
	v := make([]byte, 0, accountValueHdr+len(a.Payload))
	v = binary.BigEndian.AppendUint64(v, uint64(a.UpdatedAtMS))
	v = binary.BigEndian.AppendUint64(v, a.Lamport)
	v = append(v, a.Signature[:]...)
	return append(v, a.Payload...)
}

func decodeAccountValue(a *Account, v []byte) error {
	if len(v) < accountValueHdr {
		return fmt.Errorf("%w: account value of %d bytes", errCorrupt, len(v))
	}
	a.UpdatedAtMS = int64(binary.BigEndian.Uint64(v))
	a.Lamport = binary.BigEndian.Uint64(v[8:])
	copy(a.Signature[:], v[16:])
	a.Payload = append([]byte(nil), v[accountValueHdr:]...)
	return nil
}

// keyGroup returns <h0>/<key> of a per-key record's key, by which all of
// b/, l/, r/ and n/ sort first. k has its family's length.
func keyGroup(k []byte) []byte { return k[2 : 2+groupLen] }

// lastResortTwin returns the l/ key of a b/ key, bundleTwin the b/ key of an l/ key.
func lastResortTwin(bkey []byte) []byte { return append([]byte{prefixLastResort}, bkey[1:]...) }
func bundleTwin(lkey []byte) []byte     { return append([]byte{prefixBundle}, lkey[1:]...) }

// refOfRefKey returns the ref of an r/ key of refKeyLen bytes.
func refOfRefKey(k []byte) protocol.Ref {
	var ref protocol.Ref
	copy(ref[:], k[len(k)-protocol.RefSize:])
	return ref
}
