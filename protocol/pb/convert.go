package pb

import (
	"fmt"

	"github.com/kpnode/kpnode/protocol"
)

// The conversions between the wire messages and protocol's records live
// here and nowhere else. Decoding checks field sizes only; validation is
// protocol.Policy's job. Errors wrap protocol.ErrMalformed.

// FromBundle returns the wire form of a bundle. It aliases b's payload.
func FromBundle(b *protocol.Bundle) *Bundle {
	return &Bundle{DeviceId: b.DeviceID[:], Payload: b.Payload, Signature: b.Signature[:]}
}

// FromAccount returns the wire form of an account bundle. It aliases a's
// payload; the sender sets UpdatedAtMs where the message carries it (sync).
func FromAccount(a *protocol.AccountBundle) *AccountBundle {
	return &AccountBundle{AccountPub: a.AccountPub[:], Payload: a.Payload, Signature: a.Signature[:]}
}

// ToBundle decodes a wire bundle. The result aliases m's payload.
func ToBundle(m *Bundle) (*protocol.Bundle, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: no bundle", protocol.ErrMalformed)
	}
	if len(m.DeviceId) != protocol.KeySize || len(m.Signature) != protocol.SignatureSize {
		return nil, fmt.Errorf("%w: device_id of %d bytes, signature of %d", protocol.ErrMalformed, len(m.DeviceId), len(m.Signature))
	}
	b := &protocol.Bundle{Payload: m.Payload}
	copy(b.DeviceID[:], m.DeviceId)
	copy(b.Signature[:], m.Signature)
	return b, nil
}

// ToAccount decodes a wire account bundle. The result aliases m's payload.
func ToAccount(m *AccountBundle) (*protocol.AccountBundle, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: no account bundle", protocol.ErrMalformed)
	}
	if len(m.AccountPub) != protocol.KeySize || len(m.Signature) != protocol.SignatureSize {
		return nil, fmt.Errorf("%w: account_pub of %d bytes, signature of %d", protocol.ErrMalformed, len(m.AccountPub), len(m.Signature))
	}
	a := &protocol.AccountBundle{Payload: m.Payload}
	copy(a.AccountPub[:], m.AccountPub)
	copy(a.Signature[:], m.Signature)
	return a, nil
}

// FromConsume returns the wire form of a consume notice. It aliases n's payload.
func FromConsume(n *protocol.ConsumeNotice) *ConsumeNotice {
	return &ConsumeNotice{DeviceId: n.DeviceID[:], Payload: n.Payload, Signature: n.Signature[:]}
}

// ToConsume decodes a wire consume notice. The result aliases m's payload.
func ToConsume(m *ConsumeNotice) (*protocol.ConsumeNotice, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: no consume notice", protocol.ErrMalformed)
	}
	if len(m.DeviceId) != protocol.KeySize || len(m.Signature) != protocol.SignatureSize {
		return nil, fmt.Errorf("%w: device_id of %d bytes, signature of %d", protocol.ErrMalformed, len(m.DeviceId), len(m.Signature))
	}
	n := &protocol.ConsumeNotice{Payload: m.Payload}
	copy(n.DeviceID[:], m.DeviceId)
	copy(n.Signature[:], m.Signature)
	return n, nil
}

// FromClaim returns the wire form of a claim notice. It aliases n's payload.
func FromClaim(n *protocol.ClaimNotice) *ClaimNotice {
	return &ClaimNotice{NodeKey: n.NodeKey[:], Payload: n.Payload, Signature: n.Signature[:]}
}

// ToClaim decodes a wire claim notice. The result aliases m's payload.
func ToClaim(m *ClaimNotice) (*protocol.ClaimNotice, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: no claim notice", protocol.ErrMalformed)
	}
	if len(m.NodeKey) != protocol.KeySize || len(m.Signature) != protocol.SignatureSize {
		return nil, fmt.Errorf("%w: node_key of %d bytes, signature of %d", protocol.ErrMalformed, len(m.NodeKey), len(m.Signature))
	}
	n := &protocol.ClaimNotice{Payload: m.Payload}
	copy(n.NodeKey[:], m.NodeKey)
	copy(n.Signature[:], m.Signature)
	return n, nil
}
