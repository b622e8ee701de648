package protocol

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// AccountDomain starts every account bundle payload (30 bytes, NUL included).
const AccountDomain = "libchat:account-device-bundle\x00"

// AccountVersion is the only account payload layout version the client knows.
const AccountVersion = 1

// accountHeaderSize is the domain plus version (1) and lamport (8).
const accountHeaderSize = len(AccountDomain) + 1 + 8

// AccountBundle is an account's signed device list:
// payload = domain ‖ version u8 ‖ lamport u64 LE ‖ count u16 LE ‖ count × 32-byte device keys,
// signature = Ed25519(account key, payload).
type AccountBundle struct {
	AccountPub Key
	Payload    []byte
	Signature  [SignatureSize]byte
}

// Errors of the account payload decoders.
var (
	// ErrAccountHeader: the payload lacks the domain or the version and lamport.
	ErrAccountHeader = errors.New("too short to contain a lamport header")
	// ErrAccountLayout: the payload is not the full client layout.
	ErrAccountLayout = errors.New("not a valid account device list")
)

// AccountLamport reads the lamport of an account payload the way chat-store
// does: the domain, then at least version and lamport. Whatever follows is not
// interpreted, so header-only payloads (and the benchmark's filler) pass.
func AccountLamport(payload []byte) (uint64, error) {
	if len(payload) < accountHeaderSize || string(payload[:len(AccountDomain)]) != AccountDomain {
		return 0, ErrAccountHeader
	}
	return binary.LittleEndian.Uint64(payload[len(AccountDomain)+1:]), nil
}

// AccountDevices is the decoded client layout of an account payload.
type AccountDevices struct {
	Version uint8
	Lamport uint64
	Devices []Key
}

// DecodeAccountPayload decodes the full layout the chat client requires:
// domain, version 1, lamport, count and exactly count device keys.
func DecodeAccountPayload(payload []byte) (AccountDevices, error) {
	var d AccountDevices
	lamport, err := AccountLamport(payload)
	if err != nil {
		return d, err
	}
	d.Version = payload[len(AccountDomain)]
	d.Lamport = lamport
	if d.Version != AccountVersion {
		return d, fmt.Errorf("%w: version %d", ErrAccountLayout, d.Version)
	}
	rest := payload[accountHeaderSize:]
	if len(rest) < 2 {
		return d, fmt.Errorf("%w: no device count", ErrAccountLayout)
	}
	count := int(binary.LittleEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != count*KeySize {
		return d, fmt.Errorf("%w: %d bytes for %d device keys", ErrAccountLayout, len(rest), count)
	}
	d.Devices = make([]Key, count)
	for i := range d.Devices {
		copy(d.Devices[i][:], rest[i*KeySize:])
	}
	return d, nil
}

// EncodeAccountPayload builds the client layout for lamport and devices.
func EncodeAccountPayload(lamport uint64, devices []Key) []byte {
	p := make([]byte, 0, accountHeaderSize+2+len(devices)*KeySize)
	p = append(p, AccountDomain...)
	p = append(p, AccountVersion)
	p = binary.LittleEndian.AppendUint64(p, lamport)
	p = binary.LittleEndian.AppendUint16(p, uint16(len(devices)))
	for _, d := range devices {
		p = append(p, d[:]...)
	}
	return p
}

// SignAccount signs payload with the account key.
func SignAccount(account ed25519.PrivateKey, payload []byte) AccountBundle {
	a := AccountBundle{Payload: append([]byte(nil), payload...)}
	copy(a.AccountPub[:], account.Public().(ed25519.PublicKey))
	copy(a.Signature[:], ed25519.Sign(account, a.Payload))
	return a
}

// AccountSupersedes reports whether an account bundle with (lamport, payload)
// replaces a stored one under the convergence rule every node applies: the
// greater lamport wins; at equal lamport the payload with the smaller SHA-256
// wins, so all nodes settle on the same value whatever order they see.
func AccountSupersedes(lamport uint64, payload []byte, storedLamport uint64, storedPayload []byte) bool {
	if lamport != storedLamport {
		return lamport > storedLamport
	}
	a, b := sha256.Sum256(payload), sha256.Sum256(storedPayload)
	return string(a[:]) < string(b[:])
}
