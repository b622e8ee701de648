package mls_test

import (
	"bytes"
	"encoding/hex"
	"testing"

	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// TestParseBareSuite5 checks that a bare suite 0x0005 KeyPackage, which
// begins 00 01 00 05 like an MLSMessage header, parses as bare.
func TestParseBareSuite5(t *testing.T) {
	for _, v := range loadVectors(t) {
		if v.CipherSuite != 5 {
			continue
		}
		bare := v.data[4:]
		if !bytes.HasPrefix(bare, []byte{0, 1, 0, 5}) {
			t.Fatalf("%s: bare form starts %x", v.Source, bare[:4])
		}
		kp, err := mls.Parse(bare)
		if err != nil {
			t.Fatal(err)
		}
		if kp.Wrapped || kp.CipherSuite != 5 || len(kp.Raw) != len(bare) {
			t.Errorf("%s: Wrapped=%v suite=%d", v.Source, kp.Wrapped, kp.CipherSuite)
		}
		return
	}
	t.Fatal("no suite 5 vector")
}

func TestParseFields(t *testing.T) {
	b := newBuilder(t, mlstest.Options{Suite: 0x004D, LastResort: true, Identity: []byte("alice")})
	b.LeafExtensions = []mlstest.Extension{{Type: 0xFF01, Data: []byte{7}}}
	data := encode(t, b)
	kp, err := mls.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	ln := kp.LeafNode
	switch {
	case kp.Version != 1 || kp.CipherSuite != 0x004D:
		t.Errorf("version %d suite %#x", kp.Version, kp.CipherSuite)
	case !bytes.Equal(kp.InitKey, b.InitKey) || !bytes.Equal(ln.EncryptionKey, b.EncryptionKey):
		t.Error("HPKE keys differ")
	case !bytes.Equal(ln.SignatureKey, b.SignatureKey):
		t.Error("signature key differs")
	case ln.Credential.Type != 1 || string(ln.Credential.Identity) != "alice":
		t.Errorf("credential %+v", ln.Credential)
	case ln.Lifetime.NotBefore != b.NotBefore || ln.Lifetime.NotAfter != b.NotAfter:
		t.Errorf("lifetime %+v", ln.Lifetime)
	case len(ln.Extensions) != 1 || ln.Extensions[0].Type != 0xFF01 || !bytes.Equal(ln.Extensions[0].Data, []byte{7}):
		t.Errorf("leaf extensions %+v", ln.Extensions)
	case len(kp.Extensions) != 1 || kp.Extensions[0].Type != mls.ExtensionLastResort || len(kp.Extensions[0].Data) != 0:
		t.Errorf("extensions %+v", kp.Extensions)
	case !kp.LastResort():
		t.Error("LastResort false")
	case len(ln.Signature) != 64 || len(kp.Signature) != 64:
		t.Error("signature sizes")
	}
	c := ln.Capabilities
	if !equal16(c.Versions, 1) || !equal16(c.CipherSuites, 0x004D) || !equal16(c.Extensions, 1, 0x0A, 0xFF01) ||
		len(c.Proposals) != 0 || !equal16(c.Credentials, 1) {
		t.Errorf("capabilities %+v", c)
	}
	// The TBS ranges are sub-slices of the input.
	if &kp.Raw[0] != &data[0] || &kp.TBS[0] != &data[0] || !bytes.Contains(kp.TBS, ln.TBS) {
		t.Error("Raw/TBS are not sub-slices of the input")
	}
	if &ln.TBS[0] != &data[4+2+len(kp.InitKey)] {
		t.Error("LeafNode.TBS does not start at encryption_key's length")
	}
	// The wire bytes are what we expect at the start: 00 01 00 4d 44 c0.
	if got := hex.EncodeToString(data[:6]); got != "0001004d44c0" {
		t.Errorf("starts %s", got)
	}
}

func equal16(got []uint16, want ...uint16) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}

// TestParseOddCapabilities checks a uint16 list with an odd byte length.
func TestParseOddCapabilities(t *testing.T) {
	b := newBuilder(t, mlstest.Options{Suite: 1, Identity: []byte{}})
	b.Versions = []uint16{1}
	data := encode(t, b)
	// Layout: 4 header, 1+32 init_key, 1+32 encryption_key, 1+32
	// signature_key, 2+1 credential, then versions<V> = 02 00 01.
	off := 4 + 33 + 33 + 33 + 3
	if !bytes.Equal(data[off:off+3], []byte{2, 0, 1}) {
		t.Fatalf("versions at %d are %x", off, data[off:off+3])
	}
	bad := append(append(append([]byte(nil), data[:off]...), 3, 0, 1, 0), data[off+3:]...)
	_, err := mls.Parse(bad)
	if !errorsIsRule(err, mls.RuleMalformed) {
		t.Errorf("odd capabilities list: %v", err)
	}
}

func errorsIsRule(err error, r mls.Rule) bool {
	me, ok := err.(*mls.Error)
	return ok && me.Rule == r
}
