package mls_test

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol/mls"
)

// vector is one entry of testdata/keypackages.json.
type vector struct {
	Source      string `json:"source"`
	CipherSuite uint16 `json:"cipher_suite"`
	Wire        string `json:"wire"`
	Hex         string `json:"hex"`

	data []byte
	ref  string // expected KeyPackageRef, from testdata/keypackage_refs.txt
}

func loadVectors(tb testing.TB) []vector {
	tb.Helper()
	raw, err := os.ReadFile("testdata/keypackages.json")
	if err != nil {
		tb.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(raw, &vs); err != nil {
		tb.Fatal(err)
	}
	if len(vs) != 307 {
		tb.Fatalf("testdata/keypackages.json has %d entries, want 307", len(vs))
	}
	refs := loadRefs(tb)
	for i := range vs {
		if vs[i].data, err = hex.DecodeString(vs[i].Hex); err != nil {
			tb.Fatalf("%s: %v", vs[i].Source, err)
		}
		vs[i].ref = refs[vs[i].Source]
	}
	return vs
}

// loadRefs reads testdata/keypackage_refs.txt: "source suite ref" lines.
func loadRefs(tb testing.TB) map[string]string {
	tb.Helper()
	f, err := os.Open("testdata/keypackage_refs.txt")
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	refs := make(map[string]string)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) != 3 {
			tb.Fatalf("bad refs line %q", line)
		}
		refs[fields[0]] = fields[2]
	}
	if err := sc.Err(); err != nil {
		tb.Fatal(err)
	}
	return refs
}

// varintLen is the length of the minimal varint encoding of n.
func varintLen(n int) int {
	switch {
	case n < 64:
		return 1
	case n < 16384:
		return 2
	}
	return 4
}

func isEd25519Suite(s uint16) bool { return s == 1 || s == 3 }

// vectorPolicy returns a Policy whose Now lies inside the vector's lifetime.
// The welcome.json lifetimes span 0 .. 2^64-1, which no time.Duration can
// allow, so their span check is disabled; the messages.json spans
// (7,261,200 s) must pass the default 90-day maximum.
func vectorPolicy(kp *mls.KeyPackage) mls.Policy {
	lt := kp.LeafNode.Lifetime
	p := mls.Policy{Now: time.Unix(int64(lt.NotBefore), 0).Add(24 * time.Hour)}
	if lt.NotAfter-lt.NotBefore > 90*24*3600 {
		p.MaxLifetime = -1
	}
	return p
}

func TestVectorsParse(t *testing.T) {
	for _, v := range loadVectors(t) {
		kp, err := mls.Parse(v.data)
		if err != nil {
			t.Errorf("%s: Parse: %v", v.Source, err)
			continue
		}
		if !kp.Wrapped || kp.WrapperVersion != 1 || kp.WireFormat != 5 {
			t.Errorf("%s: Wrapped=%v version=%d wire_format=%d, want wrapped mls10 key_package",
				v.Source, kp.Wrapped, kp.WrapperVersion, kp.WireFormat)
		}
		if kp.CipherSuite != v.CipherSuite || kp.Version != 1 {
			t.Errorf("%s: version %d suite %d, want 1 and %d", v.Source, kp.Version, kp.CipherSuite, v.CipherSuite)
		}
		if len(kp.Raw) != len(v.data)-4 || &kp.Raw[0] != &v.data[4] {
			t.Errorf("%s: Raw is not data[4:]", v.Source)
		}
		if !bytes.HasPrefix(kp.Raw, kp.TBS) || !bytes.HasSuffix(kp.Raw, kp.Signature) ||
			len(kp.Raw)-len(kp.TBS)-len(kp.Signature) != varintLen(len(kp.Signature)) {
			t.Errorf("%s: TBS is not Raw minus the signature", v.Source)
		}
		if kp.LeafNode.Source != mls.SourceKeyPackage || kp.LeafNode.Credential.Type != mls.CredentialBasic {
			t.Errorf("%s: source %d credential %d", v.Source, kp.LeafNode.Source, kp.LeafNode.Credential.Type)
		}
		if kp.LastResort() || len(kp.Extensions) != 0 {
			t.Errorf("%s: unexpected extensions %v", v.Source, kp.Extensions)
		}
		// The bare form parses to the same KeyPackage.
		bare, err := mls.Parse(v.data[4:])
		if err != nil {
			t.Errorf("%s: Parse(bare): %v", v.Source, err)
			continue
		}
		if bare.Wrapped || !bytes.Equal(bare.Raw, kp.Raw) || !bytes.Equal(bare.TBS, kp.TBS) {
			t.Errorf("%s: bare parse differs", v.Source)
		}
	}
}

func TestVectorsValidate(t *testing.T) {
	ed := 0
	for _, v := range loadVectors(t) {
		kp, err := mls.Parse(v.data)
		if err != nil {
			t.Fatalf("%s: %v", v.Source, err)
		}
		key := kp.LeafNode.SignatureKey
		p := vectorPolicy(kp)
		info, err := mls.Validate(v.data, key, p)
		if !isEd25519Suite(v.CipherSuite) {
			var me *mls.Error
			if !errors.As(err, &me) || me.Rule != mls.RuleCipherSuite {
				t.Errorf("%s (suite %d): err = %v, want rule %s", v.Source, v.CipherSuite, err, mls.RuleCipherSuite)
				continue
			}
			want := "0x000" + strconv.Itoa(int(v.CipherSuite))
			if !strings.Contains(me.Detail, want) || !strings.Contains(me.Detail, "not Ed25519") {
				t.Errorf("%s: detail %q does not name %s and say it is not Ed25519", v.Source, me.Detail, want)
			}
			continue
		}
		ed++
		if err != nil {
			t.Errorf("%s: Validate: %v", v.Source, err)
			continue
		}
		if got := hex.EncodeToString(info.Ref[:]); got != v.ref {
			t.Errorf("%s: Ref %s, want %s", v.Source, got, v.ref)
		}
		if info.CipherSuite != v.CipherSuite || !info.Wrapped || info.LastResort {
			t.Errorf("%s: Info %+v", v.Source, info)
		}
		lt := kp.LeafNode.Lifetime
		if info.NotBefore.Unix() != int64(min(lt.NotBefore, 253402300799)) ||
			info.NotAfter.Unix() != int64(min(lt.NotAfter, 253402300799)) {
			t.Errorf("%s: lifetime %v..%v, want %d..%d", v.Source, info.NotBefore, info.NotAfter, lt.NotBefore, lt.NotAfter)
		}

		// The bare form: same Ref, Wrapped false.
		binfo, err := mls.Validate(v.data[4:], key, p)
		if err != nil {
			t.Errorf("%s: Validate(bare): %v", v.Source, err)
		} else if binfo.Ref != info.Ref || binfo.Wrapped {
			t.Errorf("%s: bare Info %+v vs wrapped %+v", v.Source, binfo, info)
		}
	}
	if ed != 202 {
		t.Errorf("validated %d Ed25519 vectors, want 202", ed)
	}
}

// TestVectorRefsUpstream checks Ref against KeyPackageRefs that upstream
// itself carries: each welcome.json entry's Welcome message names its
// KeyPackage in secrets[0].new_member (mlswg/mls-implementations
// test-vectors/welcome.json at cfd45028). Ref is SHA-256 only, so suites 1,
// 2 and 3.
func TestVectorRefsUpstream(t *testing.T) {
	want := map[string]string{
		"welcome.json[0]": "8e1faada70f08b91ef7f7f79ed1da917d9ce3cea5e5ce22e4a8b10f4311559dd",
		"welcome.json[1]": "e25365e70ce3dc73d96d38ff1969f3488e9999ab81403e26437c9332bf0f878d",
		"welcome.json[2]": "f5c79ed89f7806b7da95df92ff6c760601eceda0d7017b82d69a9df7727d8b43",
	}
	seen := 0
	for _, v := range loadVectors(t) {
		w, ok := want[v.Source]
		if !ok {
			continue
		}
		seen++
		ref := mls.Ref(v.data[4:])
		if got := hex.EncodeToString(ref[:]); got != w {
			t.Errorf("%s: Ref %s, want %s", v.Source, got, w)
		}
	}
	if seen != len(want) {
		t.Errorf("found %d of %d welcome vectors", seen, len(want))
	}
}

// TestVectorsNegativeControl flips one bit of each Ed25519 vector's
// KeyPackageTBS (the first byte of init_key) and, separately, one bit of its
// KeyPackage signature, and expects RuleKeyPackageSignature for both.
func TestVectorsNegativeControl(t *testing.T) {
	for _, v := range loadVectors(t) {
		if !isEd25519Suite(v.CipherSuite) {
			continue
		}
		kp, err := mls.Parse(v.data)
		if err != nil {
			t.Fatal(err)
		}
		p := vectorPolicy(kp)
		key := bytes.Clone(kp.LeafNode.SignatureKey)

		// A bit in init_key: the TBS changes, the structure does not.
		d := bytes.Clone(v.data)
		d[4+4+1] ^= 0x01
		wantRule(t, v.Source+" init_key bit", d, key, p, mls.RuleKeyPackageSignature)

		// A bit in the KeyPackage signature.
		d = bytes.Clone(v.data)
		d[len(d)-1] ^= 0x80
		wantRule(t, v.Source+" signature bit", d, key, p, mls.RuleKeyPackageSignature)
	}
}

// wantRule validates data and checks it fails with rule.
func wantRule(t *testing.T, name string, data, key []byte, p mls.Policy, rule mls.Rule) {
	t.Helper()
	_, err := mls.Validate(data, key, p)
	var me *mls.Error
	if !errors.As(err, &me) {
		t.Errorf("%s: err = %v, want rule %s", name, err, rule)
		return
	}
	if me.Rule != rule {
		t.Errorf("%s: rule %s (%v), want %s", name, me.Rule, err, rule)
	}
}
