package protocol

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"testing"
	"time"
)

// noticeNow is the clock of the notice tests; noticeTS a timestamp valid at it.
var (
	noticeNow = time.UnixMilli(1_800_000_000_000)
	noticeTS  = uint64(1_800_000_000_000 - 1000)
)

func refN(n int) Ref {
	var r Ref
	binary.BigEndian.PutUint32(r[:], uint32(n)+1)
	r[31] = 0xAA
	return r
}

func refsN(n int) []Ref {
	out := make([]Ref, n)
	for i := range out {
		out[i] = refN(i)
	}
	return out
}

// signConsumePayload signs any payload as a consume notice of dev.
func signConsumePayload(dev ed25519.PrivateKey, payload []byte) ConsumeNotice {
	n := ConsumeNotice{Payload: payload}
	copy(n.DeviceID[:], dev.Public().(ed25519.PublicKey))
	copy(n.Signature[:], ed25519.Sign(dev, payload))
	return n
}

func signClaimPayload(node ed25519.PrivateKey, payload []byte) ClaimNotice {
	n := ClaimNotice{Payload: payload}
	copy(n.NodeKey[:], node.Public().(ed25519.PublicKey))
	copy(n.Signature[:], ed25519.Sign(node, payload))
	return n
}

func wantRule(t *testing.T, err error, rule Rule) *ValidationError {
	t.Helper()
	var ve *ValidationError
	if !errors.As(err, &ve) || ve.Rule != rule {
		t.Fatalf("got %v, want rule %s", err, rule)
	}
	return ve
}

// A signed consume notice validates to its timestamp, its refs in payload
// order and the SHA-256 of its payload; the payload is the documented
// layout byte for byte; 1 and 256 refs are the bounds.
func TestConsumeRoundTrip(t *testing.T) {
	p := DefaultPolicy()
	dev := seedKey(1)
	for _, n := range []int{1, 2, MaxConsumeRefs} {
		refs := refsN(n)
		c := SignConsume(dev, noticeTS, refs)
		want := []byte("kpnode:consume:v1\x00")
		want = binary.LittleEndian.AppendUint64(want, noticeTS)
		want = binary.LittleEndian.AppendUint16(want, uint16(n))
		for _, r := range refs {
			want = append(want, r[:]...)
		}
		if !bytes.Equal(c.Payload, want) {
			t.Fatalf("%d refs: payload is not the documented layout", n)
		}
		info, err := p.ValidateConsume(&c, noticeNow)
		if err != nil {
			t.Fatalf("%d refs: %v", n, err)
		}
		if info.TimestampMS != noticeTS || len(info.Refs) != n || info.Refs[0] != refs[0] || info.Refs[n-1] != refs[n-1] || info.Hash != sha256.Sum256(c.Payload) {
			t.Fatalf("%d refs: info %+v", n, info)
		}
	}
	if MaxConsumePayloadSize != 8220 || ClaimPayloadSize != 88 {
		t.Fatalf("sizes %d %d", MaxConsumePayloadSize, ClaimPayloadSize)
	}
}

// Every consume rule, in the order ValidateConsume applies them: size
// (before any signature work: a garbage signature still says too large),
// key a point, strict signature (small-order key included), layout (count
// 0, count over 256, truncated, trailing bytes, a ref twice, wrong domain,
// short header), timestamp window.
func TestValidateConsumeRules(t *testing.T) {
	p := DefaultPolicy()
	dev := seedKey(1)
	withCount := func(count uint16, refs int) []byte {
		b := ConsumePayload(noticeTS, refsN(refs))
		binary.LittleEndian.PutUint16(b[len(ConsumeDomain)+8:], count)
		return b
	}
	tooLarge := ConsumeNotice{Payload: make([]byte, MaxConsumePayloadSize+1)} // zero key, zero signature
	notPoint := SignConsume(dev, noticeTS, refsN(1))
	notPoint.DeviceID = Key{2}
	wrongSig := SignConsume(dev, noticeTS, refsN(1))
	wrongSig.Signature[0] ^= 1
	// A small-order key (the identity) with the signature R = identity,
	// S = 0, which cofactored or lax verifiers accept for any message.
	smallOrder := ConsumeNotice{DeviceID: Key{1}, Payload: ConsumePayload(noticeTS, refsN(1))}
	smallOrder.Signature[0] = 1
	wrongDomain := ConsumePayload(noticeTS, refsN(1))
	wrongDomain[len("kpnode:consume:v")] = '2'
	for _, tc := range []struct {
		name string
		n    ConsumeNotice
		rule Rule
		text string // the ValidationError text, "" for any
	}{
		{"too large", tooLarge, RuleConsumeTooLarge, "payload: 8221 bytes is larger than a consume notice of 256 refs (8220 bytes)"},
		{"257 refs", signConsumePayload(dev, withCount(257, 257)), RuleConsumeTooLarge, ""},
		{"key not a point", notPoint, RuleKeyNotPoint, "device_id: not a valid ed25519 key"},
		{"wrong signature", wrongSig, RuleSignature, "signature: verification failed"},
		{"small-order key", smallOrder, RuleSignature, "signature: verification failed"},
		{"count 0", signConsumePayload(dev, withCount(0, 0)), RuleConsumeLayout, "payload: consume count 0 is not between 1 and 256"},
		{"count 257 with 1 ref", signConsumePayload(dev, withCount(257, 1)), RuleConsumeLayout, "payload: consume count 257 is not between 1 and 256"},
		{"truncated", signConsumePayload(dev, withCount(2, 1)), RuleConsumeLayout, "payload: consume payload of 2 refs must be 92 bytes, got 60"},
		{"truncated ref", signConsumePayload(dev, withCount(1, 1)[:59]), RuleConsumeLayout, "payload: consume payload of 1 refs must be 60 bytes, got 59"},
		{"trailing byte", signConsumePayload(dev, append(withCount(1, 1), 0)), RuleConsumeLayout, ""},
		{"ref twice", SignConsume(dev, noticeTS, []Ref{refN(0), refN(1), refN(0)}), RuleConsumeLayout, "payload: consume payload names ref " + refN(0).String() + " twice"},
		{"wrong domain", signConsumePayload(dev, wrongDomain), RuleConsumeLayout, ""},
		{"header only domain", signConsumePayload(dev, []byte(ConsumeDomain)), RuleConsumeLayout, ""},
		{"empty", signConsumePayload(dev, nil), RuleConsumeLayout, ""},
		{"future", SignConsume(dev, uint64(noticeNow.UnixMilli())+uint64(DefaultClockSkew.Milliseconds())+1, refsN(1)), RuleTimestampFuture, ""},
		{"past retention", SignConsume(dev, uint64(noticeNow.Add(-DefaultRetention).UnixMilli())-1, refsN(1)), RuleTimestampExpired, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.ValidateConsume(&tc.n, noticeNow)
			ve := wantRule(t, err, tc.rule)
			if tc.text != "" && ve.Error() != tc.text {
				t.Fatalf("text %q, want %q", ve.Error(), tc.text)
			}
		})
	}
	// The window's edges are inside.
	for _, ts := range []uint64{uint64(noticeNow.UnixMilli()) + uint64(DefaultClockSkew.Milliseconds()), uint64(noticeNow.Add(-DefaultRetention).UnixMilli())} {
		c := SignConsume(dev, ts, refsN(1))
		if _, err := p.ValidateConsume(&c, noticeNow); err != nil {
			t.Fatalf("timestamp %d: %v", ts, err)
		}
	}
}

// A claim notice validates to its fields and SHA-256(node_key ‖ payload);
// the payload is the documented 88 bytes.
func TestClaimRoundTrip(t *testing.T) {
	node := seedKey(3)
	dev := Key{9, 9, 9}
	ref := refN(7)
	c := SignClaim(node, noticeTS, dev, ref)
	want := binary.LittleEndian.AppendUint64([]byte("kpnode:claim:v1\x00"), noticeTS)
	want = append(append(want, dev[:]...), ref[:]...)
	if !bytes.Equal(c.Payload, want) || len(c.Payload) != 88 {
		t.Fatal("payload is not the documented layout")
	}
	info, err := DefaultPolicy().ValidateClaim(&c, noticeNow)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(append(c.NodeKey[:], c.Payload...))
	if info.TimestampMS != noticeTS || info.DeviceID != dev || info.Ref != ref || info.Hash != h || ClaimHash(&c) != h {
		t.Fatalf("info %+v", info)
	}
}

// Every claim rule in order: exact length before any signature work, key a
// point, strict signature (small-order key included), layout (domain),
// timestamp window.
func TestValidateClaimRules(t *testing.T) {
	p := DefaultPolicy()
	node := seedKey(3)
	good := SignClaim(node, noticeTS, Key{1}, refN(0))
	notPoint := good
	notPoint.NodeKey = Key{2}
	wrongSig := good
	wrongSig.Signature[63] ^= 1
	smallOrder := ClaimNotice{NodeKey: Key{1}, Payload: good.Payload}
	smallOrder.Signature[0] = 1
	otherDomain := bytes.Clone(good.Payload)
	otherDomain[len("kpnode:claim:v")] = '2'
	consumeDomain := append([]byte(ConsumeDomain), good.Payload[len(ClaimDomain)+2:]...) // 88 bytes, the consume domain
	for _, tc := range []struct {
		name string
		n    ClaimNotice
		rule Rule
		text string
	}{
		{"87 bytes", ClaimNotice{Payload: good.Payload[:87]}, RuleClaimNoticeLength, "payload: claim notice payload must be 88 bytes, got 87"},
		{"89 bytes", ClaimNotice{Payload: append(bytes.Clone(good.Payload), 0)}, RuleClaimNoticeLength, ""},
		{"empty", ClaimNotice{}, RuleClaimNoticeLength, ""},
		{"key not a point", notPoint, RuleKeyNotPoint, "node_key: not a valid ed25519 key"},
		{"wrong signature", wrongSig, RuleSignature, "signature: verification failed"},
		{"small-order key", smallOrder, RuleSignature, ""},
		{"wrong domain", signClaimPayload(node, otherDomain), RuleClaimLayout, ""},
		{"consume domain", signClaimPayload(node, consumeDomain), RuleClaimLayout, ""},
		{"future", SignClaim(node, uint64(noticeNow.UnixMilli())+uint64(DefaultClockSkew.Milliseconds())+1, Key{1}, refN(0)), RuleTimestampFuture, ""},
		{"past retention", SignClaim(node, 1, Key{1}, refN(0)), RuleTimestampExpired, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.ValidateClaim(&tc.n, noticeNow)
			ve := wantRule(t, err, tc.rule)
			if tc.text != "" && ve.Error() != tc.text {
				t.Fatalf("text %q, want %q", ve.Error(), tc.text)
			}
		})
	}
	if len(consumeDomain) != ClaimPayloadSize {
		t.Fatalf("consume-domain claim of %d bytes", len(consumeDomain))
	}
}

// ClaimWins: the earlier timestamp wins whatever the hashes; at equal
// timestamps the smaller hash; a claim never wins over itself; of two
// distinct claims exactly one wins.
func TestClaimWins(t *testing.T) {
	lo, hi := [32]byte{1}, [32]byte{2}
	early := ClaimInfo{TimestampMS: 10, Hash: hi}
	late := ClaimInfo{TimestampMS: 11, Hash: lo}
	if !ClaimWins(early, late) || ClaimWins(late, early) {
		t.Fatal("the earlier claim does not win")
	}
	a, b := ClaimInfo{TimestampMS: 10, Hash: lo}, ClaimInfo{TimestampMS: 10, Hash: hi}
	if !ClaimWins(a, b) || ClaimWins(b, a) {
		t.Fatal("at equal timestamps the smaller hash does not win")
	}
	if ClaimWins(a, a) {
		t.Fatal("a claim wins over itself")
	}
	// From real notices: the order is total on distinct claims.
	n1 := SignClaim(seedKey(3), noticeTS, Key{1}, refN(0))
	n2 := SignClaim(seedKey(4), noticeTS, Key{1}, refN(0))
	i1, _ := DefaultPolicy().ValidateClaim(&n1, noticeNow)
	i2, _ := DefaultPolicy().ValidateClaim(&n2, noticeNow)
	if ClaimWins(i1, i2) == ClaimWins(i2, i1) {
		t.Fatal("two distinct claims of one ref at one timestamp: not exactly one winner")
	}
}

// The sync item hashes follow their documented formulas and are stable:
// pinned vectors (a change here splits the network's notice sets).
func TestNoticeItemVectors(t *testing.T) {
	claim := SignClaim(seedKey(3), noticeTS, Key{1}, refN(0))
	ci, err := DefaultPolicy().ValidateClaim(&claim, noticeNow)
	if err != nil {
		t.Fatal(err)
	}
	buf := append([]byte("claim"), ci.DeviceID[:]...)
	buf = append(buf, ci.Ref[:]...)
	buf = binary.BigEndian.AppendUint64(buf, ci.TimestampMS)
	buf = append(buf, ci.Hash[:]...)
	if got := ClaimItem(ci); got != sha256.Sum256(buf) {
		t.Fatal("ClaimItem is not its documented formula")
	}
	consume := SignConsume(seedKey(1), noticeTS, refsN(2))
	cs, err := DefaultPolicy().ValidateConsume(&consume, noticeNow)
	if err != nil {
		t.Fatal(err)
	}
	buf = append([]byte("consume"), consume.DeviceID[:]...)
	buf = append(buf, cs.Hash[:]...)
	if got := ConsumeItem(consume.DeviceID, cs); got != sha256.Sum256(buf) {
		t.Fatal("ConsumeItem is not its documented formula")
	}
	for name, got := range map[string][32]byte{"claim hash": ci.Hash, "claim item": ClaimItem(ci), "consume hash": cs.Hash, "consume item": ConsumeItem(consume.DeviceID, cs)} {
		if want := noticeVectors[name]; hex.EncodeToString(got[:]) != want {
			t.Errorf("%s: %x, pinned %s", name, got, want)
		}
	}
}

var noticeVectors = map[string]string{
	"claim hash":   "9bce1704db2cf4b79d9ffd4bd37b290c463d3456a687739b8dc9be37c8fbcb46",
	"claim item":   "ac13a590ad20bd906df7cd49dc1c9d6a4a903fe19184922c7f1f602c441795d4",
	"consume hash": "02b1449b78e95b9f5584a797dd8b1737db144e3de8b07d389a8c288682fe5422",
	"consume item": "ea3264dcbfe15c8347c0fdaef03fc1d9ecea2c1764e621a0cb4816893c5185e3",
}

// KeyPackageCipherSuite reads the suite of every official vector, wrapped
// in an MLSMessage as stored and bare, and refuses what is not an mls10
// KeyPackage header.
func TestKeyPackageCipherSuiteVectors(t *testing.T) {
	raw, err := os.ReadFile("mls/testdata/keypackages.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []struct {
		Suite uint16 `json:"cipher_suite"`
		Wire  string `json:"wire"`
		Hex   string `json:"hex"`
	}
	if err := json.Unmarshal(raw, &vs); err != nil || len(vs) != 307 {
		t.Fatalf("%d vectors: %v", len(vs), err)
	}
	for i, v := range vs {
		b := unhex(t, v.Hex)
		if v.Wire != "mlsmessage" || !bytes.HasPrefix(b, []byte{0, 1, 0, 5}) {
			t.Fatalf("vector %d: wire %s", i, v.Wire)
		}
		for name, kp := range map[string][]byte{"wrapped": b, "bare": b[4:]} {
			if s, ok := KeyPackageCipherSuite(kp); !ok || s != v.Suite {
				t.Fatalf("vector %d %s: suite %d %v, want %d", i, name, s, ok, v.Suite)
			}
		}
	}
	for _, kp := range [][]byte{nil, {0, 1}, {0, 1, 0}, {0, 2, 0, 1}, []byte("opaque key package"), {0, 1, 0, 5, 0, 1}, {0, 2, 0, 5, 0, 1, 0, 1}} {
		if s, ok := KeyPackageCipherSuite(kp); ok {
			t.Errorf("%x: suite %d", kp, s)
		}
	}
	if s, ok := KeyPackageCipherSuite([]byte{0, 1, 0, 5, 0, 1, 0, 3}); !ok || s != 3 {
		t.Errorf("minimal wrapped header: %d %v", s, ok)
	}
	if s, ok := KeyPackageCipherSuite([]byte{0, 1, 0, 0x4D}); !ok || s != 0x4D {
		t.Errorf("minimal bare header: %d %v", s, ok)
	}
}
