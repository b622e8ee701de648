package protocol

import (
	"errors"
	"fmt"
	"time"

	"github.com/kpnode/kpnode/protocol/ed25519strict"
)

// Rule names the validation rule a bundle broke. Rules are stable snake_case
// strings: metrics label rejections with them and logs print them.
type Rule string

// The rules, in the order Policy applies them.
const (
	RuleKeyNotPoint      Rule = "key_not_point"     // device_id/account_pub is not an Ed25519 point
	RuleSignature        Rule = "signature"         // strict Ed25519 verification failed (small-order keys included)
	RulePayloadTooShort  Rule = "payload_too_short" // bundle payload under 8 bytes
	RuleTimestampFuture  Rule = "timestamp_future"  // signed timestamp beyond now + clock skew
	RuleTimestampExpired Rule = "timestamp_expired" // signed timestamp older than the retention
	RuleAccountHeader    Rule = "account_header"    // account payload lacks domain, version or lamport
	RulePayloadTooLarge  Rule = "payload_too_large" // payload over MaxPayloadSize (checked first, before any signature work)
	RuleMLS              Rule = "mls"               // prefix of the MLS KeyPackage rules (mls_<rule>)
)

// ValidationError reports why a bundle or account bundle was refused. Its
// Error text is "<field>: <detail>", the message the HTTP API returns, e.g.
// "signature: verification failed".
type ValidationError struct {
	Rule   Rule   // which rule failed
	Field  string // the JSON field at fault: device_id, account_pub, payload, signature, key_package
	Detail string // what is wrong, for a client developer
	Err    error  // the underlying cause, if any
}

func (e *ValidationError) Error() string { return e.Field + ": " + e.Detail }

func (e *ValidationError) Unwrap() error { return e.Err }

// Transient reports whether the failure may be the observer's fault or
// merely stale rather than proof of a malformed or forged message: a
// timestamp or lifetime outside this node's clock window. Gossip maps
// transient failures to Ignore and all others to Reject.
func (e *ValidationError) Transient() bool {
	switch e.Rule {
	case RuleTimestampFuture, RuleTimestampExpired, RuleMLS + "_lifetime_not_yet_valid", RuleMLS + "_lifetime_expired":
		return true
	case RuleConsumeForeignRef:
		// The observer's state decides it: a node that does not hold the
		// other device's bundle accepts the notice, so a forwarder that
		// accepted it is not at fault.
		return true
	}
	return false
}

// RuleOf returns the rule of a validation error, or "" for other errors.
func RuleOf(err error) Rule {
	var ve *ValidationError
	if errors.As(err, &ve) {
		return ve.Rule
	}
	return ""
}

// MLSMode selects how deeply key_package is checked.
type MLSMode string

// The MLS validation modes.
const (
	MLSStrict MLSMode = "strict" // parse and validate the KeyPackage (RFC 9420)
	MLSOff    MLSMode = "off"    // key_package is opaque, as in chat-store
)

// Policy holds the limits of validation. The zero value is not valid; use
// DefaultPolicy and override fields.
type Policy struct {
	// Retention is how old a signed timestamp may be.
	Retention time.Duration
	// ClockSkew is how far in the future a signed timestamp or a KeyPackage
	// lifetime start may lie, and how far in the past a lifetime end.
	ClockSkew time.Duration
	// MLS selects KeyPackage validation.
	MLS MLSMode
	// MaxKeyPackageLifetime caps not_after − not_before of a KeyPackage.
	MaxKeyPackageLifetime time.Duration
}

// Defaults of Policy.
const (
	DefaultRetention             = 30 * 24 * time.Hour
	DefaultClockSkew             = 5 * time.Minute
	DefaultMaxKeyPackageLifetime = 90 * 24 * time.Hour
)

// DefaultPolicy returns the network's default policy.
func DefaultPolicy() Policy {
	return Policy{
		Retention:             DefaultRetention,
		ClockSkew:             DefaultClockSkew,
		MLS:                   MLSStrict,
		MaxKeyPackageLifetime: DefaultMaxKeyPackageLifetime,
	}
}

// Validate reports whether the policy's values are usable.
func (p Policy) Validate() error {
	if p.Retention <= 0 {
		return fmt.Errorf("retention must be positive, got %v", p.Retention)
	}
	if p.ClockSkew < 0 {
		return fmt.Errorf("clock skew must not be negative, got %v", p.ClockSkew)
	}
	if p.MLS != MLSStrict && p.MLS != MLSOff {
		return fmt.Errorf("mls validation must be %q or %q, got %q", MLSStrict, MLSOff, p.MLS)
	}
	if p.MaxKeyPackageLifetime <= 0 {
		return fmt.Errorf("max KeyPackage lifetime must be positive, got %v", p.MaxKeyPackageLifetime)
	}
	return nil
}

// BundleInfo is what validation learns about an accepted bundle.
type BundleInfo struct {
	TimestampMS uint64 // the signed timestamp
	Ref         Ref    // KeyPackageRef of the (inner, bare) KeyPackage
	LastResort  bool   // the KeyPackage carries the last_resort extension
	// NotAfterMS is the end of the KeyPackage's MLS lifetime in Unix ms
	// (clamped to year 9999); 0 when the key_package is opaque
	// (--mls-validation=off), which never expires by lifetime.
	NotAfterMS int64
}

// checkPayloadSize applies rule 0 to a bundle or account payload. It runs
// before any signature work, so an oversized record costs its reader no CPU.
func checkPayloadSize(payload []byte) error {
	if len(payload) > MaxPayloadSize {
		return &ValidationError{Rule: RulePayloadTooLarge, Field: "payload",
			Detail: fmt.Sprintf("%d bytes is larger than the maximum of %d", len(payload), MaxPayloadSize)}
	}
	return nil
}

// verifyKeyAndSignature applies the two signature rules shared by bundles and
// account bundles; field names the key's JSON field.
func verifyKeyAndSignature(key Key, field string, payload []byte, sig *[SignatureSize]byte) error {
	err := ed25519strict.Verify(key[:], payload, sig[:])
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ed25519strict.ErrNotPoint):
		return &ValidationError{Rule: RuleKeyNotPoint, Field: field, Detail: "not a valid ed25519 key", Err: err}
	default:
		return &ValidationError{Rule: RuleSignature, Field: "signature", Detail: "verification failed", Err: err}
	}
}

// ValidateBundle applies every bundle rule at time now: payload size first
// (no signature work for an oversized record), then, in the order the HTTP
// API reports them, key is a point, strict signature, payload length,
// timestamp window, then the KeyPackage (strict MLS mode).
func (p Policy) ValidateBundle(b *Bundle, now time.Time) (BundleInfo, error) {
	var info BundleInfo
	if err := checkPayloadSize(b.Payload); err != nil {
		return info, err
	}
	if err := verifyKeyAndSignature(b.DeviceID, "device_id", b.Payload, &b.Signature); err != nil {
		return info, err
	}
	ts, kp, err := SplitBundlePayload(b.Payload)
	if err != nil {
		return info, &ValidationError{Rule: RulePayloadTooShort, Field: "payload", Detail: "too short to contain a timestamp", Err: err}
	}
	if err := p.checkTimestamp(ts, now); err != nil {
		return info, err
	}
	info.TimestampMS = ts
	if p.MLS == MLSOff {
		info.Ref = KeyPackageRef(kp)
		return info, nil
	}
	kpi, err := p.validateKeyPackage(kp, b.DeviceID, now)
	if err != nil {
		return info, err
	}
	info.Ref, info.LastResort, info.NotAfterMS = Ref(kpi.Ref), kpi.LastResort, kpi.NotAfter.UnixMilli()
	return info, nil
}

func (p Policy) checkTimestamp(ts uint64, now time.Time) error {
	nowMS := now.UnixMilli()
	if ts > uint64(nowMS)+uint64(p.ClockSkew.Milliseconds()) {
		return &ValidationError{Rule: RuleTimestampFuture, Field: "payload",
			Detail: fmt.Sprintf("timestamp %d is more than %v in the future", ts, p.ClockSkew)}
	}
	if oldest := nowMS - p.Retention.Milliseconds(); oldest > 0 && ts < uint64(oldest) {
		return &ValidationError{Rule: RuleTimestampExpired, Field: "payload",
			Detail: fmt.Sprintf("timestamp %d is older than the retention of %v", ts, p.Retention)}
	}
	return nil
}

// ValidateAccount applies the account bundle rules: key is a point, strict
// signature, then the domain and lamport header. It returns the lamport.
func (p Policy) ValidateAccount(a *AccountBundle) (lamport uint64, err error) {
	if err := checkPayloadSize(a.Payload); err != nil {
		return 0, err
	}
	if err := verifyKeyAndSignature(a.AccountPub, "account_pub", a.Payload, &a.Signature); err != nil {
		return 0, err
	}
	lamport, err = AccountLamport(a.Payload)
	if err != nil {
		return 0, &ValidationError{Rule: RuleAccountHeader, Field: "payload", Detail: err.Error(), Err: err}
	}
	return lamport, nil
}
