package protocol

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"testing"
	"time"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func seedKey(b byte) ed25519.PrivateKey { return ed25519.NewKeyFromSeed(bytes.Repeat([]byte{b}, 32)) }

func opaquePolicy() Policy {
	p := DefaultPolicy()
	p.MLS = MLSOff
	return p
}

// Vector A of chat-store-compat.md.
func TestVectorABundle(t *testing.T) {
	dev1 := seedKey(1)
	if got := hex.EncodeToString(dev1.Public().(ed25519.PublicKey)); got != "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c" {
		t.Fatalf("dev1 public key %s", got)
	}
	b := SignBundle(dev1, 1700000000000, []byte("fake-mls-keypackage-bytes"))
	if got := base64.StdEncoding.EncodeToString(b.Payload); got != "AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz" {
		t.Fatalf("payload %s", got)
	}
	if got := base64.StdEncoding.EncodeToString(b.Signature[:]); got != "fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA==" {
		t.Fatalf("signature %s", got)
	}
	// Within its own time it is valid; today it is past the retention.
	info, err := opaquePolicy().ValidateBundle(&b, time.UnixMilli(1700000000000+60_000))
	if err != nil {
		t.Fatalf("vector A at its own time: %v", err)
	}
	if info.TimestampMS != 1700000000000 || info.Ref != KeyPackageRef([]byte("fake-mls-keypackage-bytes")) {
		t.Fatalf("info %+v", info)
	}
	_, err = opaquePolicy().ValidateBundle(&b, time.Now())
	if RuleOf(err) != RuleTimestampExpired {
		t.Fatalf("vector A today: %v, want %s", err, RuleTimestampExpired)
	}
	if err.Error() != "payload: timestamp 1700000000000 is older than the retention of 720h0m0s" {
		t.Fatalf("message %q", err)
	}
}

func TestVectorsBCAccountBundles(t *testing.T) {
	acct := seedKey(4)
	dev1, dev2 := seedKey(1), seedKey(2)
	var k1, k2 Key
	copy(k1[:], dev1.Public().(ed25519.PublicKey))
	copy(k2[:], dev2.Public().(ed25519.PublicKey))
	if k2.String() != "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394" {
		t.Fatalf("dev2 %s", k2)
	}
	cases := []struct {
		lamport uint64
		devices []Key
		size    int
		sig     string
	}{
		{0, []Key{k1}, 73, "9a6e1fd53c88124131075539dc3743965dfc74cd6405a00b2823e9404f7962970eb25a240ea3eb9f02b70fe0d510ffb36b825d455ae16f136e410b67ab96e80f"},
		{1, []Key{k1, k2}, 105, "bdcc8929074765f592d630dcf68372a3ce18bb97fa980ac80a833593af11d68ff5c3a2644bf4fa10f07920f566aa9b05821abf5722b5cac65d25ae319a704602"},
	}
	for _, c := range cases {
		a := SignAccount(acct, EncodeAccountPayload(c.lamport, c.devices))
		if a.AccountPub.String() != "ca93ac1705187071d67b83c7ff0efe8108e8ec4530575d7726879333dbdabe7c" {
			t.Fatalf("acct %s", a.AccountPub)
		}
		if len(a.Payload) != c.size || hex.EncodeToString(a.Signature[:]) != c.sig {
			t.Fatalf("lamport %d: %d bytes, sig %x", c.lamport, len(a.Payload), a.Signature)
		}
		lamport, err := opaquePolicy().ValidateAccount(&a)
		if err != nil || lamport != c.lamport {
			t.Fatalf("validate: %d %v", lamport, err)
		}
		d, err := DecodeAccountPayload(a.Payload)
		if err != nil || d.Lamport != c.lamport || len(d.Devices) != len(c.devices) || d.Devices[0] != k1 {
			t.Fatalf("decode: %+v %v", d, err)
		}
	}
}

// Vector E: header only. The server accepts it, the client's decoder does not.
func TestVectorEHeaderOnly(t *testing.T) {
	p := append([]byte(AccountDomain), 1, 42, 0, 0, 0, 0, 0, 0, 0)
	if len(p) != 39 {
		t.Fatalf("len %d", len(p))
	}
	if l, err := AccountLamport(p); err != nil || l != 42 {
		t.Fatalf("lamport %d %v", l, err)
	}
	if _, err := DecodeAccountPayload(p); !errors.Is(err, ErrAccountLayout) {
		t.Fatalf("decode: %v", err)
	}
	a := SignAccount(seedKey(4), p)
	if _, err := opaquePolicy().ValidateAccount(&a); err != nil {
		t.Fatalf("header-only account refused: %v", err)
	}
	short := SignAccount(seedKey(4), p[:38])
	if _, err := opaquePolicy().ValidateAccount(&short); RuleOf(err) != RuleAccountHeader ||
		err.Error() != "payload: too short to contain a lamport header" {
		t.Fatalf("short header: %v", err)
	}
	noDomain := SignAccount(seedKey(4), append([]byte("libchat:account-device-bundlX\x00"), p[30:]...))
	if _, err := opaquePolicy().ValidateAccount(&noDomain); RuleOf(err) != RuleAccountHeader {
		t.Fatalf("wrong domain: %v", err)
	}
}

// Vector D: the benchmark's signing_key(n).
func TestVectorDBenchmarkKeys(t *testing.T) {
	seed := func(n uint64) []byte {
		s := make([]byte, 32)
		for i := 0; i < 8; i++ {
			s[i] = byte(n >> (8 * i))
		}
		for i := 0; i < 24; i++ {
			s[8+i] = byte((37*i + 11) % 256)
		}
		return s
	}
	if hex.EncodeToString(seed(0)) != "00000000000000000b30557a9fc4e90e33587da2c7ec11365b80a5caef14395e" {
		t.Fatalf("seed(0) %x", seed(0))
	}
	for n, want := range []string{"0f98858ea7df3545bc32379db4e6c8aceac09f741e49b351d9de67f70a731507", "56cbf320e9236bab21803d3b1c49cd25865786fbacedd955f15d53ad98fce9c1"} {
		pub := ed25519.NewKeyFromSeed(seed(uint64(n))).Public().(ed25519.PublicKey)
		if hex.EncodeToString(pub) != want {
			t.Fatalf("signing_key(%d) = %x", n, pub)
		}
	}
}

func TestValidateBundleRuleOrder(t *testing.T) {
	now := time.UnixMilli(1_800_000_000_000)
	dev := seedKey(1)
	good := SignBundle(dev, uint64(now.UnixMilli()), []byte("kp"))
	vectorG := func() Bundle {
		var b Bundle
		b.DeviceID[0] = 1
		b.Signature[0] = 1
		b.Payload = good.Payload
		return b
	}()
	notPoint := good
	notPoint.DeviceID = Key{2}
	flipped := good
	flipped.Signature[5] ^= 1
	short := SignBundle(dev, 0, nil)
	short.Payload = short.Payload[:7]
	copy(short.Signature[:], ed25519.Sign(dev, short.Payload))
	future := SignBundle(dev, uint64(now.Add(6*time.Minute).UnixMilli()), []byte("kp"))
	nearFuture := SignBundle(dev, uint64(now.Add(4*time.Minute).UnixMilli()), []byte("kp"))
	old := SignBundle(dev, uint64(now.Add(-31*24*time.Hour).UnixMilli()), []byte("kp"))

	cases := []struct {
		name string
		b    Bundle
		rule Rule
		msg  string
	}{
		{"valid", good, "", ""},
		{"within clock skew", nearFuture, "", ""},
		{"vector G small order", vectorG, RuleSignature, "signature: verification failed"},
		{"not a point", notPoint, RuleKeyNotPoint, "device_id: not a valid ed25519 key"},
		{"flipped signature", flipped, RuleSignature, "signature: verification failed"},
		{"short payload", short, RulePayloadTooShort, "payload: too short to contain a timestamp"},
		{"future", future, RuleTimestampFuture, ""},
		{"expired", old, RuleTimestampExpired, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := opaquePolicy().ValidateBundle(&c.b, now)
			if RuleOf(err) != c.rule || (c.rule == "") != (err == nil) {
				t.Fatalf("err %v, want rule %q", err, c.rule)
			}
			if c.msg != "" && err.Error() != c.msg {
				t.Fatalf("message %q, want %q", err, c.msg)
			}
		})
	}
}

func TestParseKeyNormalises(t *testing.T) {
	lower := "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
	k1, err := ParseKey(lower)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := ParseKey("8A88E3DD7409F195FD52DB2D3CBA5D72CA6709BF1D94121BF3748801B40F6F5C")
	if err != nil || k1 != k2 || k2.String() != lower {
		t.Fatalf("uppercase key: %v %s", err, k2)
	}
	for _, bad := range []string{"", "not-a-key", lower[:62], lower + "00", "zz" + lower[2:]} {
		if _, err := ParseKey(bad); !errors.Is(err, ErrKeyEncoding) {
			t.Fatalf("ParseKey(%q) = %v", bad, err)
		}
	}
}

// The KeyPackageRef example of mls-keypackage.md §5 is checked in
// protocol/mls against the interop vector; here the encoding of RefHash's
// length prefixes is checked by hand for a value that needs a 2-byte varint.
func TestKeyPackageRefEncoding(t *testing.T) {
	value := bytes.Repeat([]byte{0xaa}, 100)
	manual := append([]byte{0x1c}, "MLS 1.0 KeyPackage Reference"...)
	manual = append(manual, 0x40, 100)
	manual = append(manual, value...)
	want := Ref(sha256.Sum256(manual))
	if got := KeyPackageRef(value); got != want {
		t.Fatalf("ref %s, want %x", got, want)
	}
}

func TestDigestIsOrderIndependentAndReversible(t *testing.T) {
	var items [][32]byte
	for i := 0; i < 50; i++ {
		items = append(items, BundleItem(Key{byte(i)}, uint64(i), Ref{byte(i * 3)}))
	}
	var a, b Digest
	for _, h := range items {
		a.Add(h)
	}
	for i := len(items) - 1; i >= 0; i-- {
		b.Add(items[i])
	}
	if a.Fingerprint() != b.Fingerprint() || a.Count != 50 {
		t.Fatal("digest depends on order")
	}
	b.Remove(items[7])
	if a.Fingerprint() == b.Fingerprint() || b.Count != 49 {
		t.Fatal("removing an item did not change the fingerprint")
	}
	b.Add(items[7])
	if a.Fingerprint() != b.Fingerprint() {
		t.Fatal("remove then add is not the identity")
	}
	var empty Digest
	for _, h := range items {
		b.Remove(h)
	}
	if b.Fingerprint() != empty.Fingerprint() {
		t.Fatal("removing every item does not give the empty digest")
	}
	if BundleItem(Key{1}, 2, Ref{3}) == BundleItem(Key{1}, 3, Ref{3}) {
		t.Fatal("a refreshed timestamp must be a different item")
	}
}
