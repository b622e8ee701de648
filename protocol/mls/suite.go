package mls

// The cipher suites Validate accepts. All three sign with Ed25519 and hash
// with SHA-256.
const (
	// SuiteX25519AES128 is MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
	SuiteX25519AES128 uint16 = 0x0001
	// SuiteX25519ChaCha20 is MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519.
	SuiteX25519ChaCha20 uint16 = 0x0003
	// SuiteXWing is MLS_256_XWING_CHACHA20POLY1305_SHA256_Ed25519, an
	// OpenMLS code point not registered with IANA, used by the chat client.
	SuiteXWing uint16 = 0x004D
)

// Key lengths in bytes.
const (
	// SignatureKeySize is the length of an Ed25519 signature_key.
	SignatureKeySize = 32
	// X25519KeySize is the HPKE public key length of suites 0x0001 and 0x0003.
	X25519KeySize = 32
	// XWingKeySize is the HPKE public key length of suite 0x004D (an
	// ML-KEM-768 encapsulation key followed by an X25519 key).
	XWingKeySize = 1216
)

// HPKEKeySize returns the init_key and encryption_key length of an allowed
// cipher suite, and false for any other suite.
func HPKEKeySize(suite uint16) (int, bool) {
	switch suite {
	case SuiteX25519AES128, SuiteX25519ChaCha20:
		return X25519KeySize, true
	case SuiteXWing:
		return XWingKeySize, true
	}
	return 0, false
}

// SuiteName returns the name of a cipher suite, or "" if it is unknown.
func SuiteName(suite uint16) string {
	switch suite {
	case 0x0001:
		return "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519"
	case 0x0002:
		return "MLS_128_DHKEMP256_AES128GCM_SHA256_P256"
	case 0x0003:
		return "MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519"
	case 0x0004:
		return "MLS_256_DHKEMX448_AES256GCM_SHA512_Ed448"
	case 0x0005:
		return "MLS_256_DHKEMP521_AES256GCM_SHA512_P521"
	case 0x0006:
		return "MLS_256_DHKEMX448_CHACHA20POLY1305_SHA512_Ed448"
	case 0x0007:
		return "MLS_256_DHKEMP384_AES256GCM_SHA384_P384"
	case 0x004D:
		return "MLS_256_XWING_CHACHA20POLY1305_SHA256_Ed25519"
	}
	return ""
}

// suiteError explains why a suite is not allowed.
func suiteError(suite uint16) *Error {
	const allowed = "allowed suites: 0x0001, 0x0003, 0x004D"
	var why string
	switch suite {
	case 0x0002, 0x0005, 0x0007:
		why = "signs with ECDSA, not Ed25519"
	case 0x0004, 0x0006:
		why = "signs with Ed448, not Ed25519"
	default:
		if isGREASE(suite) {
			return newError(RuleCipherSuite, "cipher suite 0x%04X is a GREASE value; %s", suite, allowed)
		}
		return newError(RuleCipherSuite, "cipher suite 0x%04X is unknown; %s", suite, allowed)
	}
	return newError(RuleCipherSuite, "cipher suite 0x%04X (%s) %s, so it is not allowed; %s",
		suite, SuiteName(suite), why, allowed)
}

// isGREASE reports whether v is one of the RFC 9420 §13.5 GREASE values
// 0x0A0A, 0x1A1A, …, 0xEAEA.
func isGREASE(v uint16) bool {
	return v&0x0F0F == 0x0A0A && v>>12 == (v>>4)&0xF && v != 0xFAFA
}
