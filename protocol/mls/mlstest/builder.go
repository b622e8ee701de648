package mlstest

import (
	"crypto/ed25519"
	"errors"
)

// An Extension is one entry of an extension list.
type Extension struct {
	Type uint16
	Data []byte
}

// A Builder holds every field of a KeyPackage. Encode serialises and signs
// it, so a test can change one field of a valid Builder (from NewBuilder)
// and get a KeyPackage that is valid except for that field.
type Builder struct {
	Version     uint16
	CipherSuite uint16
	InitKey     []byte

	// LeafNode fields.
	EncryptionKey []byte
	SignatureKey  []byte
	// CredentialType selects Identity (basic, 1) or Certificates (x509, 2);
	// any other type is encoded as the bare type with nothing after it.
	CredentialType uint16
	Identity       []byte
	Certificates   [][]byte
	// Capabilities.
	Versions, CipherSuites, ExtensionTypes, ProposalTypes, CredentialTypes []uint16
	// Source selects what follows it: the lifetime (1), nothing (2) or
	// ParentHash (3); any other value is encoded with nothing after it.
	Source              uint8
	NotBefore, NotAfter uint64
	ParentHash          []byte
	LeafExtensions      []Extension

	// KeyPackage.extensions.
	Extensions []Extension

	// Signer signs both signatures.
	Signer ed25519.PrivateKey

	// Wrapped prefixes the MLSMessage header WrapperVersion ‖ WireFormat.
	Wrapped        bool
	WrapperVersion uint16
	WireFormat     uint16

	// TamperLeafSignature, if set, is called with the LeafNode signature
	// before it is encoded; it may change it in place or return another.
	// The KeyPackage signature then signs the tampered LeafNode.
	TamperLeafSignature func(sig []byte) []byte
	// TamperKeyPackageSignature, if set, does the same for the KeyPackage
	// signature.
	TamperKeyPackageSignature func(sig []byte) []byte
}

// Encode serialises the KeyPackage, computing the LeafNode signature over
// the LeafNodeTBS and the KeyPackage signature over the KeyPackageTBS, both
// with SignWithLabel under b.Signer (regardless of SignatureKey).
func (b *Builder) Encode() ([]byte, error) {
	if len(b.Signer) != ed25519.PrivateKeySize {
		return nil, errors.New("mlstest: Builder.Signer is not an Ed25519 private key")
	}

	// LeafNodeTBS for source key_package: encryption_key .. extensions.
	var leaf []byte
	leaf = appendOpaque(leaf, b.EncryptionKey)
	leaf = appendOpaque(leaf, b.SignatureKey)
	leaf = appendUint16(leaf, b.CredentialType)
	switch b.CredentialType {
	case CredentialBasic:
		leaf = appendOpaque(leaf, b.Identity)
	case CredentialX509:
		var chain []byte
		for _, c := range b.Certificates {
			chain = appendOpaque(chain, c)
		}
		leaf = appendOpaque(leaf, chain)
	}
	for _, l := range [][]uint16{b.Versions, b.CipherSuites, b.ExtensionTypes, b.ProposalTypes, b.CredentialTypes} {
		leaf = appendUint16List(leaf, l)
	}
	leaf = append(leaf, b.Source)
	switch b.Source {
	case SourceKeyPackage:
		leaf = appendUint64(leaf, b.NotBefore)
		leaf = appendUint64(leaf, b.NotAfter)
	case SourceCommit:
		leaf = appendOpaque(leaf, b.ParentHash)
	}
	leaf = appendExtensions(leaf, b.LeafExtensions)
	sig := b.sign("MLS 1.0 LeafNodeTBS", leaf)
	if b.TamperLeafSignature != nil {
		sig = b.TamperLeafSignature(sig)
	}
	leaf = appendOpaque(leaf, sig)

	// KeyPackageTBS: version .. extensions.
	var kp []byte
	if b.Wrapped {
		kp = appendUint16(kp, b.WrapperVersion)
		kp = appendUint16(kp, b.WireFormat)
	}
	start := len(kp)
	kp = appendUint16(kp, b.Version)
	kp = appendUint16(kp, b.CipherSuite)
	kp = appendOpaque(kp, b.InitKey)
	kp = append(kp, leaf...)
	kp = appendExtensions(kp, b.Extensions)
	sig = b.sign("MLS 1.0 KeyPackageTBS", kp[start:])
	if b.TamperKeyPackageSignature != nil {
		sig = b.TamperKeyPackageSignature(sig)
	}
	return appendOpaque(kp, sig), nil
}

// sign returns SignWithLabel: Ed25519 over opaque label<V> ‖ opaque content<V>.
func (b *Builder) sign(label string, content []byte) []byte {
	msg := appendOpaque(nil, []byte(label))
	msg = appendOpaque(msg, content)
	return ed25519.Sign(b.Signer, msg)
}

// AppendVarint appends the minimal RFC 9420 variable-length encoding of n
// (at most 2^30-1) to b.
func AppendVarint(b []byte, n int) []byte {
	switch {
	case n < 1<<6:
		return append(b, byte(n))
	case n < 1<<14:
		return append(b, 0x40|byte(n>>8), byte(n))
	case n < 1<<30:
		return append(b, 0x80|byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	panic("mlstest: vector longer than 2^30-1 bytes")
}

func appendOpaque(b, v []byte) []byte {
	return append(AppendVarint(b, len(v)), v...)
}

func appendUint16(b []byte, v uint16) []byte {
	return append(b, byte(v>>8), byte(v))
}

func appendUint64(b []byte, v uint64) []byte {
	return append(b, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32),
		byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

func appendUint16List(b []byte, l []uint16) []byte {
	b = AppendVarint(b, 2*len(l))
	for _, v := range l {
		b = appendUint16(b, v)
	}
	return b
}

func appendExtensions(b []byte, exts []Extension) []byte {
	var body []byte
	for _, e := range exts {
		body = appendUint16(body, e.Type)
		body = appendOpaque(body, e.Data)
	}
	return appendOpaque(b, body)
}
