// Package mlstest generates valid, correctly signed RFC 9420 KeyPackages
// for tests, shaped like the chat client's (OpenMLS 0.8), and builds
// KeyPackages that are valid except for one chosen thing.
//
// It does not import package mls: its encoder is written separately, so an
// encoding bug in one is not hidden by the same bug in the other.
package mlstest

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/mlkem"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"
)

// Code points used by the generator.
const (
	SuiteX25519AES128   uint16 = 0x0001
	SuiteX25519ChaCha20 uint16 = 0x0003
	SuiteXWing          uint16 = 0x004D

	ExtensionApplicationID uint16 = 0x0001
	ExtensionLastResort    uint16 = 0x000A
	// ExtensionGroupMetadata is the chat client's private group-metadata
	// extension.
	ExtensionGroupMetadata uint16 = 0xFF01

	CredentialBasic uint16 = 1
	CredentialX509  uint16 = 2

	SourceKeyPackage uint8 = 1
	SourceUpdate     uint8 = 2
	SourceCommit     uint8 = 3
)

// Default lifetime, as OpenMLS sets it: from an hour ago for 84 days.
const (
	DefaultBackdate = time.Hour
	DefaultValidity = 84 * 24 * time.Hour
)

// Options select what Generate and NewBuilder produce. The zero value gives
// a chat-client-like bare 0x004D KeyPackage without last_resort.
type Options struct {
	// Suite is 0x0001, 0x0003 or 0x004D; zero means 0x004D.
	Suite uint16
	// Signer is the Ed25519 key of leaf_node.signature_key, which signs
	// both signatures; nil means a fresh key.
	Signer ed25519.PrivateKey
	// LastResort adds the last_resort extension (0x000A, empty) to
	// KeyPackage.extensions.
	LastResort bool
	// NotBefore and NotAfter are the lifetime; a zero NotBefore means
	// Now-1h and a zero NotAfter means Now+84 days.
	NotBefore, NotAfter time.Time
	// Now anchors the default lifetime; zero means time.Now().
	Now time.Time
	// Wrapped prefixes the MLSMessage header 00 01 00 05.
	Wrapped bool
	// Identity is the basic credential identity; nil means a 204-byte
	// identity like the chat client's (the lowercase hex of
	// 23 23 | 01 20 <signature key> | 02 40 <64 ASCII hex chars>).
	Identity []byte
}

// Generate returns a valid, correctly signed KeyPackage (bare unless
// o.Wrapped) and the key that signed it.
func Generate(o Options) ([]byte, ed25519.PrivateKey, error) {
	b, err := NewBuilder(o)
	if err != nil {
		return nil, nil, err
	}
	kp, err := b.Encode()
	if err != nil {
		return nil, nil, err
	}
	return kp, b.Signer, nil
}

// NewBuilder returns a Builder filled in as o says, with fresh HPKE keys:
// X25519 keys (crypto/ecdh) for suites 0x0001 and 0x0003, X-Wing keys
// (ML-KEM-768 encapsulation key ‖ X25519 key, 1216 bytes) for 0x004D.
// Encoding it without changes gives a valid KeyPackage.
func NewBuilder(o Options) (*Builder, error) {
	suite := o.Suite
	if suite == 0 {
		suite = SuiteXWing
	}
	signer := o.Signer
	if signer == nil {
		var err error
		if _, signer, err = ed25519.GenerateKey(rand.Reader); err != nil {
			return nil, fmt.Errorf("mlstest: generating signature key: %w", err)
		}
	}
	if len(signer) != ed25519.PrivateKeySize {
		return nil, errors.New("mlstest: Signer is not an Ed25519 private key")
	}
	pub := signer.Public().(ed25519.PublicKey)

	initKey, err := HPKEPublicKey(suite)
	if err != nil {
		return nil, err
	}
	encKey, err := HPKEPublicKey(suite)
	if err != nil {
		return nil, err
	}

	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	nb, na := o.NotBefore, o.NotAfter
	if nb.IsZero() {
		nb = now.Add(-DefaultBackdate)
	}
	if na.IsZero() {
		na = now.Add(DefaultValidity)
	}

	identity := o.Identity
	if identity == nil {
		if identity, err = chatIdentity(pub); err != nil {
			return nil, err
		}
	}

	b := &Builder{
		Version:         1,
		CipherSuite:     suite,
		InitKey:         initKey,
		EncryptionKey:   encKey,
		SignatureKey:    append([]byte(nil), pub...),
		CredentialType:  CredentialBasic,
		Identity:        identity,
		Versions:        []uint16{1},
		CipherSuites:    []uint16{suite},
		ExtensionTypes:  []uint16{ExtensionApplicationID, ExtensionLastResort, ExtensionGroupMetadata},
		ProposalTypes:   []uint16{},
		CredentialTypes: []uint16{CredentialBasic},
		Source:          SourceKeyPackage,
		NotBefore:       unixSeconds(nb),
		NotAfter:        unixSeconds(na),
		Signer:          signer,
		Wrapped:         o.Wrapped,
		WrapperVersion:  1,
		WireFormat:      5,
	}
	if o.LastResort {
		b.Extensions = []Extension{{Type: ExtensionLastResort, Data: []byte{}}}
	}
	return b, nil
}

// HPKEPublicKey returns a fresh HPKE public key for suite: 32 bytes of
// X25519 for 0x0001 and 0x0003, 1216 bytes of X-Wing for 0x004D.
func HPKEPublicKey(suite uint16) ([]byte, error) {
	x, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("mlstest: generating X25519 key: %w", err)
	}
	switch suite {
	case SuiteX25519AES128, SuiteX25519ChaCha20:
		return x.PublicKey().Bytes(), nil
	case SuiteXWing:
		// draft-connolly-cfrg-xwing-kem: pk = pk_M ‖ pk_X.
		m, err := mlkem.GenerateKey768()
		if err != nil {
			return nil, fmt.Errorf("mlstest: generating ML-KEM-768 key: %w", err)
		}
		return append(m.EncapsulationKey().Bytes(), x.PublicKey().Bytes()...), nil
	}
	return nil, fmt.Errorf("mlstest: cipher suite 0x%04x is not supported", suite)
}

// chatIdentity builds a 204-byte identity shaped like the chat client's:
// the lowercase hex of the delegate-credential TLV
// 23 23 | 01 20 <device key> | 02 40 <account address as 64 hex chars>.
func chatIdentity(pub ed25519.PublicKey) ([]byte, error) {
	var account [32]byte
	if _, err := rand.Read(account[:]); err != nil {
		return nil, err
	}
	tlv := []byte{0x23, 0x23, 0x01, 0x20}
	tlv = append(tlv, pub...)
	tlv = append(tlv, 0x02, 0x40)
	tlv = hex.AppendEncode(tlv, account[:])
	return hex.AppendEncode(nil, tlv), nil
}

// unixSeconds converts t to Unix seconds, clamping times before 1970 to 0.
func unixSeconds(t time.Time) uint64 {
	return uint64(max(t.Unix(), 0))
}
