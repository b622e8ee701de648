package mls_test

import (
	"testing"

	"github.com/kpnode/kpnode/protocol/ed25519strict"
	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// benchKeyPackage is a bare last-resort 0x004D KeyPackage shaped like the
// chat client's (2.6–2.9 KB).
func benchKeyPackage(b *testing.B) ([]byte, []byte) {
	b.Helper()
	data, signer, err := mlstest.Generate(mlstest.Options{Suite: 0x004D, LastResort: true, Now: testNow})
	if err != nil {
		b.Fatal(err)
	}
	if len(data) < 2600 || len(data) > 2900 {
		b.Fatalf("KeyPackage is %d bytes", len(data))
	}
	return data, pubKey(signer)
}

func reportRate(b *testing.B, unit string) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), unit)
}

func BenchmarkValidate0x004D(b *testing.B) {
	data, key := benchKeyPackage(b)
	p := testPolicy()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := mls.Validate(data, key, p); err != nil {
			b.Fatal(err)
		}
	}
	reportRate(b, "validations/s")
}

// BenchmarkTwoEd25519Verifies is the floor for BenchmarkValidate0x004D:
// the same two ed25519strict.Verify calls over the same SignContent, built
// once outside the loop.
func BenchmarkTwoEd25519Verifies(b *testing.B) {
	data, key := benchKeyPackage(b)
	kp, err := mls.Parse(data)
	if err != nil {
		b.Fatal(err)
	}
	leafMsg := mls.SignContent(mls.LabelLeafNodeTBS, kp.LeafNode.TBS)
	kpMsg := mls.SignContent(mls.LabelKeyPackageTBS, kp.TBS)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if err := ed25519strict.Verify(key, leafMsg, kp.LeafNode.Signature); err != nil {
			b.Fatal(err)
		}
		if err := ed25519strict.Verify(key, kpMsg, kp.Signature); err != nil {
			b.Fatal(err)
		}
	}
	reportRate(b, "pairs/s")
}

func BenchmarkParse0x004D(b *testing.B) {
	data, _ := benchKeyPackage(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := mls.Parse(data); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRef0x004D(b *testing.B) {
	data, _ := benchKeyPackage(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		mls.Ref(data)
	}
}
