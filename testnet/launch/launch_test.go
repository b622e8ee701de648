package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// scripts/testnet.sh up 5 with real binaries: a bundle and an account
// bundle POSTed to node 1 are served by node 5 within 2 s; a second up
// refuses; kill and start bring node 5 back with its data; down leaves no
// process behind.
func TestTestnetScript(t *testing.T) {
	if testing.Short() {
		t.Skip("builds binaries and runs five processes")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	env := append(os.Environ(), "TESTNET_DIR="+filepath.Join(dir, "tn"),
		// Ports apart from a developer's own testnet (18080+, 19080+).
		"TESTNET_API_BASE=28180", "TESTNET_P2P_BASE=29180")
	script := func(args ...string) (string, error) {
		cmd := exec.Command("bash", append([]string{filepath.Join(root, "scripts/testnet.sh")}, args...)...)
		cmd.Env, cmd.Dir = env, dir
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := script("up", "5")
	if err != nil {
		t.Fatalf("up: %v\n%s", err, out)
	}
	var nodes []nodeInfo
	raw, err := os.ReadFile(filepath.Join(dir, "tn", "nodes.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &nodes); err != nil || len(nodes) != 5 {
		t.Fatalf("nodes.json: %v %s", err, raw)
	}
	t.Cleanup(func() {
		for _, n := range nodes {
			syscall.Kill(n.PID, syscall.SIGKILL)
		}
	})
	for i, n := range nodes {
		if n.Index != i+1 || !strings.HasPrefix(n.API, "http://127.0.0.1:") || n.PeerID == "" || len(n.Addrs) == 0 || n.Network == "" || n.PID == 0 {
			t.Fatalf("nodes.json entry %d incomplete: %+v", i, n)
		}
		if !strings.Contains(out, n.PeerID) || !strings.Contains(out, n.API) {
			t.Fatalf("up did not print node %d", n.Index)
		}
	}
	if out, err := script("up", "3"); err == nil || !strings.Contains(out, "already running") {
		t.Fatalf("second up: %v\n%s", err, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hc := &http.Client{Timeout: 5 * time.Second}
	first, last := httpapi.NewClient(nodes[0].API, hc), httpapi.NewClient(nodes[4].API, hc)
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	kp, _, err := mlstest.Generate(mlstest.Options{Signer: dev, LastResort: true})
	if err != nil {
		t.Fatal(err)
	}
	b := protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
	start := time.Now()
	if err := first.PublishBundle(ctx, &b); err != nil {
		t.Fatal(err)
	}
	for {
		got, err := last.FetchBundle(ctx, b.DeviceID)
		if err == nil && bytes.Equal(got.Payload, b.Payload) {
			break
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("node 5 did not serve the bundle within 2 s: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("bundle on node 5 %v after the POST to node 1", time.Since(start).Round(time.Millisecond))

	_, acct, _ := ed25519.GenerateKey(rand.Reader)
	a := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, []protocol.Key{b.DeviceID}))
	start = time.Now()
	if err := first.PublishAccount(ctx, &a); err != nil {
		t.Fatal(err)
	}
	for {
		got, err := last.FetchAccount(ctx, a.AccountPub)
		if err == nil && bytes.Equal(got.Payload, a.Payload) {
			break
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("node 5 did not serve the account bundle within 2 s: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}

	// A crash and a restart on the same data dir and ports: node 5 comes
	// back ready and still serves what it had acknowledged.
	oldPID := nodes[4].PID
	if out, err := script("kill", "5"); err != nil {
		t.Fatalf("kill 5: %v\n%s", err, out)
	}
	if syscall.Kill(oldPID, 0) == nil {
		if state, _ := os.ReadFile("/proc/" + itoa(oldPID) + "/stat"); !strings.Contains(string(state), ") Z ") {
			t.Fatalf("node 5 (pid %d) still running after kill", oldPID)
		}
	}
	if out, err := script("start", "5"); err != nil || !strings.Contains(out, "node 5 restarted") {
		t.Fatalf("start 5: %v\n%s", err, out)
	}
	raw, err = os.ReadFile(filepath.Join(dir, "tn", "nodes.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &nodes); err != nil || nodes[4].PID == oldPID || nodes[4].API != last.BaseURL() {
		t.Fatalf("nodes.json after start 5: %v %s", err, raw)
	}
	if got, err := last.FetchBundle(ctx, b.DeviceID); err != nil || !bytes.Equal(got.Payload, b.Payload) {
		t.Fatalf("node 5 after the restart: %v", err)
	}
	if got, err := last.FetchAccount(ctx, a.AccountPub); err != nil || !bytes.Equal(got.Payload, a.Payload) {
		t.Fatalf("node 5 after the restart: account %v", err)
	}

	if out, err := script("status"); err != nil || strings.Count(out, "ready") != 5 {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if out, err := script("logs", "1"); err != nil || !strings.Contains(out, "kpnode started") {
		t.Fatalf("logs 1: %v", err)
	}
	if out, err := script("down"); err != nil {
		t.Fatalf("down: %v\n%s", err, out)
	}
	for _, n := range nodes {
		if syscall.Kill(n.PID, 0) == nil {
			if state, _ := os.ReadFile("/proc/" + itoa(n.PID) + "/stat"); !strings.Contains(string(state), ") Z ") {
				t.Fatalf("node %d (pid %d) still running after down", n.Index, n.PID)
			}
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestPortOf(t *testing.T) {
	for _, c := range []struct {
		s, sep string
		want   int
	}{
		{"http://127.0.0.1:18081", ":", 18081},
		{"/ip4/127.0.0.1/tcp/19081/p2p/12D3KooW", "/tcp/", 19081},
		{"/ip4/127.0.0.1/tcp/19082", "/tcp/", 19082},
	} {
		if got, err := portOf(c.s, c.sep); err != nil || got != c.want {
			t.Fatalf("portOf(%q) = %d, %v; want %d", c.s, got, err, c.want)
		}
	}
	if _, err := portOf("/ip4/127.0.0.1/udp/1/quic-v1", "/tcp/"); err == nil {
		t.Fatal("no tcp port should be an error")
	}
}
