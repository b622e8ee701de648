package main

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
)

// cli runs kpnode's main in process.
func cli(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	code = realMain(args, &o, &e)
	return o.String(), e.String(), code
}

func fakeAPI(t *testing.T) (*httpapitest.Fake, string) {
	t.Helper()
	f := httpapitest.NewFake(nil)
	h, err := httpapi.New(httpapi.Config{Backend: f, Registry: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

type claimJSON struct {
	DeviceID    string `json:"device_id"`
	Ref         string `json:"ref"`
	Payload     string `json:"payload"`
	Signature   string `json:"signature"`
	TimestampMS uint64 `json:"timestamp_ms"`
	LastResort  bool   `json:"last_resort"`
	Error       string `json:"error"`
}

// The single-use commands against a node's API (the fake): count, claim
// (flags before or after the device, --out), the pool running dry, consume
// signed with the keygen key, the consumed bundle refused on re-publish,
// the account claim, a rate-limited claim saying when to retry, and the
// usage errors (exit 2).
func TestCLISingleUse(t *testing.T) {
	f, base := fakeAPI(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "device.key")
	out, errOut, code := cli(t, "keygen", "--out", keyFile)
	if code != 0 {
		t.Fatalf("keygen: %s", errOut)
	}
	dev := strings.Fields(out)[1]
	kps := map[string]string{} // ref → key_package
	var files []string
	for i, kp := range []string{"one-time A", "one-time B"} {
		file := filepath.Join(dir, "kp"+string(rune('0'+i)))
		os.WriteFile(file, []byte(kp), 0o644)
		files = append(files, file)
		kps[protocol.KeyPackageRef([]byte(kp)).String()] = kp
		if _, errOut, code := cli(t, "publish", "--api", base, "--key", keyFile, file); code != 0 {
			t.Fatalf("publish: %s", errOut)
		}
	}
	out, errOut, code = cli(t, "count", dev, "--api", base)
	if code != 0 || !strings.Contains(out, `"one_time": 2`) || !strings.Contains(out, `"last_resort_handed_out": 0`) {
		t.Fatalf("count: %d %s %s", code, out, errOut)
	}

	var claimed []claimJSON
	for _, args := range [][]string{
		{"claim", "--api", base, "--out", filepath.Join(dir, "claimed"), dev},
		{"claim", dev, "--api", base, "--cipher-suite", "0"},
	} {
		out, errOut, code := cli(t, args...)
		var c claimJSON
		if code != 0 || json.Unmarshal([]byte(out), &c) != nil || c.DeviceID != dev || kps[c.Ref] == "" || c.LastResort {
			t.Fatalf("%v: %d %s %s", args, code, out, errOut)
		}
		claimed = append(claimed, c)
	}
	if claimed[0].Ref == claimed[1].Ref {
		t.Fatalf("the same ref claimed twice: %s", claimed[0].Ref)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "claimed")); string(got) != kps[claimed[0].Ref] {
		t.Fatalf("--out wrote %q", got)
	}
	if _, errOut, code := cli(t, "claim", "--api", base, dev); code != 1 || !strings.Contains(errOut, "no keypackage for device "+dev) {
		t.Fatalf("claim of an empty pool: %d %s", code, errOut)
	}

	out, errOut, code = cli(t, "consume", "--api", base, "--key", keyFile, claimed[0].Ref)
	if code != 0 || !strings.Contains(out, "consumed 1 bundle(s) of device "+dev) {
		t.Fatalf("consume: %d %s %s", code, out, errOut)
	}
	republish := files[0]
	if kps[claimed[0].Ref] != "one-time A" {
		republish = files[1]
	}
	if _, errOut, code := cli(t, "publish", "--api", base, "--key", keyFile, republish); code != 1 || !strings.Contains(errOut, "keypackage consumed") {
		t.Fatalf("re-publish of a consumed KeyPackage: %d %s", code, errOut)
	}

	// An account of this device and one with nothing.
	priv, _ := loadKey(keyFile)
	devKey := protocol.Key(priv.Public().(ed25519.PublicKey))
	empty := protocol.Key(httpapitest.SeedKey(9).Public().(ed25519.PublicKey))
	os.WriteFile(files[0], []byte("one-time C"), 0o644)
	if _, errOut, code := cli(t, "publish", "--api", base, "--key", keyFile, files[0]); code != 0 {
		t.Fatalf("publish: %s", errOut)
	}
	acct := protocol.SignAccount(httpapitest.SeedKey(8), protocol.EncodeAccountPayload(2, []protocol.Key{devKey, empty}))
	if err := httpapi.NewClient(base, nil).PublishAccount(t.Context(), &acct); err != nil {
		t.Fatal(err)
	}
	out, errOut, code = cli(t, "claim", "--api", base, "--account", acct.AccountPub.String())
	var ac struct {
		AccountPub string      `json:"account_pub"`
		Lamport    uint64      `json:"lamport"`
		Devices    []claimJSON `json:"devices"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &ac) != nil || ac.Lamport != 2 || len(ac.Devices) != 2 ||
		ac.Devices[0].Ref != protocol.KeyPackageRef([]byte("one-time C")).String() ||
		ac.Devices[1].DeviceID != empty.String() || ac.Devices[1].Error != "no keypackage for device" {
		t.Fatalf("account claim: %d %s %s", code, out, errOut)
	}
	if _, errOut, code := cli(t, "claim", "--api", base, "--account", strings.Repeat("0", 64)); code != 1 || !strings.Contains(errOut, "no account bundle") {
		t.Fatalf("claim of an unknown account: %d %s", code, errOut)
	}

	f.Fail(&httpapitest.RateLimitedError{Wait: 2 * time.Second})
	if _, errOut, code := cli(t, "claim", "--api", base, dev); code != 1 || !strings.Contains(errOut, "rate limited (retry after 2s)") {
		t.Fatalf("rate-limited claim: %d %s", code, errOut)
	}
	f.Fail(nil)

	for _, args := range [][]string{
		{"claim", "--api", base},
		{"claim", "--api", base, dev, dev},
		{"claim", "--api", base, "--account", dev, dev},
		{"claim", "--api", base, "--cipher-suite", "70000", dev},
		{"consume", "--api", base, "--key", keyFile},
		{"count", "--api", base},
	} {
		if _, _, code := cli(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
	for _, args := range [][]string{
		{"consume", "--api", base, "--key", keyFile, "nothex"},
		{"consume", "--api", base, "--key", keyFile, claimed[1].Ref, claimed[1].Ref},
		{"consume", "--api", base, "--key", filepath.Join(dir, "missing.key"), claimed[1].Ref},
		{"count", "--api", base, "nothex"},
	} {
		if _, _, code := cli(t, args...); code != 1 {
			t.Errorf("%v: exit %d, want 1", args, code)
		}
	}
}

// The single-use CLI round trip through the real binary and node: publish
// two, claim both, the third claim is a miss, count, consume, the consumed
// KeyPackage refused on re-publish.
func TestBinarySingleUseCLI(t *testing.T) {
	p := startNode(t, t.TempDir(), "--mls-validation", "off")
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "device.key")
	run := func(args ...string) (string, error) {
		out, err := exec.Command(binPath, args...).CombinedOutput()
		return string(out), err
	}
	out, err := run("keygen", "--out", keyFile)
	if err != nil {
		t.Fatal(out)
	}
	dev := strings.Fields(out)[1]
	var files []string
	for i, kp := range []string{"binary one-time A", "binary one-time B"} {
		file := filepath.Join(dir, "kp"+string(rune('0'+i)))
		os.WriteFile(file, []byte(kp), 0o644)
		files = append(files, file)
		if out, err := run("publish", "--api", p.base, "--key", keyFile, file); err != nil {
			t.Fatalf("publish: %v %s", err, out)
		}
	}
	if out, err := run("count", "--api", p.base, dev); err != nil || !strings.Contains(out, `"one_time": 2`) {
		t.Fatalf("count: %v %s", err, out)
	}
	refs := map[string]bool{}
	for range 2 {
		out, err := run("claim", "--api", p.base, dev)
		var c claimJSON
		if err != nil || json.Unmarshal([]byte(out), &c) != nil || c.LastResort {
			t.Fatalf("claim: %v %s", err, out)
		}
		refs[c.Ref] = true
	}
	if len(refs) != 2 {
		t.Fatalf("two claims gave refs %v", refs)
	}
	if out, err := run("claim", "--api", p.base, dev); err == nil || !strings.Contains(out, "no keypackage for device") {
		t.Fatalf("third claim: %v %s", err, out)
	}
	ref := protocol.KeyPackageRef([]byte("binary one-time A")).String()
	if out, err := run("consume", "--api", p.base, "--key", keyFile, ref); err != nil {
		t.Fatalf("consume: %v %s", err, out)
	}
	if out, err := run("publish", "--api", p.base, "--key", keyFile, files[0]); err == nil || !strings.Contains(out, "keypackage consumed") {
		t.Fatalf("re-publish: %v %s", err, out)
	}
}

// The README's `kpnode fetch <device_id> --out FILE`: flags after the
// positional argument apply (they used to end the arguments: exit 2).
func TestFlagsAfterArguments(t *testing.T) {
	_, base := fakeAPI(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "device.key")
	out, _, _ := cli(t, "keygen", "--out", keyFile)
	dev := strings.Fields(out)[1]
	kp := filepath.Join(dir, "kp")
	os.WriteFile(kp, []byte("after arguments"), 0o644)
	if _, errOut, code := cli(t, "publish", kp, "--api", base, "--key", keyFile); code != 0 {
		t.Fatalf("publish: %s", errOut)
	}
	got := filepath.Join(dir, "got")
	if _, errOut, code := cli(t, "fetch", dev, "--out", got, "--api", base); code != 0 {
		t.Fatalf("fetch: %s", errOut)
	}
	if b, _ := os.ReadFile(got); string(b) != "after arguments" {
		t.Fatalf("fetched %q", b)
	}
}
