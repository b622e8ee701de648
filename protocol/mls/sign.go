package mls

import (
	"crypto/sha256"
	"errors"

	"github.com/kpnode/kpnode/protocol/ed25519strict"
)

// Labels for SignContent.
const (
	LabelKeyPackageTBS = "KeyPackageTBS"
	LabelLeafNodeTBS   = "LeafNodeTBS"
)

// labelPrefix is prepended to every SignWithLabel and RefHash label.
const labelPrefix = "MLS 1.0 "

// refLabel is the KeyPackageRef RefHash label.
const refLabel = labelPrefix + "KeyPackage Reference"

// SignContent returns the RFC 9420 §5.1.2 SignContent for SignWithLabel:
// opaque label<V> ‖ opaque content<V>, where the label is "MLS 1.0 " followed
// by label (for example LabelKeyPackageTBS). content must be shorter than
// 2^30 bytes.
func SignContent(label string, content []byte) []byte {
	n := len(labelPrefix) + len(label)
	b := make([]byte, 0, 1+n+4+len(content))
	b = appendVarint(b, n)
	b = append(b, labelPrefix...)
	b = append(b, label...)
	return appendOpaque(b, content)
}

// Ref computes the KeyPackageRef of a bare encoded KeyPackage:
// SHA-256(opaque "MLS 1.0 KeyPackage Reference"<V> ‖ opaque KeyPackage<V>).
// It does not parse its input. It is correct only for suites that hash with
// SHA-256, which are all the suites Validate accepts. The KeyPackage must be
// shorter than 2^30 bytes.
func Ref(bareKeyPackage []byte) [32]byte {
	var hdr [1 + len(refLabel) + 4]byte
	b := appendVarint(hdr[:0], len(refLabel))
	b = append(b, refLabel...)
	b = appendVarint(b, len(bareKeyPackage))
	h := sha256.New()
	h.Write(b)
	h.Write(bareKeyPackage)
	var ref [32]byte
	h.Sum(ref[:0])
	return ref
}

func verify(pub []byte, label string, tbs, sig []byte) error {
	return ed25519strict.Verify(pub, SignContent(label, tbs), sig)
}

func signatureError(r Rule, field string, err error) *Error {
	switch {
	case errors.Is(err, ed25519strict.ErrSignatureSize):
		return wrapError(r, err, "%s is not 64 bytes, the size of an Ed25519 signature", field)
	case errors.Is(err, ed25519strict.ErrNotPoint):
		return wrapError(r, err, "leaf_node.signature_key is not a valid Ed25519 point, so %s cannot verify", field)
	default:
		return wrapError(r, err, "%s does not verify under leaf_node.signature_key (%v)", field, err)
	}
}
