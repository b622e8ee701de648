package ed25519strict

import (
	"crypto/ed25519"
	"testing"
)

// FuzzVerify: Verify never panics, and whatever it accepts Go's Verify
// accepts too (strict is a subset); what it rejects while Go accepts must
// involve a small-order A or R.
func FuzzVerify(f *testing.F) {
	priv := ed25519.NewKeyFromSeed(make([]byte, 32))
	msg := []byte("message")
	f.Add([]byte(priv.Public().(ed25519.PublicKey)), msg, ed25519.Sign(priv, msg))
	id := make([]byte, 32)
	id[0] = 1
	f.Add(id, msg, append(append([]byte{}, id...), make([]byte, 32)...))
	f.Fuzz(func(t *testing.T, pub, msg, sig []byte) {
		err := Verify(pub, msg, sig)
		if len(pub) != PublicKeySize || len(sig) != SignatureSize {
			if err == nil {
				t.Fatal("accepted wrong sizes")
			}
			return
		}
		goOK := ed25519.Verify(pub, msg, sig)
		if err == nil && !goOK {
			t.Fatal("strict accepted what Go rejects")
		}
		if err != nil && goOK {
			a, aerr := DecodePoint(pub)
			r, rerr := DecodePoint(sig[:32])
			if aerr != nil || rerr != nil || (!IsSmallOrder(a) && !IsSmallOrder(r)) {
				t.Fatalf("rejected a signature Go accepts without a small-order point: %v", err)
			}
		}
	})
}
