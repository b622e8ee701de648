package mls_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"filippo.io/edwards25519"

	"github.com/kpnode/kpnode/protocol/ed25519strict"
	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// testNow is the fixed clock of these tests.
var testNow = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

func testPolicy() mls.Policy { return mls.Policy{Now: testNow} }

func newBuilder(t testing.TB, o mlstest.Options) *mlstest.Builder {
	t.Helper()
	if o.Now.IsZero() {
		o.Now = testNow
	}
	b, err := mlstest.NewBuilder(o)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func encode(t testing.TB, b *mlstest.Builder) []byte {
	t.Helper()
	data, err := b.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func pubKey(k ed25519.PrivateKey) []byte { return k.Public().(ed25519.PublicKey) }

func TestGenerated(t *testing.T) {
	for _, suite := range []uint16{0x0001, 0x0003, 0x004D} {
		for _, lastResort := range []bool{false, true} {
			for _, wrapped := range []bool{false, true} {
				name := fmt.Sprintf("suite=0x%04x/last_resort=%v/wrapped=%v", suite, lastResort, wrapped)
				t.Run(name, func(t *testing.T) {
					data, signer, err := mlstest.Generate(mlstest.Options{
						Suite: suite, LastResort: lastResort, Wrapped: wrapped, Now: testNow,
					})
					if err != nil {
						t.Fatal(err)
					}
					info, err := mls.Validate(data, pubKey(signer), testPolicy())
					if err != nil {
						t.Fatal(err)
					}
					if info.LastResort != lastResort || info.Wrapped != wrapped || info.CipherSuite != suite {
						t.Errorf("Info %+v", info)
					}
					bare := data
					if wrapped {
						bare = data[4:]
					}
					if info.Ref != mls.Ref(bare) {
						t.Error("Info.Ref is not Ref(bare)")
					}
					if want := testNow.Add(-time.Hour); !info.NotBefore.Equal(want) {
						t.Errorf("NotBefore %v, want %v", info.NotBefore, want)
					}
					if want := testNow.Add(84 * 24 * time.Hour); !info.NotAfter.Equal(want) {
						t.Errorf("NotAfter %v, want %v", info.NotAfter, want)
					}
					if suite == 0x004D && lastResort && !wrapped && (len(data) < 2600 || len(data) > 2900) {
						t.Errorf("0x004D last-resort KeyPackage is %d bytes, want 2600..2900", len(data))
					}
				})
			}
		}
	}
}

func TestBareAndWrapped(t *testing.T) {
	b := newBuilder(t, mlstest.Options{Suite: 0x004D, LastResort: true})
	bare := encode(t, b)
	b.Wrapped = true
	wrapped := encode(t, b)
	if !bytes.Equal(wrapped[4:], bare) || !bytes.Equal(wrapped[:4], []byte{0, 1, 0, 5}) {
		t.Fatal("wrapped form is not 00 01 00 05 ‖ bare")
	}
	key := pubKey(b.Signer)
	bi, err := mls.Validate(bare, key, testPolicy())
	if err != nil {
		t.Fatal(err)
	}
	wi, err := mls.Validate(wrapped, key, testPolicy())
	if err != nil {
		t.Fatal(err)
	}
	if bi.Ref != wi.Ref || bi.Wrapped || !wi.Wrapped || !bi.LastResort || !wi.LastResort {
		t.Errorf("bare %+v, wrapped %+v", bi, wi)
	}
}

// mutation builds a KeyPackage that is valid except for one thing.
type mutation struct {
	name  string
	suite uint16                                  // zero: 0x0001
	edit  func(b *mlstest.Builder)                // applied before Encode
	bytes func(t *testing.T, data []byte) []byte  // applied after Encode
	key   func(b *mlstest.Builder) []byte         // device key; nil: the signer's
	pol   func(p *mls.Policy)                     // nil: testPolicy()
	rule  mls.Rule                                // "": must validate
	check func(t *testing.T, err error, d []byte) // extra checks
}

func flipFirst(sig []byte) []byte { sig[0] ^= 0x01; return sig }

// replaceAt returns data with n bytes at off replaced by repl.
func replaceAt(data []byte, off, n int, repl ...byte) []byte {
	out := append([]byte(nil), data[:off]...)
	out = append(out, repl...)
	return append(out, data[off+n:]...)
}

func notPoint(t *testing.T) []byte {
	for i := 0; ; i++ {
		k := make([]byte, 32)
		k[0] = byte(i)
		k[1] = 0x5a
		if _, err := new(edwards25519.Point).SetBytes(k); err != nil {
			return k
		}
	}
}

func selfSigned(t *testing.T, pub ed25519.PublicKey, priv ed25519.PrivateKey) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "device"},
		NotBefore:    testNow.Add(-time.Hour),
		NotAfter:     testNow.Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestMutations(t *testing.T) {
	other, otherPriv, _ := ed25519.GenerateKey(rand.Reader)
	days := func(n int) uint64 { return uint64(testNow.Add(time.Duration(n) * 24 * time.Hour).Unix()) }
	now := uint64(testNow.Unix())

	tests := []mutation{
		{name: "valid", rule: ""},
		{name: "valid 0x004D", suite: 0x004D, rule: ""},
		{name: "valid wrapped", edit: func(b *mlstest.Builder) { b.Wrapped = true }},

		// Parse.
		{name: "truncated by one byte", bytes: func(_ *testing.T, d []byte) []byte { return d[:len(d)-1] },
			rule: mls.RuleMalformed},
		{name: "truncated wrapped", edit: func(b *mlstest.Builder) { b.Wrapped = true },
			bytes: func(_ *testing.T, d []byte) []byte { return d[:len(d)-10] }, rule: mls.RuleMalformed},
		{name: "empty input", bytes: func(*testing.T, []byte) []byte { return nil }, rule: mls.RuleMalformed},
		{name: "varint prefix 0b11", bytes: func(t *testing.T, d []byte) []byte {
			if d[4] != 0x20 {
				t.Fatalf("init_key length byte is %#x", d[4])
			}
			return replaceAt(d, 4, 1, 0xc0, 0x20)
		}, rule: mls.RuleMalformed},
		{name: "non-minimal 2-byte length", bytes: func(_ *testing.T, d []byte) []byte {
			return replaceAt(d, 4, 1, 0x40, 0x20) // init_key length 32 as 2 bytes
		}, rule: mls.RuleNonMinimalLength},
		{name: "non-minimal 4-byte length", suite: 0x004D, bytes: func(t *testing.T, d []byte) []byte {
			if d[4] != 0x44 || d[5] != 0xc0 {
				t.Fatalf("init_key length is %x", d[4:6])
			}
			return replaceAt(d, 4, 2, 0x80, 0x00, 0x04, 0xc0) // 1216 as 4 bytes
		}, rule: mls.RuleNonMinimalLength},
		{name: "trailing byte", bytes: func(_ *testing.T, d []byte) []byte { return append(d, 0) },
			rule: mls.RuleTrailingBytes},
		{name: "trailing byte wrapped", edit: func(b *mlstest.Builder) { b.Wrapped = true },
			bytes: func(_ *testing.T, d []byte) []byte { return append(d, 0) }, rule: mls.RuleTrailingBytes,
			check: func(t *testing.T, err error, d []byte) {
				// Offsets count from the start of the input, header included.
				detailContains(fmt.Sprintf("ends at byte %d", len(d)-1))(t, err, d)
			}},
		{name: "unknown credential type", edit: func(b *mlstest.Builder) { b.CredentialType = 3 },
			rule: mls.RuleMalformed},
		{name: "undefined leaf source", edit: func(b *mlstest.Builder) { b.Source = 7 }, rule: mls.RuleLeafSource},

		// Version.
		{name: "unknown version", edit: func(b *mlstest.Builder) { b.Version = 2 }, rule: mls.RuleVersion},
		{name: "wrapper version differs", edit: func(b *mlstest.Builder) { b.Wrapped, b.WrapperVersion = true, 2 },
			rule: mls.RuleVersion},
		{name: "wrapper wire_format welcome", edit: func(b *mlstest.Builder) { b.Wrapped, b.WireFormat = true, 3 },
			rule: mls.RuleVersion},

		// Cipher suite.
		{name: "suite 0x0002", edit: func(b *mlstest.Builder) { b.CipherSuite = 2 }, rule: mls.RuleCipherSuite,
			check: detailContains("0x0002", "not Ed25519")},
		{name: "suite 0x0004", edit: func(b *mlstest.Builder) { b.CipherSuite = 4 }, rule: mls.RuleCipherSuite,
			check: detailContains("0x0004", "Ed448")},
		{name: "unknown suite", edit: func(b *mlstest.Builder) { b.CipherSuite = 0x1234 }, rule: mls.RuleCipherSuite,
			check: detailContains("0x1234", "unknown")},

		// Key sizes.
		{name: "signature_key 31 bytes", edit: func(b *mlstest.Builder) { b.SignatureKey = b.SignatureKey[:31] },
			rule: mls.RuleKeySize},
		{name: "init_key 33 bytes", edit: func(b *mlstest.Builder) { b.InitKey = append(b.InitKey, 0) },
			rule: mls.RuleKeySize},
		{name: "X25519 key in 0x004D", suite: 0x004D, edit: func(b *mlstest.Builder) { b.EncryptionKey = b.EncryptionKey[1184:] },
			rule: mls.RuleKeySize, check: detailContains("1216")},

		// Leaf source.
		{name: "leaf source update", edit: func(b *mlstest.Builder) { b.Source = 2 }, rule: mls.RuleLeafSource},
		{name: "leaf source commit", edit: func(b *mlstest.Builder) { b.Source, b.ParentHash = 3, make([]byte, 32) },
			rule: mls.RuleLeafSource},

		// Device key.
		{name: "wrong device key", key: func(*mlstest.Builder) []byte { return other }, rule: mls.RuleSignatureKey},
		{name: "no device key", key: func(*mlstest.Builder) []byte { return nil }, rule: mls.RuleSignatureKey},
		{name: "leaf signed by another key", edit: func(b *mlstest.Builder) { b.Signer = otherPriv },
			key: func(b *mlstest.Builder) []byte { return b.SignatureKey }, rule: mls.RuleLeafSignature, check: wraps(ed25519strict.ErrVerify)},

		// Signatures.
		{name: "leaf signature bit", edit: func(b *mlstest.Builder) { b.TamperLeafSignature = flipFirst },
			rule: mls.RuleLeafSignature, check: wraps(ed25519strict.ErrVerify)},
		{name: "leaf signature 63 bytes", edit: func(b *mlstest.Builder) {
			b.TamperLeafSignature = func(s []byte) []byte { return s[:63] }
		}, rule: mls.RuleLeafSignature, check: wraps(ed25519strict.ErrSignatureSize)},
		{name: "signature_key not a point", edit: func(b *mlstest.Builder) { b.SignatureKey = notPoint(t) },
			key: func(b *mlstest.Builder) []byte { return b.SignatureKey }, rule: mls.RuleLeafSignature,
			check: wraps(ed25519strict.ErrNotPoint)},
		{name: "keypackage signature bit", edit: func(b *mlstest.Builder) { b.TamperKeyPackageSignature = flipFirst },
			rule: mls.RuleKeyPackageSignature, check: wraps(ed25519strict.ErrVerify)},
		{name: "keypackage signature bit 0x004D", suite: 0x004D,
			bytes: func(_ *testing.T, d []byte) []byte { d[len(d)-40] ^= 0x10; return d },
			rule:  mls.RuleKeyPackageSignature},

		// init_key reuse.
		{name: "init_key equals encryption_key", edit: func(b *mlstest.Builder) { b.InitKey = b.EncryptionKey },
			rule: mls.RuleInitKeyReuse},

		// Lifetime.
		{name: "expired", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = days(-60), days(-1) },
			rule: mls.RuleExpired, check: detailContains("lifetime ended 2026-04-30T12:00:00Z")},
		{name: "not yet valid", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = days(1), days(30) },
			rule: mls.RuleNotYetValid},
		{name: "lifetime too long", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = days(-1), days(90) },
			rule: mls.RuleLifetimeTooLong},
		{name: "lifetime exactly 90 days", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = days(-1), days(89) }},
		{name: "lifetime 0..2^64-1", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = 0, 1<<64-1 },
			rule: mls.RuleLifetimeTooLong},
		{name: "lifetime 0..2^64-1 unlimited", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = 0, 1<<64-1 },
			pol: func(p *mls.Policy) { p.MaxLifetime = -1 }},
		{name: "not_before 2^64-1", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = 1<<64-1, 1<<64-1 },
			rule: mls.RuleNotYetValid},
		{name: "not_after before not_before", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = now, now-1 },
			rule: mls.RuleExpired, check: detailContains("before it starts")},
		{name: "zero skew", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = days(-1), now-1 },
			rule: mls.RuleExpired, pol: func(p *mls.Policy) { p.ClockSkew = -1 }, check: detailContains("minus 0s")},
		{name: "expired inside skew", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = days(-30), now-240 }},
		{name: "expired outside skew", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = days(-30), now-360 },
			rule: mls.RuleExpired},
		{name: "starts inside skew", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = now+240, days(30) }},
		{name: "starts outside skew", edit: func(b *mlstest.Builder) { b.NotBefore, b.NotAfter = now+360, days(30) },
			rule: mls.RuleNotYetValid},
		{name: "custom max lifetime", pol: func(p *mls.Policy) { p.MaxLifetime = 30 * 24 * time.Hour },
			rule: mls.RuleLifetimeTooLong},

		// Credential.
		{name: "x509 matching key", edit: func(b *mlstest.Builder) {
			b.CredentialType, b.Certificates = 2, [][]byte{selfSigned(t, b.Signer.Public().(ed25519.PublicKey), b.Signer)}
		}},
		{name: "x509 other key", edit: func(b *mlstest.Builder) {
			b.CredentialType, b.Certificates = 2, [][]byte{selfSigned(t, other, otherPriv)}
		}, rule: mls.RuleCredential},
		{name: "x509 empty chain", edit: func(b *mlstest.Builder) { b.CredentialType, b.Certificates = 2, nil },
			rule: mls.RuleCredential},
		{name: "x509 garbage", edit: func(b *mlstest.Builder) { b.CredentialType, b.Certificates = 2, [][]byte{{0x30, 0}} },
			rule: mls.RuleCredential},
		{name: "basic empty identity", edit: func(b *mlstest.Builder) { b.Identity = []byte{} }},

		// Extensions and capabilities.
		{name: "unlisted KeyPackage extension", edit: func(b *mlstest.Builder) {
			b.Extensions = append(b.Extensions, mlstest.Extension{Type: 0x1234})
		}, rule: mls.RuleUnsupportedExtension, check: detailContains("0x1234")},
		{name: "unlisted leaf extension", edit: func(b *mlstest.Builder) {
			b.LeafExtensions = []mlstest.Extension{{Type: 0xFF02, Data: []byte{1}}}
		}, rule: mls.RuleUnsupportedExtension},
		{name: "listed leaf extension", edit: func(b *mlstest.Builder) {
			b.LeafExtensions = []mlstest.Extension{{Type: 0xFF01, Data: []byte{1, 2}}}
		}},
		{name: "default extension types", edit: func(b *mlstest.Builder) {
			b.ExtensionTypes = nil
			b.LeafExtensions = []mlstest.Extension{{Type: 0x0001, Data: []byte("app")}}
			b.Extensions = []mlstest.Extension{{Type: 0x0005}}
		}},
		{name: "GREASE everywhere", edit: func(b *mlstest.Builder) {
			b.ExtensionTypes = append(b.ExtensionTypes, 0x2A2A)
			b.CipherSuites = append(b.CipherSuites, 0x3A3A)
			b.ProposalTypes = []uint16{0x4A4A}
			b.CredentialTypes = append(b.CredentialTypes, 0x5A5A)
			b.LeafExtensions = []mlstest.Extension{{Type: 0x6A6A, Data: []byte{0xff}}}
			b.Extensions = []mlstest.Extension{{Type: 0xEAEA, Data: []byte("grease")}}
		}},
		{name: "last_resort unlisted", edit: func(b *mlstest.Builder) {
			b.ExtensionTypes = []uint16{0x0001}
			b.Extensions = []mlstest.Extension{{Type: 0x000A}}
		}, rule: mls.RuleUnsupportedExtension},
		{name: "capabilities listing defaults", edit: func(b *mlstest.Builder) {
			b.ProposalTypes = []uint16{1, 2, 3, 4, 5, 7}
			b.CipherSuites = []uint16{1, 2, 3}
			b.CredentialTypes = []uint16{1, 2}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			suite := tc.suite
			if suite == 0 {
				suite = 0x0001
			}
			b := newBuilder(t, mlstest.Options{Suite: suite})
			if tc.edit != nil {
				tc.edit(b)
			}
			data := encode(t, b)
			if tc.bytes != nil {
				data = tc.bytes(t, data)
			}
			key := pubKey(b.Signer)
			if tc.key != nil {
				key = tc.key(b)
			}
			p := testPolicy()
			if tc.pol != nil {
				tc.pol(&p)
			}
			info, err := mls.Validate(data, key, p)
			if tc.rule == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				if info.Ref == ([32]byte{}) {
					t.Error("zero Ref")
				}
				return
			}
			var me *mls.Error
			if !errors.As(err, &me) {
				t.Fatalf("err = %v (%T), want an *mls.Error with rule %s", err, err, tc.rule)
			}
			if me.Rule != tc.rule {
				t.Fatalf("rule %s, want %s (%v)", me.Rule, tc.rule, err)
			}
			if !errors.Is(err, tc.rule) || !errors.Is(err, &mls.Error{Rule: tc.rule}) {
				t.Error("errors.Is does not match the rule")
			}
			if want := "mls: " + string(tc.rule) + ": "; !strings.HasPrefix(err.Error(), want) || me.Detail == "" {
				t.Errorf("Error() = %q, want prefix %q and a detail", err, want)
			}
			if tc.check != nil {
				tc.check(t, err, data)
			}
			t.Log(err)
		})
	}
}

func detailContains(subs ...string) func(*testing.T, error, []byte) {
	return func(t *testing.T, err error, _ []byte) {
		t.Helper()
		for _, s := range subs {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error %q does not contain %q", err, s)
			}
		}
	}
}

func wraps(target error) func(*testing.T, error, []byte) {
	return func(t *testing.T, err error, _ []byte) {
		t.Helper()
		if !errors.Is(err, target) {
			t.Errorf("error %v does not wrap %v", err, target)
		}
	}
}

// TestTruncations checks that every strict prefix of a valid KeyPackage,
// bare and wrapped, is rejected by Parse.
func TestTruncations(t *testing.T) {
	for _, wrapped := range []bool{false, true} {
		data, _, err := mlstest.Generate(mlstest.Options{Suite: 0x0001, LastResort: true, Wrapped: wrapped, Now: testNow})
		if err != nil {
			t.Fatal(err)
		}
		for n := range len(data) {
			kp, err := mls.Parse(data[:n])
			if err == nil {
				t.Fatalf("wrapped=%v: prefix of %d/%d bytes parsed: %+v", wrapped, n, len(data), kp)
			}
		}
	}
}

func TestErrorIs(t *testing.T) {
	err := error(&mls.Error{Rule: mls.RuleExpired, Detail: "x"})
	if !errors.Is(err, mls.RuleExpired) || errors.Is(err, mls.RuleVersion) {
		t.Error("errors.Is with a Rule")
	}
	if !errors.Is(err, &mls.Error{Rule: mls.RuleExpired}) || errors.Is(err, &mls.Error{Rule: mls.RuleVersion}) {
		t.Error("errors.Is with an *Error")
	}
	if got := fmt.Sprint(mls.RuleExpired); got != "lifetime_expired" {
		t.Errorf("a Rule prints as %q", got)
	}
	if got, want := err.Error(), "mls: lifetime_expired: x"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	wrapped := fmt.Errorf("bundle: %w", err)
	var me *mls.Error
	if !errors.As(wrapped, &me) || me.Rule != mls.RuleExpired {
		t.Error("errors.As through a wrapper")
	}
	seen := map[mls.Rule]bool{}
	for _, r := range mls.Rules() {
		if seen[r] || r == "" || strings.ToLower(string(r)) != string(r) || strings.ContainsAny(string(r), " -.") {
			t.Errorf("rule %q is duplicated or not snake_case", r)
		}
		seen[r] = true
	}
}

func TestPolicyNowRequired(t *testing.T) {
	data, signer, err := mlstest.Generate(mlstest.Options{Suite: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if recover() == nil {
			t.Error("Validate with a zero Policy.Now did not panic")
		}
	}()
	mls.Validate(data, pubKey(signer), mls.Policy{})
}

func TestInfoClampsLifetime(t *testing.T) {
	b := newBuilder(t, mlstest.Options{Suite: 1})
	b.NotBefore, b.NotAfter = 0, 1<<64-1
	info, err := mls.Validate(encode(t, b), pubKey(b.Signer), mls.Policy{Now: testNow, MaxLifetime: -1})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := info.NotBefore, time.Unix(0, 0).UTC(); !got.Equal(want) {
		t.Errorf("NotBefore %v, want %v", got, want)
	}
	if got, want := info.NotAfter, time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC); !got.Equal(want) {
		t.Errorf("NotAfter %v, want %v", got, want)
	}
}
