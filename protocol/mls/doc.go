// Package mls parses and validates RFC 9420 KeyPackages (TLS presentation
// language) for the registry. Its functions are pure: no I/O, no system
// clock, no package-level state.
//
// # Parsing
//
// Parse accepts a bare KeyPackage, as the chat client (OpenMLS) sends it, or
// one wrapped in an MLSMessage (00 01 00 05 ‖ KeyPackage), as the interop
// vectors and emersion/go-mls use. It tries the wrapped form first and falls
// back to the bare form; whichever it takes must consume the whole input.
// Signatures and the KeyPackageRef always cover the bare KeyPackage
// (KeyPackage.Raw). Parsing is strict:
//
//   - vector lengths must use the shortest varint encoding
//     (RuleNonMinimalLength) and the reserved 0b11 prefix is rejected
//     (RuleMalformed);
//   - a vector of structs must be filled exactly by its elements, and a
//     uint16 list must have an even length (RuleMalformed);
//   - an unknown credential type is rejected, because a Credential has no
//     outer length and cannot be skipped (RuleMalformed);
//   - an undefined leaf_node_source (0 or above 3) is rejected, because what
//     follows it depends on it (RuleLeafSource); sources update and commit
//     parse, and Validate rejects them;
//   - no byte may follow the KeyPackage (RuleTrailingBytes).
//
// The parsed fields, including the two to-be-signed ranges KeyPackage.TBS
// and LeafNode.TBS, are sub-slices of the input; nothing is re-serialised.
//
// # Validation
//
// Validate parses and then applies these rules, in this order, stopping at
// the first that fails (the rule name is in parentheses):
//
//  1. parse, as above (malformed, non_minimal_length, trailing_bytes,
//     leaf_source);
//  2. version is 1 (mls10); when wrapped, the MLSMessage version equals it
//     and wire_format is 5, mls_key_package (version);
//  3. the cipher suite is 0x0001, 0x0003 or 0x004D, the suites that sign
//     with Ed25519 and hash with SHA-256 (cipher_suite);
//  4. signature_key is 32 bytes, init_key and encryption_key are 32 bytes
//     for suites 0x0001 and 0x0003 and 1216 for 0x004D (key_size);
//  5. leaf_node_source is key_package (leaf_source);
//  6. leaf_node.signature_key equals the device key that signs the bundle
//     (signature_key);
//  7. the LeafNode signature verifies over SignContent("MLS 1.0 LeafNodeTBS",
//     LeafNodeTBS) (leaf_signature);
//  8. the KeyPackage signature verifies over SignContent("MLS 1.0
//     KeyPackageTBS", KeyPackageTBS) (keypackage_signature);
//  9. init_key differs from encryption_key (init_key_equals_encryption_key);
//  10. not_before <= now + skew (lifetime_not_yet_valid) and
//     now - skew <= not_after (lifetime_expired); a lifetime whose not_after
//     precedes its not_before is never valid (lifetime_expired);
//  11. not_after - not_before <= MaxLifetime (lifetime_too_long);
//  12. the credential: basic identities are opaque and accepted; an x509
//     chain must not be empty and its end-entity certificate must parse and
//     hold signature_key as its Ed25519 key (credential);
//  13. every type in leaf_node.extensions and KeyPackage.extensions is a
//     default type (0x0001–0x0005), a GREASE value, or listed in
//     leaf_node.capabilities.extensions (unsupported_extension).
//
// Both signatures are verified under leaf_node.signature_key with
// ed25519strict.Verify, which gives ed25519-dalek verify_strict verdicts.
// (RFC 9420 §10.1 still says "the public key in the credential"; OpenMLS,
// emersion/go-mls and all interop vectors use signature_key.)
//
// Lifetime bounds are Unix seconds and inclusive. Times are clamped to
// 9999-12-31T23:59:59Z before comparison, so 2^64-1 does not overflow. The
// span check compares whole seconds.
//
// # What is lenient, and why
//
//   - Capabilities may list default proposal and extension types, though
//     RFC 9420 §7.2 says they MUST NOT: OpenMLS lists application_id and
//     every messages.json interop vector lists extension 1 and proposals
//     1–5 and 7.
//   - Capabilities need not list the KeyPackage's own version, cipher suite
//     or credential type: those are checks against a group, which a
//     registry does not have, and welcome.json[6] omits its own suite.
//   - GREASE values (0x0A0A, 0x1A1A, …, 0xEAEA, RFC 9420 §13.5) are ignored
//     wherever they appear; a GREASE cipher suite is still not allowed.
//   - HPKE keys are checked for length only. Every 32-byte string is an
//     X25519 public key; the ML-KEM-768 half of an X-Wing key is not
//     decoded.
//   - A basic credential's identity is not interpreted, and an x509 chain is
//     not verified: the Authentication Service is the application's.
//   - last_resort is recognised as extension 0x000A
//     (draft-ietf-mls-extensions-04/-05, OpenMLS, the chat client) in
//     KeyPackage.extensions, whatever its data. Component 0x0004 inside
//     app_data_dictionary (0x0006, draft -06 on) is not recognised.
//   - Repeated extension types are not rejected.
//
// Rule 13 is the one check beyond the registry design's list. RFC 9420 §7.3
// and §10 ask it of every recipient, the chat client lists the types it
// uses (0x000A, 0xFF01), and all Ed25519 interop vectors pass it (they carry
// no extensions, so they do not exercise it).
package mls
