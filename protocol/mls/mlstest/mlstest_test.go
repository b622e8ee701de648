package mlstest_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

var now = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

func TestGenerateOptions(t *testing.T) {
	_, signer, _ := ed25519.GenerateKey(rand.Reader)
	nb, na := now.Add(-time.Minute), now.Add(7*24*time.Hour)
	data, got, err := mlstest.Generate(mlstest.Options{
		Suite: mlstest.SuiteX25519ChaCha20, Signer: signer, NotBefore: nb, NotAfter: na,
		Identity: []byte("bob"), Wrapped: true, Now: now,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, signer) {
		t.Error("Generate did not return the given signer")
	}
	kp, err := mls.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	ln := kp.LeafNode
	if !kp.Wrapped || kp.CipherSuite != 3 || string(ln.Credential.Identity) != "bob" ||
		ln.Lifetime.NotBefore != uint64(nb.Unix()) || ln.Lifetime.NotAfter != uint64(na.Unix()) ||
		!bytes.Equal(ln.SignatureKey, signer.Public().(ed25519.PublicKey)) {
		t.Errorf("unexpected KeyPackage %+v", kp)
	}
	if _, err := mls.Validate(data, ln.SignatureKey, mls.Policy{Now: now}); err != nil {
		t.Error(err)
	}
}

func TestGenerateDefaults(t *testing.T) {
	data, signer, err := mlstest.Generate(mlstest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	kp, err := mls.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	if kp.Wrapped || kp.CipherSuite != mlstest.SuiteXWing || kp.LastResort() {
		t.Errorf("Wrapped=%v suite=%#x last_resort=%v", kp.Wrapped, kp.CipherSuite, kp.LastResort())
	}
	if len(kp.InitKey) != 1216 || len(kp.LeafNode.EncryptionKey) != 1216 {
		t.Errorf("X-Wing keys are %d and %d bytes", len(kp.InitKey), len(kp.LeafNode.EncryptionKey))
	}
	// The identity is the hex of 23 23 | 01 20 <key> | 02 40 <64 hex chars>.
	id := kp.LeafNode.Credential.Identity
	tlv, err := hex.DecodeString(string(id))
	if err != nil || len(id) != 204 {
		t.Fatalf("identity is %d bytes (%v)", len(id), err)
	}
	pub := signer.Public().(ed25519.PublicKey)
	if !bytes.HasPrefix(tlv, append([]byte{0x23, 0x23, 0x01, 0x20}, pub...)) || !bytes.Equal(tlv[36:38], []byte{0x02, 0x40}) {
		t.Errorf("identity TLV %x", tlv)
	}
	// Defaults: from an hour ago for 84 days, accepted right now.
	lt := kp.LeafNode.Lifetime
	if lt.NotAfter-lt.NotBefore != uint64((mlstest.DefaultBackdate + mlstest.DefaultValidity).Seconds()) {
		t.Errorf("lifetime span %d", lt.NotAfter-lt.NotBefore)
	}
	if _, err := mls.Validate(data, pub, mls.Policy{Now: time.Now()}); err != nil {
		t.Error(err)
	}
}

func TestGenerateErrors(t *testing.T) {
	if _, _, err := mlstest.Generate(mlstest.Options{Suite: 2}); err == nil {
		t.Error("suite 2 accepted")
	}
	if _, _, err := mlstest.Generate(mlstest.Options{Signer: make([]byte, 10)}); err == nil {
		t.Error("short signer accepted")
	}
	b, err := mlstest.NewBuilder(mlstest.Options{Suite: 1})
	if err != nil {
		t.Fatal(err)
	}
	b.Signer = nil
	if _, err := b.Encode(); err == nil {
		t.Error("Encode without a signer succeeded")
	}
}

func TestAppendVarint(t *testing.T) {
	for n, want := range map[int]string{37: "25", 15293: "7bbd", 494878333: "9d7f3e7d", 63: "3f", 64: "4040", 16384: "80004000"} {
		if got := hex.EncodeToString(mlstest.AppendVarint(nil, n)); got != want {
			t.Errorf("AppendVarint(%d) = %s, want %s", n, got, want)
		}
	}
}

func ExampleGenerate() {
	data, signer, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, LastResort: true})
	if err != nil {
		panic(err)
	}
	info, err := mls.Validate(data, signer.Public().(ed25519.PublicKey), mls.Policy{Now: time.Now()})
	if err != nil {
		panic(err)
	}
	fmt.Println(info.LastResort, len(data) > 2600)
	// Output: true true
}
