package storage

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/kpnode/kpnode/protocol"
)

// Key layout. All integers are big-endian so that byte order is numeric
// order; timestamps are stored inverted (^ts) so a forward scan of a
// device's prefix yields the newest bundle first and, at equal timestamps,
// the smaller ref first, which is exactly the "latest" order.
//
//	b/<device 32>/<^ts 8>/<ref 32>  -> bundle value (flags, received_at, signature, payload)
//	l/<device 32>/<^ts 8>/<ref 32>  -> empty; the subset of b/ that is last-resort
//	r/<device 32>/<ref 32>          -> ts 8; dedups a ref and finds its b/ key
//	n/<device 32>                   -> u32 count of the device's bundles; read and
//	                                   written by every put, so concurrent puts
//	                                   to one device conflict and retry
//	x/<account 32>                  -> lamport u64 ‖ until_ms u64: tombstone of a
//	                                   pruned account; refuses that lamport and
//	                                   older until the retention has passed again
//	a/<account 32>                  -> account value (updated_at, lamport, signature, payload)
//	m/schema                        -> schema version
const (
	prefixBundle     = 'b'
	prefixLastResort = 'l'
	prefixRef        = 'r'
	prefixAccount    = 'a'
	prefixCount      = 'n'
	prefixTombstone  = 'x'
)

var schemaKey = []byte("m/schema")

const schemaVersion = 1

const (
	bundleKeyLen = 2 + protocol.KeySize + 1 + 8 + 1 + protocol.RefSize
	refKeyLen    = 2 + protocol.KeySize + 1 + protocol.RefSize
)

func devicePrefix(prefix byte, dev protocol.Key) []byte {
	k := make([]byte, 0, bundleKeyLen)
	k = append(k, prefix, '/')
	k = append(k, dev[:]...)
	return append(k, '/')
}

func bundleKey(prefix byte, dev protocol.Key, ts uint64, ref protocol.Ref) []byte {
	k := devicePrefix(prefix, dev)
	k = binary.BigEndian.AppendUint64(k, ^ts)
	k = append(k, '/')
	return append(k, ref[:]...)
}

func refKey(dev protocol.Key, ref protocol.Ref) []byte {
	k := make([]byte, 0, refKeyLen)
	k = append(k, prefixRef, '/')
	k = append(k, dev[:]...)
	k = append(k, '/')
	return append(k, ref[:]...)
}

func countKey(dev protocol.Key) []byte {
	k := make([]byte, 0, 2+protocol.KeySize)
	k = append(k, prefixCount, '/')
	return append(k, dev[:]...)
}

func tombstoneKey(acct protocol.Key) []byte {
	k := make([]byte, 0, 2+protocol.KeySize)
	k = append(k, prefixTombstone, '/')
	return append(k, acct[:]...)
}

func accountKey(acct protocol.Key) []byte {
	k := make([]byte, 0, 2+protocol.KeySize)
	k = append(k, prefixAccount, '/')
	return append(k, acct[:]...)
}

var errCorrupt = errors.New("storage: corrupt record")

// parseBundleKey splits a b/ or l/ key.
func parseBundleKey(k []byte) (dev protocol.Key, ts uint64, ref protocol.Ref, err error) {
	if len(k) != bundleKeyLen {
		return dev, 0, ref, fmt.Errorf("%w: bundle key of %d bytes", errCorrupt, len(k))
	}
	copy(dev[:], k[2:])
	ts = ^binary.BigEndian.Uint64(k[2+protocol.KeySize+1:])
	copy(ref[:], k[2+protocol.KeySize+1+8+1:])
	return dev, ts, ref, nil
}

// Bundle value: flags u8 ‖ received_at_ms u64 ‖ signature 64 ‖ payload.
const (
	flagLastResort = 1 << 0
	bundleValueHdr = 1 + 8 + protocol.SignatureSize
)

func encodeBundleValue(b *Bundle) []byte {
	v := make([]byte, 0, bundleValueHdr+len(b.Payload))
	var flags byte
	if b.LastResort {
		flags |= flagLastResort
	}
	v = append(v, flags)
	v = binary.BigEndian.AppendUint64(v, uint64(b.ReceivedAtMS))
	v = append(v, b.Signature[:]...)
	return append(v, b.Payload...)
}

func decodeBundleValue(b *Bundle, v []byte) error {
	if len(v) < bundleValueHdr {
		return fmt.Errorf("%w: bundle value of %d bytes", errCorrupt, len(v))
	}
	b.LastResort = v[0]&flagLastResort != 0
	b.ReceivedAtMS = int64(binary.BigEndian.Uint64(v[1:]))
	copy(b.Signature[:], v[9:])
	b.Payload = append([]byte(nil), v[bundleValueHdr:]...)
	return nil
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

const countKeyLen = 2 + protocol.KeySize

// keyGroup returns the device part of a per-device key (b/, l/, r/, n/),
// by which all of them sort first. k has its family's length.
func keyGroup(k []byte) []byte { return k[2 : 2+protocol.KeySize] }

// lastResortTwin returns the l/ key of a b/ key, bundleTwin the b/ key of an l/ key.
func lastResortTwin(bkey []byte) []byte { return append([]byte{prefixLastResort}, bkey[1:]...) }
func bundleTwin(lkey []byte) []byte     { return append([]byte{prefixBundle}, lkey[1:]...) }

// refOfRefKey returns the ref of an r/ key of refKeyLen bytes.
func refOfRefKey(k []byte) protocol.Ref {
	var ref protocol.Ref
	copy(ref[:], k[len(k)-protocol.RefSize:])
	return ref
}
