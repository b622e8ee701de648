package mls_test

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// fuzzSeeds returns the interop vectors (wrapped and bare) and a few
// generated KeyPackages.
func fuzzSeeds(f *testing.F) [][]byte {
	var seeds [][]byte
	for i, v := range loadVectors(f) {
		// Every tenth messages.json vector is enough; they differ little.
		if i < 7 || i%10 == 0 {
			seeds = append(seeds, v.data, v.data[4:])
		}
	}
	for _, o := range []mlstest.Options{
		{Suite: 0x0001},
		{Suite: 0x0003, LastResort: true, Wrapped: true},
		{Suite: 0x004D, LastResort: true},
		{Suite: 0x004D, Wrapped: true},
	} {
		o.Now = testNow
		data, _, err := mlstest.Generate(o)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, data)
	}
	return seeds
}

// parseRules are the rules Parse may report.
var parseRules = map[mls.Rule]bool{
	mls.RuleMalformed: true, mls.RuleNonMinimalLength: true, mls.RuleTrailingBytes: true, mls.RuleLeafSource: true,
}

func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		kp, err := mls.Parse(data)
		if err != nil {
			var me *mls.Error
			if !errors.As(err, &me) || !parseRules[me.Rule] || me.Detail == "" {
				t.Fatalf("Parse error %v (%T) is not an *Error with a parse rule and a detail", err, err)
			}
			return
		}
		checkParsed(t, data, kp)
	})
}

// checkParsed checks the invariants of a successful Parse.
func checkParsed(t *testing.T, data []byte, kp *mls.KeyPackage) {
	t.Helper()
	off := 0
	if kp.Wrapped {
		off = 4
	}
	if len(kp.Raw) != len(data)-off || len(kp.Raw) == 0 || &kp.Raw[0] != &data[off] {
		t.Fatalf("Raw is not data[%d:] (wrapped=%v)", off, kp.Wrapped)
	}
	if len(kp.TBS) == 0 || &kp.TBS[0] != &kp.Raw[0] || len(kp.TBS) >= len(kp.Raw) {
		t.Fatal("TBS is not a proper prefix of Raw")
	}
	if !bytes.HasSuffix(kp.Raw, kp.Signature) {
		t.Fatal("Signature is not a suffix of Raw")
	}
	ln := kp.LeafNode
	leafAt := 4 + varintLen(len(kp.InitKey)) + len(kp.InitKey)
	if len(ln.TBS) == 0 || &ln.TBS[0] != &kp.TBS[leafAt] || leafAt+len(ln.TBS) > len(kp.TBS) {
		t.Fatal("LeafNode.TBS does not follow init_key inside TBS")
	}
	if ln.Source != mls.SourceKeyPackage && ln.Source != mls.SourceUpdate && ln.Source != mls.SourceCommit {
		t.Fatalf("Parse accepted leaf source %d", ln.Source)
	}
	if c := ln.Credential.Type; c != mls.CredentialBasic && c != mls.CredentialX509 {
		t.Fatalf("Parse accepted credential type %d", c)
	}
	if kp.Wrapped && (kp.WrapperVersion != uint16(data[0])<<8|uint16(data[1]) || kp.WireFormat != uint16(data[2])<<8|uint16(data[3])) {
		t.Fatal("wrapper fields do not match the header")
	}
	// The bare KeyPackage parses on its own.
	if _, err := mls.Parse(kp.Raw); err != nil {
		t.Fatalf("Raw does not parse: %v", err)
	}
}

func FuzzValidate(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		now := testNow.Unix()
		if kp, err := mls.Parse(s); err == nil {
			if nb := kp.LeafNode.Lifetime.NotBefore; nb < 1<<40 && kp.LeafNode.Lifetime.NotAfter != 1<<64-1 {
				now = int64(nb) + 86400
			}
		}
		f.Add(s, now, uint8(1))
	}
	f.Fuzz(func(t *testing.T, data []byte, now int64, flags uint8) {
		// Keep Now within years 1970..9999.
		now = max(0, now%253402300799)
		p := mls.Policy{Now: time.Unix(now, 0)}
		if flags&1 != 0 {
			p.MaxLifetime = -1
		}
		if flags&2 != 0 {
			p.ClockSkew = -1
		}
		var key []byte
		kp, perr := mls.Parse(data)
		if perr == nil {
			key = kp.LeafNode.SignatureKey
			if flags&4 != 0 {
				key = bytes.Clone(key)
				if len(key) > 0 {
					key[0] ^= 1
				}
			}
		}
		info, err := mls.Validate(data, key, p)
		if err != nil {
			var me *mls.Error
			if !errors.As(err, &me) || me.Detail == "" {
				t.Fatalf("Validate error %v (%T) is not an *Error with a detail", err, err)
			}
			if perr != nil && me.Rule != perr.(*mls.Error).Rule {
				t.Fatalf("Validate rule %s, Parse rule %s", me.Rule, perr.(*mls.Error).Rule)
			}
			return
		}
		if perr != nil {
			t.Fatalf("Validate accepted what Parse rejected: %v", perr)
		}
		checkParsed(t, data, kp)
		if info.Ref != mls.Ref(kp.Raw) || info.Wrapped != kp.Wrapped || info.CipherSuite != kp.CipherSuite {
			t.Fatalf("Info %+v disagrees with the parse", info)
		}
		if _, ok := mls.HPKEKeySize(kp.CipherSuite); !ok || kp.Version != 1 || kp.LeafNode.Source != mls.SourceKeyPackage ||
			len(kp.LeafNode.SignatureKey) != 32 || bytes.Equal(kp.InitKey, kp.LeafNode.EncryptionKey) {
			t.Fatal("Validate accepted a KeyPackage that breaks a rule")
		}
		if lt := kp.LeafNode.Lifetime; lt.NotAfter < lt.NotBefore {
			t.Fatal("accepted an inverted lifetime")
		}
	})
}
