package protocol

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"testing"
	"time"
)

// FuzzSplitBundlePayload: the bundle payload decoder never panics and
// round-trips.
func FuzzSplitBundlePayload(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("1234567"))
	f.Add(BundlePayload(1700000000000, []byte("fake-mls-keypackage-bytes")))
	f.Fuzz(func(t *testing.T, payload []byte) {
		ts, kp, err := SplitBundlePayload(payload)
		if err != nil {
			if len(payload) >= TimestampSize {
				t.Fatalf("refused %d bytes", len(payload))
			}
			return
		}
		if !bytes.Equal(BundlePayload(ts, kp), payload) {
			t.Fatal("payload does not round-trip")
		}
	})
}

// FuzzAccountPayload: both account decoders never panic, agree on the
// lamport, and the full layout round-trips.
func FuzzAccountPayload(f *testing.F) {
	f.Add(EncodeAccountPayload(0, []Key{{1}}))
	f.Add(EncodeAccountPayload(7, nil))
	f.Add(append([]byte(AccountDomain), 1, 42, 0, 0, 0, 0, 0, 0, 0))
	f.Add([]byte(AccountDomain))
	f.Fuzz(func(t *testing.T, payload []byte) {
		lamport, err := AccountLamport(payload)
		d, derr := DecodeAccountPayload(payload)
		if err != nil {
			if derr == nil {
				t.Fatal("full decoder accepted what the header decoder refused")
			}
			return
		}
		if binary.LittleEndian.Uint64(payload[len(AccountDomain)+1:]) != lamport {
			t.Fatal("lamport read from the wrong offset")
		}
		if derr != nil {
			return
		}
		if d.Lamport != lamport || !bytes.Equal(EncodeAccountPayload(d.Lamport, d.Devices), payload) {
			t.Fatal("account payload does not round-trip")
		}
	})
}

// FuzzValidateBundle: validation of arbitrary bundles never panics and never
// accepts a signature the device key did not make.
func FuzzValidateBundle(f *testing.F) {
	dev := seedKey(1)
	now := time.UnixMilli(1_800_000_000_000)
	good := SignBundle(dev, uint64(now.UnixMilli()), []byte("kp"))
	f.Add(good.DeviceID[:], good.Payload, good.Signature[:])
	f.Add(make([]byte, 32), []byte{}, make([]byte, 64))
	f.Fuzz(func(t *testing.T, key, payload, sig []byte) {
		if len(key) != KeySize || len(sig) != SignatureSize {
			return
		}
		var b Bundle
		copy(b.DeviceID[:], key)
		copy(b.Signature[:], sig)
		b.Payload = payload
		p := DefaultPolicy()
		p.MLS = MLSOff
		if _, err := p.ValidateBundle(&b, now); err == nil && b.DeviceID != good.DeviceID {
			t.Fatalf("accepted a bundle for a key the seeds never signed with: %x", key)
		}
	})
}

// FuzzDecodeConsumePayload: the consume decoder never panics; what it
// accepts re-encodes to the same bytes with 1..256 distinct refs; and
// ValidateConsume, given the payload signed, agrees with it (at the
// payload's own time, so the window passes).
func FuzzDecodeConsumePayload(f *testing.F) {
	f.Add(ConsumePayload(1700000000000, refsN(1)))
	f.Add(ConsumePayload(1700000000000, refsN(3)))
	f.Add(ConsumePayload(1, []Ref{{1}, {1}}))
	f.Add([]byte(ConsumeDomain))
	f.Add(append([]byte(ConsumeDomain), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
	dev := seedKey(1)
	p := DefaultPolicy()
	f.Fuzz(func(t *testing.T, payload []byte) {
		ts, refs, err := DecodeConsumePayload(payload)
		if err == nil {
			if len(refs) == 0 || len(refs) > MaxConsumeRefs || !bytes.Equal(ConsumePayload(ts, refs), payload) {
				t.Fatalf("accepted %d refs that do not re-encode", len(refs))
			}
			seen := map[Ref]bool{}
			for _, r := range refs {
				if seen[r] {
					t.Fatal("accepted a ref twice")
				}
				seen[r] = true
			}
		}
		n := signConsumePayload(dev, payload)
		now := time.UnixMilli(int64(ts & (1<<62 - 1)))
		info, verr := p.ValidateConsume(&n, now)
		switch {
		case len(payload) > MaxConsumePayloadSize:
			wantRule(t, verr, RuleConsumeTooLarge)
		case err != nil:
			wantRule(t, verr, RuleConsumeLayout)
		case ts>>62 != 0:
			// A timestamp past what a clock can hold: refused by the window
			// or accepted; either way no panic, and never as a layout error.
			if verr != nil {
				var ve *ValidationError
				if !errors.As(verr, &ve) || ve.Rule == RuleConsumeLayout {
					t.Fatalf("timestamp %d: %v", ts, verr)
				}
			}
		default:
			if verr != nil || info.TimestampMS != ts || len(info.Refs) != len(refs) || info.Hash != sha256.Sum256(payload) {
				t.Fatalf("decodable payload refused or misread: %v", verr)
			}
		}
		// With the fuzzed bytes as the key and signature too: never a panic.
		var raw ConsumeNotice
		raw.Payload = payload
		copy(raw.DeviceID[:], payload)
		copy(raw.Signature[:], payload)
		p.ValidateConsume(&raw, time.Now())
	})
}

// FuzzDecodeClaimPayload: the claim decoder never panics; it accepts
// exactly the 88-byte payloads with the claim domain, which re-encode to
// the same bytes; ValidateClaim, given the payload signed, agrees.
func FuzzDecodeClaimPayload(f *testing.F) {
	f.Add(ClaimPayload(1700000000000, Key{1}, Ref{2}))
	f.Add(ClaimPayload(1700000000000, Key{1}, Ref{2})[:87])
	f.Add([]byte(ClaimDomain))
	f.Add(append([]byte(ConsumeDomain), make([]byte, 70)...))
	node := seedKey(3)
	p := DefaultPolicy()
	f.Fuzz(func(t *testing.T, payload []byte) {
		ts, dev, ref, err := DecodeClaimPayload(payload)
		wantOK := len(payload) == ClaimPayloadSize && bytes.HasPrefix(payload, []byte(ClaimDomain))
		if (err == nil) != wantOK {
			t.Fatalf("decode: %v for %d bytes", err, len(payload))
		}
		if err == nil && !bytes.Equal(ClaimPayload(ts, dev, ref), payload) {
			t.Fatal("accepted payload does not re-encode")
		}
		n := signClaimPayload(node, payload)
		now := time.UnixMilli(int64(ts & (1<<62 - 1)))
		info, verr := p.ValidateClaim(&n, now)
		switch {
		case len(payload) != ClaimPayloadSize:
			wantRule(t, verr, RuleClaimNoticeLength)
		case err != nil:
			wantRule(t, verr, RuleClaimLayout)
		case ts>>62 != 0:
		default:
			if verr != nil || info.TimestampMS != ts || info.DeviceID != dev || info.Ref != ref || info.Hash != ClaimHash(&n) {
				t.Fatalf("decodable payload refused or misread: %v", verr)
			}
		}
		var raw ClaimNotice
		raw.Payload = payload
		copy(raw.NodeKey[:], payload)
		copy(raw.Signature[:], payload)
		p.ValidateClaim(&raw, time.Now())
	})
}
