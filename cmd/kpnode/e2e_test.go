package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
)

// binPath is the kpnode binary built once for the end-to-end tests.
var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kpnode-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binPath = filepath.Join(dir, "kpnode")
	build := exec.Command("go", "build", "-race", "-o", binPath, ".")
	if !raceEnabled {
		build = exec.Command("go", "build", "-o", binPath, ".")
	}
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building kpnode:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a running kpnode binary.
type proc struct {
	cmd  *exec.Cmd
	base string
	logs *syncBuffer
	done chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startNode runs `kpnode run` on a free loopback port and waits until its
// API answers. The node is killed when the test ends if still running.
func startNode(t *testing.T, dataDir string, extra ...string) *proc {
	t.Helper()
	args := append([]string{"run", "--data", dataDir, "--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--log-format", "json"}, extra...)
	cmd := exec.Command(binPath, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, logs: &syncBuffer{}, done: make(chan error, 1)}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Bytes()
			p.logs.Write(append(line, '\n'))
			var rec struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal(line, &rec) == nil && rec.Msg == "http api listening" {
				select {
				case addr <- rec.Addr:
				default:
				}
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-p.done
		}
	})
	select {
	case a := <-addr:
		p.base = "http://" + a
	case err := <-p.done:
		t.Fatalf("kpnode exited before listening: %v\n%s", err, p.logs)
	case <-time.After(30 * time.Second):
		t.Fatalf("kpnode did not start listening within 30 s\n%s", p.logs)
	}
	return p
}

// stop sends SIGTERM and waits for a clean exit.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("kpnode exited with %v after SIGTERM\n%s", err, p.logs)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("kpnode did not stop within 20 s of SIGTERM\n%s", p.logs)
	}
}

// signingKey is the chat-store benchmark's signing_key(n).
func signingKey(n uint64) ed25519.PrivateKey {
	seed := make([]byte, 32)
	binary.LittleEndian.PutUint64(seed, n)
	for i := 0; i < 24; i++ {
		seed[8+i] = byte((37*i + 11) % 256)
	}
	return ed25519.NewKeyFromSeed(seed)
}

type httpReply struct {
	code int
	body []byte
}

func request(ctx context.Context, hc *http.Client, method, url string, body any) (httpReply, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return httpReply{}, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return httpReply{}, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return httpReply{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return httpReply{resp.StatusCode, b}, err
}

var b64 = base64.StdEncoding

// businessFlow is one operation of chat-store's benchmark (7 requests),
// with the current time where the benchmark puts its sequence number.
func businessFlow(ctx context.Context, hc *http.Client, base string, seq uint64, payloadBytes int) error {
	dev, acct := signingKey(2*seq), signingKey(2*seq+1)
	kp := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), bytes.Repeat([]byte{'k'}, payloadBytes))
	devID := kp.DeviceID.String()
	acctPayload := func(lamport uint64) []byte {
		p := append([]byte(protocol.AccountDomain), 1)
		p = binary.LittleEndian.AppendUint64(p, lamport)
		return append(p, bytes.Repeat([]byte{'a'}, payloadBytes)...)
	}
	a1 := protocol.SignAccount(acct, acctPayload(1))
	a2 := protocol.SignAccount(acct, acctPayload(2))
	post := func(path string, key protocol.Key, keyField string, payload []byte, sig [64]byte) (int, error) {
		r, err := request(ctx, hc, "POST", base+path, map[string]string{keyField: key.String(),
			"payload": b64.EncodeToString(payload), "signature": b64.EncodeToString(sig[:])})
		return r.code, err
	}
	check := func(step int, got, want int, err error) error {
		if err != nil {
			return fmt.Errorf("step %d: %w", step, err)
		}
		if got != want {
			return fmt.Errorf("step %d: status %d, want %d", step, got, want)
		}
		return nil
	}
	getSigned := func(step int, url string, key protocol.Key, wantPayload []byte) (int64, error) {
		r, err := request(ctx, hc, "GET", url, nil)
		if err := check(step, r.code, 200, err); err != nil {
			return 0, err
		}
		var body struct {
			Payload, Signature string
			UpdatedAt          int64 `json:"updated_at"`
		}
		if err := json.Unmarshal(r.body, &body); err != nil {
			return 0, fmt.Errorf("step %d: %w", step, err)
		}
		p, err1 := b64.DecodeString(body.Payload)
		s, err2 := b64.DecodeString(body.Signature)
		if err1 != nil || err2 != nil || !bytes.Equal(p, wantPayload) || !ed25519.Verify(key[:], p, s) {
			return 0, fmt.Errorf("step %d: wrong or unverifiable payload", step)
		}
		return body.UpdatedAt, nil
	}

	code, err := post("/v0/keypackage", kp.DeviceID, "device_id", kp.Payload, kp.Signature)
	if err := check(1, code, 204, err); err != nil {
		return err
	}
	if _, err := getSigned(2, base+"/v0/keypackage/"+devID, kp.DeviceID, kp.Payload); err != nil {
		return err
	}
	code, err = post("/v0/account", a1.AccountPub, "account_pub", a1.Payload, a1.Signature)
	if err := check(3, code, 204, err); err != nil {
		return err
	}
	updated, err := getSigned(4, base+"/v0/account/"+a1.AccountPub.String(), a1.AccountPub, a1.Payload)
	if err != nil {
		return err
	}
	if updated <= 0 {
		return fmt.Errorf("step 4: updated_at %d", updated)
	}
	code, err = post("/v0/account", a1.AccountPub, "account_pub", a1.Payload, a1.Signature)
	if err := check(5, code, 409, err); err != nil {
		return err
	}
	code, err = post("/v0/account", a2.AccountPub, "account_pub", a2.Payload, a2.Signature)
	if err := check(6, code, 204, err); err != nil {
		return err
	}
	_, err = getSigned(7, base+"/v0/account/"+a2.AccountPub.String(), a2.AccountPub, a2.Payload)
	return err
}

// The chat-store benchmark's business flow against the real binary.
func TestBinaryBusinessFlow(t *testing.T) {
	p := startNode(t, t.TempDir(), "--mls-validation", "off")
	ctx := context.Background()
	hc := &http.Client{Timeout: 15 * time.Second}
	// The benchmark's untimed checks.
	for _, c := range []struct {
		method, path string
		body         any
		code         int
	}{
		{"GET", "/v0/keypackage/unknown", nil, 404},
		{"GET", "/v0/keypackage/" + strings.Repeat("0", 64), nil, 404},
		{"GET", "/v0/account/" + strings.Repeat("0", 64), nil, 404},
		{"POST", "/v0/keypackage", map[string]string{"device_id": "not-a-key", "payload": "bad", "signature": "bad"}, 400},
	} {
		r, err := request(ctx, hc, c.method, p.base+c.path, c.body)
		if err != nil || r.code != c.code {
			t.Fatalf("%s %s: %d %v, want %d", c.method, c.path, r.code, err, c.code)
		}
	}
	const workers, ops = 4, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := uint64(0); w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for op := uint64(0); op < ops; op++ {
				if err := businessFlow(ctx, hc, p.base, w<<32|op, 512); err != nil {
					errs <- fmt.Errorf("worker %d op %d: %w", w, op, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	raw, err := httpapi.NewClient(p.base, hc).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var st struct{ Devices, Bundles, Accounts int64 }
	if err := json.Unmarshal(raw, &st); err != nil || st.Devices != workers*ops || st.Bundles != workers*ops || st.Accounts != workers*ops {
		t.Fatalf("status after %d operations: %s", workers*ops, raw)
	}
	p.stop(t)
}

// Every bundle that got a 204 is served after kill -9 and a restart.
func TestBinaryKill9KeepsAcknowledgedWrites(t *testing.T) {
	dir := t.TempDir()
	p := startNode(t, dir, "--mls-validation", "off")
	hc := &http.Client{Timeout: 10 * time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var (
		mu      sync.Mutex
		acked   []protocol.Bundle
		count   atomic.Int64
		wg      sync.WaitGroup
		reached = make(chan struct{})
	)
	const target = 300
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := httpapi.NewClient(p.base, hc)
			for i := 0; i < 10_000 && ctx.Err() == nil; i++ {
				b := protocol.SignBundle(signingKey(uint64(w)<<32|uint64(i)), uint64(time.Now().UnixMilli()), []byte(fmt.Sprintf("kp-%d-%d", w, i)))
				if err := client.PublishBundle(ctx, &b); err != nil {
					return // the node died mid-request: not acknowledged
				}
				mu.Lock()
				acked = append(acked, b)
				mu.Unlock()
				if count.Add(1) == target {
					close(reached)
				}
			}
		}()
	}
	select {
	case <-reached:
	case <-time.After(60 * time.Second):
		t.Fatalf("only %d writes acknowledged in 60 s", count.Load())
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	cancel()
	wg.Wait()

	p2 := startNode(t, dir, "--mls-validation", "off")
	client := httpapi.NewClient(p2.base, hc)
	for _, b := range acked {
		got, err := client.FetchBundle(context.Background(), b.DeviceID)
		if err != nil {
			t.Fatalf("acknowledged bundle of %s lost after kill -9: %v (%d acknowledged)", b.DeviceID, err, len(acked))
		}
		if !bytes.Equal(got.Payload, b.Payload) {
			t.Fatalf("device %s: served another payload", b.DeviceID)
		}
	}
	t.Logf("%d acknowledged writes all served after kill -9", len(acked))
	p2.stop(t)
}

// The CLI round trip a user would try: keygen, publish, fetch, status.
func TestBinaryCLIRoundTrip(t *testing.T) {
	p := startNode(t, t.TempDir(), "--mls-validation", "off")
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "device.key")
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(binPath, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("kpnode %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	out := run("keygen", "--out", keyFile)
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi.Mode(), err)
	}
	devID := strings.Fields(out)[1]
	if _, err := protocol.ParseKey(devID); err != nil {
		t.Fatalf("keygen printed %q", out)
	}
	if out, err := exec.Command(binPath, "keygen", "--out", keyFile).CombinedOutput(); err == nil {
		t.Fatalf("keygen overwrote an existing key: %s", out)
	}
	kpFile := filepath.Join(dir, "kp.bin")
	if err := os.WriteFile(kpFile, []byte("opaque key package"), 0o644); err != nil {
		t.Fatal(err)
	}
	run("publish", "--api", p.base, "--key", keyFile, kpFile)
	outFile := filepath.Join(dir, "fetched.bin")
	out = run("fetch", "--api", p.base, "--out", outFile, devID)
	if !strings.Contains(out, `"verified": true`) {
		t.Fatalf("fetch: %s", out)
	}
	if got, _ := os.ReadFile(outFile); string(got) != "opaque key package" {
		t.Fatalf("fetched key_package %q", got)
	}
	out = run("status", "--api", strings.TrimPrefix(p.base, "http://"))
	if !strings.Contains(out, `"bundles": 1`) {
		t.Fatalf("status: %s", out)
	}
	if out, err := exec.Command(binPath, "fetch", "--api", p.base, strings.Repeat("0", 64)).CombinedOutput(); err == nil || !strings.Contains(string(out), "no keypackage") {
		t.Fatalf("fetch of an unknown device: %v %s", err, out)
	}
}

// Flags come from KPNODE_* variables; the command line wins.
func TestEnvironmentConfiguresRun(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(binPath, "run", "--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--log-format", "json")
	cmd.Env = append(os.Environ(), "KPNODE_DATA="+dir, "KPNODE_MAX_PER_DEVICE=0")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || !strings.Contains(string(out), "max per device must be at least 1") {
		t.Fatalf("KPNODE_MAX_PER_DEVICE=0 was not applied: %v\n%s", err, out)
	}
	cmd = exec.Command(binPath, "run", "--retention", "soon")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "invalid") {
		t.Fatalf("bad --retention accepted: %s", out)
	}
}

// A real KeyPackage through the real binary with strict MLS validation (the
// default): published with the CLI, refused when it is junk, fetched back.
func TestBinaryStrictKeyPackage(t *testing.T) {
	p := startNode(t, t.TempDir())
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
	devID := strings.Fields(out)[1]
	junk := filepath.Join(dir, "junk.bin")
	os.WriteFile(junk, []byte("fake-mls-keypackage-bytes"), 0o644)
	if out, err := run("publish", "--api", p.base, "--key", keyFile, junk); err == nil || !strings.Contains(out, "key_package: mls: malformed") {
		t.Fatalf("junk KeyPackage: %v %s", err, out)
	}
	if out, err := run("publish", "--api", p.base, "--key", keyFile, "--test-keypackage"); err != nil {
		t.Fatalf("publish: %v %s", err, out)
	}
	out, err = run("fetch", "--api", p.base, devID)
	if err != nil || !strings.Contains(out, `"verified": true`) {
		t.Fatalf("fetch: %v %s", err, out)
	}
	var got struct {
		Ref  string `json:"ref"`
		Size int    `json:"key_package_bytes"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil || got.Size < 2500 {
		t.Fatalf("fetch output %s: %v", out, err)
	}
	r, err := request(context.Background(), http.DefaultClient, "GET", p.base+"/v1/keypackages/"+devID, nil)
	if err != nil || !strings.Contains(string(r.body), `"ref":"`+got.Ref+`"`) || !strings.Contains(string(r.body), `"last_resort":true`) {
		t.Fatalf("list: %v %s", err, r.body)
	}
}
