package protocol

import (
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// Strict mode runs the MLS rules after the bundle rules, names the failed
// MLS rule, and takes the bundle ref over the inner KeyPackage.
func TestStrictModeValidatesKeyPackage(t *testing.T) {
	now := time.Now()
	dev := seedKey(9)
	p := DefaultPolicy()
	for _, wrapped := range []bool{false, true} {
		kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: dev, LastResort: true, Wrapped: wrapped, Now: now})
		if err != nil {
			t.Fatal(err)
		}
		b := SignBundle(dev, uint64(now.UnixMilli()), kp)
		info, err := p.ValidateBundle(&b, now)
		if err != nil {
			t.Fatalf("wrapped=%v: valid KeyPackage refused: %v", wrapped, err)
		}
		if !info.LastResort {
			t.Fatal("last_resort not detected")
		}
		bare := kp
		if wrapped {
			bare = kp[4:]
		}
		if info.Ref != KeyPackageRef(bare) {
			t.Fatalf("wrapped=%v: ref not taken over the bare KeyPackage", wrapped)
		}
	}

	// Signed by another device: the bundle signature is fine, the leaf key is not.
	other := seedKey(10)
	kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteX25519AES128, Signer: other, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	b := SignBundle(dev, uint64(now.UnixMilli()), kp)
	_, err = p.ValidateBundle(&b, now)
	if RuleOf(err) != "mls_signature_key" {
		t.Fatalf("foreign KeyPackage: %v", err)
	}
	if got := err.Error(); len(got) < len("key_package: mls: signature_key") || got[:len("key_package: mls: signature_key")] != "key_package: mls: signature_key" {
		t.Fatalf("message %q does not name the rule", got)
	}

	// Junk is refused in strict mode and accepted with validation off.
	junk := SignBundle(dev, uint64(now.UnixMilli()), []byte("fake-mls-keypackage-bytes"))
	if _, err := p.ValidateBundle(&junk, now); RuleOf(err) != "mls_malformed" {
		t.Fatalf("junk in strict mode: %v", err)
	}
	if _, err := opaquePolicy().ValidateBundle(&junk, now); err != nil {
		t.Fatalf("junk with validation off: %v", err)
	}

	// An expired KeyPackage is a transient (clock-window) failure.
	expired, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteX25519AES128, Signer: dev,
		NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-time.Hour), Now: now})
	if err != nil {
		t.Fatal(err)
	}
	eb := SignBundle(dev, uint64(now.UnixMilli()), expired)
	_, err = p.ValidateBundle(&eb, now)
	ve, ok := err.(*ValidationError)
	if !ok || ve.Rule != "mls_lifetime_expired" || !ve.Transient() {
		t.Fatalf("expired KeyPackage: %v", err)
	}
}
