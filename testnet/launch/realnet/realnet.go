// Package realnet runs kpnode binaries as real processes on 127.0.0.1 for
// chaos runs and their tests: start, SIGTERM, SIGKILL and restart a node on
// the same data dir and ports, and read its HTTP API. It backs
// `kpbench partition`, `kpbench chaos`, `kpbench attack` and the tests in
// testnet/launch.
package realnet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
)

// Build compiles ./cmd/kpnode of the module this package belongs to into
// dir and returns the binary's path.
func Build(ctx context.Context, dir string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the kpnode module: run from its source tree or pass a binary")
	}
	bin := filepath.Join(dir, "kpnode")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/kpnode")
	cmd.Dir = filepath.Dir(mod)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/kpnode: %w\n%s", err, out)
	}
	return bin, nil
}

// Status is the part of GET /v1/status the runs read.
type Status struct {
	PeerID         string   `json:"peer_id"`
	Addrs          []string `json:"addrs"`
	Network        string   `json:"network"`
	Peers          []string `json:"peers"`
	ConnectedPeers int      `json:"connected_peers"`
	Ready          bool     `json:"ready"`
	ShardCount     int      `json:"shard_count"`
	MLSValidation  string   `json:"mls_validation"`
	Bundles        int64    `json:"bundles"`
	Accounts       int64    `json:"accounts"`
}

// Cluster is a set of kpnode processes of one network, in one directory.
type Cluster struct {
	Bin, Dir, Network string
	// Extra flags for every node.
	Extra []string
	Nodes []*Node
	HTTP  *http.Client
}

// NewCluster returns an empty cluster; Add starts its nodes.
func NewCluster(bin, dir, network string, extra ...string) *Cluster {
	return &Cluster{Bin: bin, Dir: dir, Network: network, Extra: extra,
		HTTP: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 32}, Timeout: 10 * time.Second}}
}

// Node is one kpnode process, restartable on the same data dir and ports.
type Node struct {
	Index     int
	API       string // http://127.0.0.1:port
	APIPort   int
	P2PPort   int
	DataDir   string
	Log       string
	Bootstrap []string
	Extra     []string
	PeerID    string
	// Addr is the node's TCP multiaddr with /p2p/, for --bootstrap.
	Addr   string
	Client *httpapi.Client

	c    *Cluster
	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Add starts a node with the given bootstrap multiaddrs and extra flags and
// waits until its API answers. It does not wait for readiness.
func (c *Cluster) Add(ctx context.Context, bootstrap []string, extra ...string) (*Node, error) {
	i := len(c.Nodes) + 1
	api, err := freePort()
	if err != nil {
		return nil, err
	}
	p2p, err := freePort()
	if err != nil {
		return nil, err
	}
	n := &Node{Index: i, APIPort: api, P2PPort: p2p, API: fmt.Sprintf("http://127.0.0.1:%d", api),
		DataDir: filepath.Join(c.Dir, fmt.Sprintf("node-%d", i)), Log: filepath.Join(c.Dir, fmt.Sprintf("node-%d.log", i)),
		Bootstrap: bootstrap, Extra: extra, c: c}
	n.Client = httpapi.NewClient(n.API, c.HTTP)
	c.Nodes = append(c.Nodes, n)
	if err := n.Start(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

// Start runs the node's process (again) and waits until its API answers.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	if n.cmd != nil {
		n.mu.Unlock()
		return fmt.Errorf("node %d is running", n.Index)
	}
	args := []string{"run",
		"--data", n.DataDir,
		"--api", fmt.Sprintf("127.0.0.1:%d", n.APIPort),
		"--listen", fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", n.P2PPort),
		"--network", n.c.Network,
		"--log-format", "json",
	}
	for _, b := range n.Bootstrap {
		args = append(args, "--bootstrap", b)
	}
	args = append(args, n.c.Extra...)
	args = append(args, n.Extra...)
	logf, err := os.OpenFile(n.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		n.mu.Unlock()
		return err
	}
	cmd := exec.Command(n.c.Bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		n.mu.Unlock()
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		logf.Close()
		close(done)
	}()
	n.cmd, n.done = cmd, done
	n.mu.Unlock()
	st, err := n.WaitStatus(ctx, 60*time.Second, func(Status) bool { return true })
	if err != nil {
		return fmt.Errorf("node %d: %w (log %s)", n.Index, err, n.Log)
	}
	n.PeerID = st.PeerID
	for _, a := range st.Addrs {
		if strings.Contains(a, "/tcp/") {
			n.Addr = a
		}
	}
	return nil
}

// PID is the running process's ID, 0 when the node is down.
func (n *Node) PID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// Running reports whether the node's process is up.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return false
	}
	select {
	case <-n.done:
		return false
	default:
		return true
	}
}

// signal sends sig and waits up to wait for the process to exit; it
// escalates to SIGKILL after that.
func (n *Node) signal(sig syscall.Signal, wait time.Duration) error {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(sig)
	var err error
	select {
	case <-done:
	case <-time.After(wait):
		_ = cmd.Process.Kill()
		<-done
		err = fmt.Errorf("node %d did not exit on %v within %v; killed", n.Index, sig, wait)
	}
	n.mu.Lock()
	n.cmd, n.done = nil, nil
	n.mu.Unlock()
	return err
}

// Stop ends the node with SIGTERM (a clean shutdown) and waits for it.
func (n *Node) Stop() error { return n.signal(syscall.SIGTERM, 20*time.Second) }

// Kill ends the node with SIGKILL (a crash) and waits for it.
func (n *Node) Kill() error { return n.signal(syscall.SIGKILL, 10*time.Second) }

// Close kills every node still running.
func (c *Cluster) Close() {
	for _, n := range c.Nodes {
		_ = n.Kill()
	}
}

// Status reads the node's GET /v1/status.
func (n *Node) Status(ctx context.Context) (Status, error) {
	var st Status
	raw, err := n.Client.Status(ctx)
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(raw, &st)
}

// WaitStatus polls the node's status until ok holds, the process exits,
// ctx ends or timeout passes.
func (n *Node) WaitStatus(ctx context.Context, timeout time.Duration, ok func(Status) bool) (Status, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if !n.Running() {
			return Status{}, errors.New("process exited")
		}
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := n.Status(rctx)
		rcancel()
		if err == nil && ok(st) {
			return st, nil
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if last == nil {
				last = errors.New("condition not met")
			}
			return st, fmt.Errorf("node %d: %w (%w)", n.Index, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Metric returns the sum of every sample of the named metric in the node's
// /metrics whose labels contain all of match (e.g. `reason="budget"`).
func (n *Node) Metric(ctx context.Context, name string, match ...string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.API+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := n.c.HTTP.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(resp.Body); err != nil {
		return 0, err
	}
	return SumMetric(buf.String(), name, match...), nil
}

// SumMetric sums the samples of metric name in a Prometheus text exposition.
func SumMetric(text, name string, match ...string) float64 {
	var sum float64
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		ok := true
		for _, m := range match {
			ok = ok && strings.Contains(rest, m)
		}
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		var v float64
		if _, err := fmt.Sscan(f[len(f)-1], &v); err == nil {
			sum += v
		}
	}
	return sum
}
