package protocol

import (
	"crypto/ed25519"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strings"

	"github.com/kpnode/kpnode/protocol/mls"
)

// Sizes of the fixed parts of a bundle.
const (
	KeySize       = 32 // an Ed25519 public key: device_id, account_pub
	SignatureSize = 64 // an Ed25519 signature
	TimestampSize = 8  // the u64 little-endian timestamp_ms at the start of a bundle payload
	RefSize       = 32 // a bundle ref (KeyPackageRef with SHA-256)
	// MaxPayloadSize caps a bundle or account bundle payload: a protocol
	// rule (payload_too_large) on every path. A suite 0x004D KeyPackage is
	// about 2.9 KB; 64 KiB leaves room for large credentials (x509 chains)
	// while bounding what one record costs to receive, store and forward.
	MaxPayloadSize = 64 << 10
)

// Key is a 32-byte Ed25519 public key naming a device or an account.
type Key [KeySize]byte

// ErrKeyEncoding is returned by ParseKey for anything but 64 hex digits.
var ErrKeyEncoding = errors.New("must be hex of a 32-byte key")

// ParseKey decodes a key from hex in any case. The canonical text form is
// lowercase (Key.String).
func ParseKey(s string) (Key, error) {
	var k Key
	if len(s) != 2*KeySize {
		return k, ErrKeyEncoding
	}
	if _, err := hex.Decode(k[:], []byte(s)); err != nil {
		return k, ErrKeyEncoding
	}
	return k, nil
}

// String returns the lowercase hex of k, the form used in URLs and JSON.
func (k Key) String() string { return hex.EncodeToString(k[:]) }

// Ref names a bundle: the KeyPackageRef of its key_package.
type Ref [RefSize]byte

// String returns the lowercase hex of r.
func (r Ref) String() string { return hex.EncodeToString(r[:]) }

// ParseRef decodes a ref from hex in any case.
func ParseRef(s string) (Ref, error) {
	var r Ref
	if len(s) != 2*RefSize {
		return r, errors.New("ref must be hex of 32 bytes")
	}
	if _, err := hex.Decode(r[:], []byte(strings.ToLower(s))); err != nil {
		return r, errors.New("ref must be hex of 32 bytes")
	}
	return r, nil
}

// Bundle is a signed KeyPackage publication:
// payload = timestamp_ms (u64 LE) ‖ key_package, signature = Ed25519(device key, payload).
// The signed bytes are the wire bytes.
type Bundle struct {
	DeviceID  Key
	Payload   []byte
	Signature [SignatureSize]byte
}

// ErrPayloadTooShort: a bundle payload has no room for its timestamp.
var ErrPayloadTooShort = errors.New("too short to contain a timestamp")

// SplitBundlePayload returns the signed timestamp and the key_package of a
// bundle payload. The key_package aliases payload.
func SplitBundlePayload(payload []byte) (timestampMS uint64, keyPackage []byte, err error) {
	if len(payload) < TimestampSize {
		return 0, nil, ErrPayloadTooShort
	}
	return binary.LittleEndian.Uint64(payload), payload[TimestampSize:], nil
}

// BundlePayload builds the payload a device signs: timestamp_ms ‖ key_package.
func BundlePayload(timestampMS uint64, keyPackage []byte) []byte {
	p := make([]byte, TimestampSize+len(keyPackage))
	binary.LittleEndian.PutUint64(p, timestampMS)
	copy(p[TimestampSize:], keyPackage)
	return p
}

// SignBundle signs timestamp_ms ‖ key_package with the device key.
func SignBundle(device ed25519.PrivateKey, timestampMS uint64, keyPackage []byte) Bundle {
	b := Bundle{Payload: BundlePayload(timestampMS, keyPackage)}
	copy(b.DeviceID[:], device.Public().(ed25519.PublicKey))
	copy(b.Signature[:], ed25519.Sign(device, b.Payload))
	return b
}

// KeyPackageRef computes RefHash("MLS 1.0 KeyPackage Reference", value) with
// SHA-256: SHA-256(opaque label<V> ‖ opaque value<V>). value is the bare
// KeyPackage (or, with MLS validation off, the key_package bytes as given).
func KeyPackageRef(value []byte) Ref { return Ref(mls.Ref(value)) }

// ErrMalformed marks a wire message that does not decode, has wrong field
// sizes, or names a key of another shard than the one it was sent for.
// A peer that sends one is faulty or hostile.
var ErrMalformed = errors.New("malformed message")
