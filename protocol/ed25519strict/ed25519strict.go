// Package ed25519strict verifies Ed25519 signatures with the same verdicts as
// ed25519-dalek's verify_strict, which chat-store and the chat client use.
//
// Go's crypto/ed25519.Verify already rejects a non-canonical S and compares
// against the signature's R bytes (so a non-canonical R fails), but it accepts
// a small-order public key A or a small-order R. Such signatures verify for
// many messages at once and must not be accepted by any node, or nodes would
// disagree about which bundles are valid. This package adds those two checks.
//
// Point decoding follows dalek (and filippo.io/edwards25519): an unreduced
// y coordinate and a "negative zero" x are accepted as encodings of a point.
package ed25519strict

import (
	"crypto/ed25519"
	"errors"
	"fmt"

	"filippo.io/edwards25519"
)

// Sizes of the encodings this package checks.
const (
	PublicKeySize = ed25519.PublicKeySize
	SignatureSize = ed25519.SignatureSize
)

// Sentinel errors. Every failed verification wraps exactly one of them, so
// callers can tell a malformed input from a signature that does not verify.
var (
	// ErrKeySize: the public key is not 32 bytes.
	ErrKeySize = errors.New("ed25519: public key must be 32 bytes")
	// ErrNotPoint: the public key does not decode to a curve point.
	ErrNotPoint = errors.New("ed25519: public key is not a valid point")
	// ErrSignatureSize: the signature is not 64 bytes.
	ErrSignatureSize = errors.New("ed25519: signature must be 64 bytes")
	// ErrVerify: the signature does not verify under strict rules (small-order
	// A or R, R not a point, non-canonical S or R, or a plain mismatch).
	ErrVerify = errors.New("ed25519: signature verification failed")
)

// DecodePoint reports whether pub is a 32-byte encoding of a curve point.
// It does not reject small-order points; Verify does.
func DecodePoint(pub []byte) (*edwards25519.Point, error) {
	if len(pub) != PublicKeySize {
		return nil, ErrKeySize
	}
	p, err := new(edwards25519.Point).SetBytes(pub)
	if err != nil {
		return nil, ErrNotPoint
	}
	return p, nil
}

// IsSmallOrder reports whether p lies in the torsion subgroup of order 8.
func IsSmallOrder(p *edwards25519.Point) bool {
	return new(edwards25519.Point).MultByCofactor(p).Equal(edwards25519.NewIdentityPoint()) == 1
}

// Verify checks sig over msg under pub with ed25519-dalek verify_strict
// semantics. It returns nil on success and an error wrapping one of the
// sentinel errors otherwise.
func Verify(pub, msg, sig []byte) error {
	a, err := DecodePoint(pub)
	if err != nil {
		return err
	}
	if len(sig) != SignatureSize {
		return ErrSignatureSize
	}
	if IsSmallOrder(a) {
		return fmt.Errorf("%w: small-order public key", ErrVerify)
	}
	r, err := new(edwards25519.Point).SetBytes(sig[:32])
	if err != nil {
		return fmt.Errorf("%w: R is not a point", ErrVerify)
	}
	if IsSmallOrder(r) {
		return fmt.Errorf("%w: small-order R", ErrVerify)
	}
	// crypto/ed25519 rejects S >= L and recomputes R canonically, comparing
	// bytes, which matches dalek's final check.
	if !ed25519.Verify(ed25519.PublicKey(pub), msg, sig) {
		return ErrVerify
	}
	return nil
}
