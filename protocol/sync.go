package protocol

import (
	"crypto/sha256"
	"encoding/binary"
	"math/bits"
)

// Sync items and fingerprints (range-based set reconciliation).
//
// Every record a node holds is an item with a 32-byte hash:
//
//	bundle:  SHA-256(device_id ‖ timestamp_ms u64 BE ‖ bundle ref)
//	account: SHA-256(account_pub ‖ lamport u64 BE ‖ SHA-256(payload))
//
// A set of items has a Digest: its count and the sum of its item hashes as
// 256-bit big-endian integers modulo 2^256. Sums are order-independent and
// can be updated one item at a time. Two nodes compare a set through its
// Fingerprint; on the wire an item is named by its ItemID, the first 8 bytes
// of its hash.

// BundleItem is the sync item hash of a stored bundle.
func BundleItem(device Key, timestampMS uint64, ref Ref) [32]byte {
	var buf [KeySize + 8 + RefSize]byte
	copy(buf[:], device[:])
	binary.BigEndian.PutUint64(buf[KeySize:], timestampMS)
	copy(buf[KeySize+8:], ref[:])
	return sha256.Sum256(buf[:])
}

// AccountItem is the sync item hash of a stored account bundle.
func AccountItem(account Key, lamport uint64, payload []byte) [32]byte {
	ph := sha256.Sum256(payload)
	var buf [KeySize + 8 + 32]byte
	copy(buf[:], account[:])
	binary.BigEndian.PutUint64(buf[KeySize:], lamport)
	copy(buf[KeySize+8:], ph[:])
	return sha256.Sum256(buf[:])
}

// ItemID names an item on the wire: the first 8 bytes of its hash.
func ItemID(h [32]byte) uint64 { return binary.BigEndian.Uint64(h[:8]) }

// Digest summarises a set of items.
type Digest struct {
	Count uint64
	sum   [4]uint64 // big-endian limbs: sum[0] most significant
}

// Add puts an item into the digest.
func (d *Digest) Add(h [32]byte) {
	d.Count++
	var carry uint64
	for i := 3; i >= 0; i-- {
		d.sum[i], carry = bits.Add64(d.sum[i], binary.BigEndian.Uint64(h[i*8:]), carry)
	}
}

// Remove takes an item out of the digest.
func (d *Digest) Remove(h [32]byte) {
	d.Count--
	var borrow uint64
	for i := 3; i >= 0; i-- {
		d.sum[i], borrow = bits.Sub64(d.sum[i], binary.BigEndian.Uint64(h[i*8:]), borrow)
	}
}

// FingerprintSize is the length of a Fingerprint.
const FingerprintSize = 16

// Fingerprint is SHA-256(count u64 BE ‖ sum 32 bytes BE), truncated to 16
// bytes. Equal sets have equal fingerprints; different sets collide with
// negligible probability.
func (d Digest) Fingerprint() [FingerprintSize]byte {
	var buf [8 + 32]byte
	binary.BigEndian.PutUint64(buf[:], d.Count)
	for i, limb := range d.sum {
		binary.BigEndian.PutUint64(buf[8+i*8:], limb)
	}
	h := sha256.Sum256(buf[:])
	var fp [FingerprintSize]byte
	copy(fp[:], h[:])
	return fp
}
