package mls

import "fmt"

// A Rule names the validation rule a KeyPackage broke. Its value is a stable
// snake_case string, suitable as a Prometheus label value and for HTTP error
// bodies.
//
// Rule implements error, so errors.Is(err, RuleExpired) reports whether err
// is an *Error for that rule.
type Rule string

// The rules, in the order Validate applies them (see the package comment).
const (
	// RuleMalformed: truncated input, a varint with the reserved 0b11
	// prefix, a vector whose elements do not fill it exactly, an odd-length
	// uint16 list or an unknown credential type.
	RuleMalformed Rule = "malformed"
	// RuleNonMinimalLength: a vector length encoded in more bytes than
	// needed (RFC 9420 §2.1.2).
	RuleNonMinimalLength Rule = "non_minimal_length"
	// RuleTrailingBytes: bytes left over after the KeyPackage.
	RuleTrailingBytes Rule = "trailing_bytes"
	// RuleVersion: the KeyPackage version is not mls10, or an MLSMessage
	// wrapper has another version or a wire_format other than
	// mls_key_package (5).
	RuleVersion Rule = "version"
	// RuleCipherSuite: the cipher suite is not one of the allowed suites,
	// all of which sign with Ed25519: 0x0001, 0x0003 and 0x004D.
	RuleCipherSuite Rule = "cipher_suite"
	// RuleKeySize: signature_key is not 32 bytes, or init_key or
	// encryption_key does not have the suite's HPKE public key length.
	RuleKeySize Rule = "key_size"
	// RuleLeafSource: leaf_node_source is not key_package (1).
	RuleLeafSource Rule = "leaf_source"
	// RuleSignatureKey: leaf_node.signature_key is not the device key.
	RuleSignatureKey Rule = "signature_key"
	// RuleLeafSignature: the LeafNodeTBS signature does not verify under
	// leaf_node.signature_key.
	RuleLeafSignature Rule = "leaf_signature"
	// RuleKeyPackageSignature: the KeyPackageTBS signature does not verify
	// under leaf_node.signature_key.
	RuleKeyPackageSignature Rule = "keypackage_signature"
	// RuleInitKeyReuse: init_key equals leaf_node.encryption_key.
	RuleInitKeyReuse Rule = "init_key_equals_encryption_key"
	// RuleNotYetValid: the lifetime starts after now plus the clock skew.
	RuleNotYetValid Rule = "lifetime_not_yet_valid"
	// RuleExpired: the lifetime ended before now minus the clock skew.
	RuleExpired Rule = "lifetime_expired"
	// RuleLifetimeTooLong: not_after - not_before exceeds the policy's
	// maximum lifetime.
	RuleLifetimeTooLong Rule = "lifetime_too_long"
	// RuleCredential: the credential is unusable: an x509 credential with
	// an empty chain, an end-entity certificate that does not parse, or
	// whose public key is not leaf_node.signature_key.
	RuleCredential Rule = "credential"
	// RuleUnsupportedExtension: an extension in KeyPackage.extensions or
	// leaf_node.extensions is neither a default type (0x0001–0x0005) nor
	// GREASE, and is not listed in leaf_node.capabilities.extensions
	// (RFC 9420 §7.3, §10).
	RuleUnsupportedExtension Rule = "unsupported_extension"
)

// Rules lists every rule, in the order Validate applies them. Parse can
// report only the first three (and RuleLeafSource, for a leaf_node_source
// it cannot parse past).
func Rules() []Rule {
	return []Rule{
		RuleMalformed, RuleNonMinimalLength, RuleTrailingBytes,
		RuleVersion, RuleCipherSuite, RuleKeySize, RuleLeafSource,
		RuleSignatureKey, RuleLeafSignature, RuleKeyPackageSignature,
		RuleInitKeyReuse, RuleNotYetValid, RuleExpired, RuleLifetimeTooLong,
		RuleCredential, RuleUnsupportedExtension,
	}
}

// Error returns the rule name, so that fmt prints a Rule as its name.
func (r Rule) Error() string { return string(r) }

// Error is the error type Parse and Validate return. Use errors.As to get
// the Rule.
type Error struct {
	// Rule is the rule that failed.
	Rule Rule
	// Detail says what was wrong, for a client developer, e.g.
	// "lifetime ended 2023-05-31T13:48:36Z, before now (2026-05-01T00:00:00Z) minus 5m0s clock skew".
	Detail string
	// Err is the underlying cause, if any (for example
	// ed25519strict.ErrVerify or an x509 parse error).
	Err error

	offset int // how far Parse got; used to choose between two attempts
}

// Error returns "mls: <rule>: <detail>".
func (e *Error) Error() string {
	return "mls: " + string(e.Rule) + ": " + e.Detail
}

// Unwrap returns the Rule and, if set, the underlying cause.
func (e *Error) Unwrap() []error {
	if e.Err == nil {
		return []error{e.Rule}
	}
	return []error{e.Rule, e.Err}
}

// Is reports whether target is an *Error with the same Rule; Detail and Err
// are not compared. Together with Unwrap it makes both
// errors.Is(err, &Error{Rule: RuleExpired}) and errors.Is(err, RuleExpired)
// work.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t != nil && t.Rule == e.Rule
}

func newError(r Rule, format string, args ...any) *Error {
	return &Error{Rule: r, Detail: fmt.Sprintf(format, args...)}
}

func wrapError(r Rule, err error, format string, args ...any) *Error {
	return &Error{Rule: r, Detail: fmt.Sprintf(format, args...), Err: err}
}
