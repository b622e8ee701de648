package mls

import (
	"bytes"
	"time"
)

// Policy defaults.
const (
	// DefaultClockSkew is the tolerance applied to both ends of a lifetime.
	DefaultClockSkew = 5 * time.Minute
	// DefaultMaxLifetime is the longest accepted not_after - not_before.
	DefaultMaxLifetime = 90 * 24 * time.Hour
)

// Policy holds the clock and limits Validate applies.
type Policy struct {
	// Now is the current time. It must be set; Validate panics if it is
	// the zero Time. The package never reads the system clock.
	Now time.Time
	// ClockSkew is the tolerance on both ends of the lifetime. Zero means
	// DefaultClockSkew; a negative value means no tolerance.
	ClockSkew time.Duration
	// MaxLifetime is the longest accepted lifetime span. Zero means
	// DefaultMaxLifetime; a negative value disables the check (useful for
	// test vectors with a 0 .. 2^64-1 lifetime, never for the registry).
	MaxLifetime time.Duration
}

// Info is what the registry needs from a valid KeyPackage.
type Info struct {
	// Ref is the KeyPackageRef, computed over the bare KeyPackage.
	Ref [32]byte
	// CipherSuite is the KeyPackage's cipher suite.
	CipherSuite uint16
	// LastResort reports whether KeyPackage.extensions holds a
	// last_resort_key_package extension (0x000A).
	LastResort bool
	// NotBefore and NotAfter are the lifetime, in UTC, clamped to
	// [1970-01-01T00:00:00Z, 9999-12-31T23:59:59Z].
	NotBefore, NotAfter time.Time
	// Wrapped reports whether the input was an MLSMessage.
	Wrapped bool
}

// Validate parses data with Parse and checks the result with
// (*KeyPackage).Validate. deviceKey is the Ed25519 key the surrounding
// bundle is signed with; leaf_node.signature_key must equal it.
//
// Every error is an *Error; see the package comment for the order in which
// rules are applied.
func Validate(data, deviceKey []byte, p Policy) (Info, error) {
	kp, err := Parse(data)
	if err != nil {
		return Info{}, err
	}
	return kp.Validate(deviceKey, p)
}

// Validate applies every rule after parsing, in the order given in the
// package comment, and stops at the first that fails. It panics if p.Now is
// the zero Time.
func (kp *KeyPackage) Validate(deviceKey []byte, p Policy) (Info, error) {
	if p.Now.IsZero() {
		panic("mls: Policy.Now is not set")
	}
	ln := &kp.LeafNode

	// Version, and the MLSMessage header if there is one.
	if kp.Version != VersionMLS10 {
		return Info{}, newError(RuleVersion, "KeyPackage version is %d; only 1 (mls10) is supported", kp.Version)
	}
	if kp.Wrapped {
		if kp.WrapperVersion != kp.Version {
			return Info{}, newError(RuleVersion,
				"MLSMessage version %d differs from KeyPackage version %d", kp.WrapperVersion, kp.Version)
		}
		if kp.WireFormat != WireFormatKeyPackage {
			return Info{}, newError(RuleVersion,
				"MLSMessage wire_format is %d; a KeyPackage needs 5 (mls_key_package)", kp.WireFormat)
		}
	}

	// Cipher suite allow-list.
	keySize, ok := HPKEKeySize(kp.CipherSuite)
	if !ok {
		return Info{}, suiteError(kp.CipherSuite)
	}

	// Key sizes.
	if len(ln.SignatureKey) != SignatureKeySize {
		return Info{}, newError(RuleKeySize,
			"leaf_node.signature_key is %d bytes; Ed25519 keys are %d", len(ln.SignatureKey), SignatureKeySize)
	}
	if len(kp.InitKey) != keySize {
		return Info{}, newError(RuleKeySize,
			"init_key is %d bytes; cipher suite 0x%04X needs %d", len(kp.InitKey), kp.CipherSuite, keySize)
	}
	if len(ln.EncryptionKey) != keySize {
		return Info{}, newError(RuleKeySize,
			"leaf_node.encryption_key is %d bytes; cipher suite 0x%04X needs %d",
			len(ln.EncryptionKey), kp.CipherSuite, keySize)
	}

	// Leaf source.
	if ln.Source != SourceKeyPackage {
		return Info{}, newError(RuleLeafSource,
			"leaf_node_source is %d; a KeyPackage needs 1 (key_package)", ln.Source)
	}

	// The leaf is signed by the device key.
	if len(deviceKey) == 0 {
		return Info{}, newError(RuleSignatureKey, "no device key given to check leaf_node.signature_key against")
	}
	if !bytes.Equal(ln.SignatureKey, deviceKey) {
		return Info{}, newError(RuleSignatureKey,
			"leaf_node.signature_key %x is not the device key %x", ln.SignatureKey, deviceKey)
	}

	// Signatures, both under leaf_node.signature_key.
	if err := verify(ln.SignatureKey, LabelLeafNodeTBS, ln.TBS, ln.Signature); err != nil {
		return Info{}, signatureError(RuleLeafSignature, "leaf_node.signature", err)
	}
	if err := verify(ln.SignatureKey, LabelKeyPackageTBS, kp.TBS, kp.Signature); err != nil {
		return Info{}, signatureError(RuleKeyPackageSignature, "KeyPackage.signature", err)
	}

	// init_key != encryption_key.
	if bytes.Equal(kp.InitKey, ln.EncryptionKey) {
		return Info{}, newError(RuleInitKeyReuse, "init_key equals leaf_node.encryption_key; they must differ")
	}

	// Lifetime.
	if err := checkLifetime(ln.Lifetime, p); err != nil {
		return Info{}, err
	}

	// Credential.
	if err := checkCredential(&ln.Credential, ln.SignatureKey); err != nil {
		return Info{}, err
	}

	// Extensions are supported by the leaf's capabilities.
	if err := checkExtensions(kp); err != nil {
		return Info{}, err
	}

	return Info{
		Ref:         Ref(kp.Raw),
		CipherSuite: kp.CipherSuite,
		LastResort:  kp.LastResort(),
		NotBefore:   unixTime(ln.Lifetime.NotBefore),
		NotAfter:    unixTime(ln.Lifetime.NotAfter),
		Wrapped:     kp.Wrapped,
	}, nil
}

// LastResort reports whether KeyPackage.extensions holds a
// last_resort_key_package extension (0x000A). Its data is not examined.
func (kp *KeyPackage) LastResort() bool {
	for _, e := range kp.Extensions {
		if e.Type == ExtensionLastResort {
			return true
		}
	}
	return false
}

func checkExtensions(kp *KeyPackage) *Error {
	caps := kp.LeafNode.Capabilities.Extensions
	for _, list := range []struct {
		name string
		exts []Extension
	}{
		{"leaf_node.extensions", kp.LeafNode.Extensions},
		{"KeyPackage.extensions", kp.Extensions},
	} {
		for _, e := range list.exts {
			if !extensionSupported(e.Type, caps) {
				return newError(RuleUnsupportedExtension,
					"%s has extension type 0x%04X, which is not listed in leaf_node.capabilities.extensions", list.name, e.Type)
			}
		}
	}
	return nil
}

// extensionSupported reports whether an extension of type t may appear: it
// is a default type (RFC 9420 §7.2: 0x0001–0x0005, never listed), a GREASE
// value, or listed in caps.
func extensionSupported(t uint16, caps []uint16) bool {
	if t >= 0x0001 && t <= 0x0005 || isGREASE(t) {
		return true
	}
	for _, c := range caps {
		if c == t {
			return true
		}
	}
	return false
}
