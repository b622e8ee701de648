package protocol

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"time"
)

// Notices: what the network learns about a bundle's use.
//
// A consume notice is signed by the device: it names bundles (by ref) the
// device has seen used, so every node deletes them and refuses them for the
// retention. A claim notice is signed by a node: it says that node handed
// out one bundle of a device to a client, so other nodes hand out another.
//
//	consume payload = "kpnode:consume:v1\0" ‖ timestamp_ms u64 LE ‖ count u16 LE ‖ count × 32-byte refs
//	claim payload   = "kpnode:claim:v1\0"   ‖ timestamp_ms u64 LE ‖ device_id 32 ‖ ref 32

// ConsumeDomain starts every consume notice payload.
const ConsumeDomain = "kpnode:consume:v1\x00"

// ClaimDomain starts every claim notice payload.
const ClaimDomain = "kpnode:claim:v1\x00"

// Notice sizes and caps.
const (
	// MaxConsumeRefs caps the refs of one consume notice: more than a
	// device's whole pool (--max-per-device, 100 by default).
	MaxConsumeRefs = 256
	// consumeHeaderSize is the domain, timestamp and count.
	consumeHeaderSize = len(ConsumeDomain) + 8 + 2
	// MaxConsumePayloadSize is the payload of a consume notice naming
	// MaxConsumeRefs refs (8,220 bytes).
	MaxConsumePayloadSize = consumeHeaderSize + MaxConsumeRefs*RefSize
	// ClaimPayloadSize is the exact size of a claim notice payload (88 bytes).
	ClaimPayloadSize = len(ClaimDomain) + 8 + KeySize + RefSize
)

// Rules of notices (see Rule).
const (
	RuleConsumeLayout     Rule = "consume_layout"      // consume payload: domain, count 1..256, exact length, no ref twice
	RuleClaimLayout       Rule = "claim_layout"        // claim payload: domain, exact length, device_id of the notice
	RuleForeignRef        Rule = "foreign_ref"         // a claim notice names a ref this node holds under another device (strict MLS)
	RuleConsumeForeignRef Rule = "consume_foreign_ref" // a consume notice names a ref this node holds under another device
	RuleConsumeTooLarge   Rule = "consume_too_large"   // consume payload over MaxConsumePayloadSize, before any signature work
	RuleClaimNoticeLength Rule = "claim_notice_length" // claim payload not ClaimPayloadSize, before any signature work
)

// ConsumeNotice is a device's signed statement that some of its bundles have
// been used. The signed bytes are the wire bytes.
type ConsumeNotice struct {
	DeviceID  Key
	Payload   []byte
	Signature [SignatureSize]byte
}

// ConsumeInfo is what validation learns from a consume notice.
type ConsumeInfo struct {
	TimestampMS uint64
	Refs        []Ref // distinct, in payload order
	// Hash is SHA-256 of the payload: it names the notice in the store
	// and in sync.
	Hash [32]byte
}

// ConsumePayload builds the payload a device signs. It does not check the
// count or duplicates; Validate does.
func ConsumePayload(timestampMS uint64, refs []Ref) []byte {
	p := make([]byte, 0, consumeHeaderSize+len(refs)*RefSize)
	p = append(p, ConsumeDomain...)
	p = binary.LittleEndian.AppendUint64(p, timestampMS)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(refs)))
	for _, r := range refs {
		p = append(p, r[:]...)
	}
	return p
}

// SignConsume signs a consume notice for refs with the device key.
func SignConsume(device ed25519.PrivateKey, timestampMS uint64, refs []Ref) ConsumeNotice {
	n := ConsumeNotice{Payload: ConsumePayload(timestampMS, refs)}
	copy(n.DeviceID[:], device.Public().(ed25519.PublicKey))
	copy(n.Signature[:], ed25519.Sign(device, n.Payload))
	return n
}

// DecodeConsumePayload checks a consume payload's layout and returns its
// timestamp and refs. It does not verify the signature.
func DecodeConsumePayload(payload []byte) (timestampMS uint64, refs []Ref, err error) {
	if len(payload) < consumeHeaderSize || string(payload[:len(ConsumeDomain)]) != ConsumeDomain {
		return 0, nil, fmt.Errorf("%w: consume payload must start with %q, a timestamp and a count", ErrMalformed, "kpnode:consume:v1\\0")
	}
	timestampMS = binary.LittleEndian.Uint64(payload[len(ConsumeDomain):])
	count := int(binary.LittleEndian.Uint16(payload[len(ConsumeDomain)+8:]))
	if count == 0 || count > MaxConsumeRefs {
		return 0, nil, fmt.Errorf("%w: consume count %d is not between 1 and %d", ErrMalformed, count, MaxConsumeRefs)
	}
	if want := consumeHeaderSize + count*RefSize; len(payload) != want {
		return 0, nil, fmt.Errorf("%w: consume payload of %d refs must be %d bytes, got %d", ErrMalformed, count, want, len(payload))
	}
	refs = make([]Ref, count)
	seen := make(map[Ref]struct{}, count)
	for i := range refs {
		copy(refs[i][:], payload[consumeHeaderSize+i*RefSize:])
		if _, dup := seen[refs[i]]; dup {
			return 0, nil, fmt.Errorf("%w: consume payload names ref %s twice", ErrMalformed, refs[i])
		}
		seen[refs[i]] = struct{}{}
	}
	return timestampMS, refs, nil
}

// ValidateConsume applies the consume notice rules at time now: payload size
// (no signature work for an oversized notice), the device key is a point,
// strict signature by the device key, layout, timestamp window. Whether a
// named ref belongs to another device is the store's to say (RuleForeignRef).
func (p Policy) ValidateConsume(n *ConsumeNotice, now time.Time) (ConsumeInfo, error) {
	var info ConsumeInfo
	if len(n.Payload) > MaxConsumePayloadSize {
		return info, &ValidationError{Rule: RuleConsumeTooLarge, Field: "payload",
			Detail: fmt.Sprintf("%d bytes is larger than a consume notice of %d refs (%d bytes)", len(n.Payload), MaxConsumeRefs, MaxConsumePayloadSize)}
	}
	if err := verifyKeyAndSignature(n.DeviceID, "device_id", n.Payload, &n.Signature); err != nil {
		return info, err
	}
	ts, refs, err := DecodeConsumePayload(n.Payload)
	if err != nil {
		return info, &ValidationError{Rule: RuleConsumeLayout, Field: "payload", Detail: trimMalformed(err), Err: err}
	}
	if err := p.checkTimestamp(ts, now); err != nil {
		return info, err
	}
	return ConsumeInfo{TimestampMS: ts, Refs: refs, Hash: sha256.Sum256(n.Payload)}, nil
}

// ClaimNotice is a node's signed statement that it handed out one bundle of
// a device. NodeKey is the node's libp2p Ed25519 identity key (its peer ID
// is derived from it). The signed bytes are the wire bytes.
type ClaimNotice struct {
	NodeKey   Key
	Payload   []byte
	Signature [SignatureSize]byte
}

// ClaimInfo is what validation learns from a claim notice.
type ClaimInfo struct {
	TimestampMS uint64
	DeviceID    Key
	Ref         Ref
	// Hash is SHA-256(node_key ‖ payload): it orders competing claims of
	// one ref (with the timestamp) and names the notice in sync.
	Hash [32]byte
}

// ClaimPayload builds the payload a node signs.
func ClaimPayload(timestampMS uint64, device Key, ref Ref) []byte {
	p := make([]byte, 0, ClaimPayloadSize)
	p = append(p, ClaimDomain...)
	p = binary.LittleEndian.AppendUint64(p, timestampMS)
	p = append(p, device[:]...)
	return append(p, ref[:]...)
}

// SignClaim signs a claim notice with a node's Ed25519 identity key.
func SignClaim(node ed25519.PrivateKey, timestampMS uint64, device Key, ref Ref) ClaimNotice {
	n := ClaimNotice{Payload: ClaimPayload(timestampMS, device, ref)}
	copy(n.NodeKey[:], node.Public().(ed25519.PublicKey))
	copy(n.Signature[:], ed25519.Sign(node, n.Payload))
	return n
}

// DecodeClaimPayload checks a claim payload's layout and returns its fields.
// It does not verify the signature.
func DecodeClaimPayload(payload []byte) (timestampMS uint64, device Key, ref Ref, err error) {
	if len(payload) != ClaimPayloadSize || string(payload[:len(ClaimDomain)]) != ClaimDomain {
		return 0, device, ref, fmt.Errorf("%w: claim payload must be %q, a timestamp, a device_id and a ref (%d bytes)", ErrMalformed, "kpnode:claim:v1\\0", ClaimPayloadSize)
	}
	off := len(ClaimDomain)
	timestampMS = binary.LittleEndian.Uint64(payload[off:])
	copy(device[:], payload[off+8:])
	copy(ref[:], payload[off+8+KeySize:])
	return timestampMS, device, ref, nil
}

// ValidateClaim applies the claim notice rules at time now: exact payload
// length (no signature work otherwise), the node key is a point, strict
// signature by the node key, layout, timestamp window. Whether the ref is a
// bundle of the device is the store's to say.
func (p Policy) ValidateClaim(n *ClaimNotice, now time.Time) (ClaimInfo, error) {
	var info ClaimInfo
	if len(n.Payload) != ClaimPayloadSize {
		return info, &ValidationError{Rule: RuleClaimNoticeLength, Field: "payload",
			Detail: fmt.Sprintf("claim notice payload must be %d bytes, got %d", ClaimPayloadSize, len(n.Payload))}
	}
	if err := verifyKeyAndSignature(n.NodeKey, "node_key", n.Payload, &n.Signature); err != nil {
		return info, err
	}
	ts, dev, ref, err := DecodeClaimPayload(n.Payload)
	if err != nil {
		return info, &ValidationError{Rule: RuleClaimLayout, Field: "payload", Detail: trimMalformed(err), Err: err}
	}
	if err := p.checkTimestamp(ts, now); err != nil {
		return info, err
	}
	return ClaimInfo{TimestampMS: ts, DeviceID: dev, Ref: ref, Hash: ClaimHash(n)}, nil
}

// ClaimHash is SHA-256(node_key ‖ payload).
func ClaimHash(n *ClaimNotice) [32]byte {
	h := sha256.New()
	h.Write(n.NodeKey[:])
	h.Write(n.Payload)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// ClaimWins reports whether claim a wins over claim b for one ref: the
// earlier signed timestamp, at equal timestamps the smaller hash. Every node
// keeps the winner, so all converge on one claim per ref.
func ClaimWins(a, b ClaimInfo) bool {
	if a.TimestampMS != b.TimestampMS {
		return a.TimestampMS < b.TimestampMS
	}
	return string(a.Hash[:]) < string(b.Hash[:])
}

// trimMalformed drops the ErrMalformed prefix from a layout error's text,
// which is meant for a client developer.
func trimMalformed(err error) string {
	s := err.Error()
	if p := ErrMalformed.Error() + ": "; len(s) > len(p) && s[:len(p)] == p {
		return s[len(p):]
	}
	return s
}

// ClaimItem is the sync item hash of a stored claim notice:
// SHA-256("claim" ‖ device_id ‖ ref ‖ timestamp_ms u64 BE ‖ ClaimHash).
func ClaimItem(info ClaimInfo) [32]byte {
	var buf [5 + KeySize + RefSize + 8 + 32]byte
	copy(buf[:], "claim")
	copy(buf[5:], info.DeviceID[:])
	copy(buf[5+KeySize:], info.Ref[:])
	binary.BigEndian.PutUint64(buf[5+KeySize+RefSize:], info.TimestampMS)
	copy(buf[5+KeySize+RefSize+8:], info.Hash[:])
	return sha256.Sum256(buf[:])
}

// ConsumeItem is the sync item hash of a stored consume notice:
// SHA-256("consume" ‖ device_id ‖ SHA-256(payload)).
func ConsumeItem(device Key, info ConsumeInfo) [32]byte {
	var buf [7 + KeySize + 32]byte
	copy(buf[:], "consume")
	copy(buf[7:], device[:])
	copy(buf[7+KeySize:], info.Hash[:])
	return sha256.Sum256(buf[:])
}

// KeyPackageCipherSuite reads the cipher suite from the header of a
// key_package (bare, or MLSMessage-wrapped: version, wire_format
// mls_key_package (5), then the KeyPackage). ok is false when the bytes are
// too short or the version is not mls10, as with an opaque key_package.
//
// A bare KeyPackage of suite 5 starts with the same four bytes as the
// wrapper (00 01 00 05); it is read as wrapped only when an mls10 version
// follows, which a bare one (its init_key's length next) never has.
func KeyPackageCipherSuite(kp []byte) (suite uint16, ok bool) {
	const mls10, wireKeyPackage = 1, 5
	if len(kp) >= 6 && binary.BigEndian.Uint16(kp) == mls10 && binary.BigEndian.Uint16(kp[2:]) == wireKeyPackage &&
		binary.BigEndian.Uint16(kp[4:]) == mls10 {
		kp = kp[4:]
	}
	if len(kp) < 4 || binary.BigEndian.Uint16(kp) != mls10 {
		return 0, false
	}
	return binary.BigEndian.Uint16(kp[2:]), true
}
