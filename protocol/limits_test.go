package protocol

import (
	"bytes"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"testing"
	"time"
)

// A payload one byte over MaxPayloadSize is refused by rule
// payload_too_large, before the signature is looked at (a forged oversized
// record costs no verification); one at the limit passes that rule.
func TestPayloadSizeCap(t *testing.T) {
	now := time.UnixMilli(1_700_000_000_000)
	dev := seedKey(7)
	atLimit := SignBundle(dev, uint64(now.UnixMilli()), bytes.Repeat([]byte{1}, MaxPayloadSize-TimestampSize))
	if _, err := opaquePolicy().ValidateBundle(&atLimit, now); err != nil {
		t.Fatalf("payload of exactly MaxPayloadSize: %v", err)
	}
	over := SignBundle(dev, uint64(now.UnixMilli()), bytes.Repeat([]byte{1}, MaxPayloadSize-TimestampSize+1))
	over.Signature[0] ^= 1 // a bad signature too: the size rule must come first
	_, err := opaquePolicy().ValidateBundle(&over, now)
	var ve *ValidationError
	if !errors.As(err, &ve) || ve.Rule != RulePayloadTooLarge || ve.Transient() {
		t.Fatalf("oversized bundle: %v", err)
	}
	if ve.Error() != "payload: 65537 bytes is larger than the maximum of 65536" {
		t.Fatalf("error text %q", ve.Error())
	}

	acct := seedKey(8)
	payload := append([]byte(AccountDomain), 1)
	payload = binary.LittleEndian.AppendUint64(payload, 1)
	payload = append(payload, make([]byte, MaxPayloadSize)...)
	a := AccountBundle{Payload: payload}
	copy(a.AccountPub[:], acct.Public().(ed25519.PublicKey))
	if _, err := DefaultPolicy().ValidateAccount(&a); RuleOf(err) != RulePayloadTooLarge {
		t.Fatalf("oversized account bundle: %v", err)
	}
}

func TestConstantsTag(t *testing.T) {
	c := DefaultConstants()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if got := c.NetworkID("kpnode-dev"); got != "kpnode-dev/s8-strict-l7776000" {
		t.Fatalf("NetworkID = %q", got)
	}
	if got := BundleTopic(c.NetworkID("n"), 3); got != "/kpnode/1/n/s8-strict-l7776000/kp/3" {
		t.Fatalf("topic %q", got)
	}
	other := c
	other.MLS = MLSOff
	if other.Tag() == c.Tag() {
		t.Fatal("MLS mode is not in the tag")
	}
	other = c
	other.MaxKeyPackageLifetime += time.Second
	if other.Tag() == c.Tag() {
		t.Fatal("lifetime cap is not in the tag")
	}
	if net, tag, ok := ParseNetworkID(c.NetworkID("kpnode-dev")); !ok || net != "kpnode-dev" || tag != c.Tag() {
		t.Fatalf("ParseNetworkID: %q %q %v", net, tag, ok)
	}
	bad := c
	bad.MaxKeyPackageLifetime = time.Millisecond
	if bad.Validate() == nil {
		t.Fatal("sub-second lifetime cap accepted")
	}
}
