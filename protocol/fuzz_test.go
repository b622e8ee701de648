package protocol

import (
	"bytes"
	"encoding/binary"
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
