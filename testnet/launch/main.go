// Command launch runs a local multi-node kpnode testnet of real processes on
// 127.0.0.1. scripts/testnet.sh builds it and the kpnode binary and calls it:
//
//	launch -bin PATH -dir DIR up [N]   start a bootstrap node and N-1 nodes, wait until ready
//	launch -dir DIR status             one line per node
//	launch -dir DIR logs [i]           a node's log (all nodes' last lines without i)
//	launch -dir DIR down               stop the nodes it started, by PID
//	launch -dir DIR kill i             SIGKILL node i (a crash; its data dir stays)
//	launch -bin PATH -dir DIR start i  restart node i on its data dir and ports, wait until ready
//
// Node i (1 is the bootstrap node) gets DIR/node-i (data), DIR/node-i.log,
// API port APIBASE+i and libp2p port P2PBASE+i (TCP and QUIC). DIR/nodes.json
// lists the running nodes.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// nodeInfo is one entry of nodes.json.
type nodeInfo struct {
	Index   int      `json:"index"`
	API     string   `json:"api"`
	PeerID  string   `json:"peer_id"`
	Addrs   []string `json:"addrs"`
	Network string   `json:"network"`
	PID     int      `json:"pid"`
	DataDir string   `json:"data_dir"`
	Log     string   `json:"log"`
}

type status struct {
	PeerID         string   `json:"peer_id"`
	Addrs          []string `json:"addrs"`
	Network        string   `json:"network"`
	ConnectedPeers int      `json:"connected_peers"`
	Ready          bool     `json:"ready"`
	Bundles        int64    `json:"bundles"`
	Accounts       int64    `json:"accounts"`
}

func main() {
	bin := flag.String("bin", "", "kpnode binary (up)")
	dir := flag.String("dir", ".testnet", "testnet directory")
	apiBase := flag.Int("api-base", envInt("TESTNET_API_BASE", 18080), "API port of node i is api-base+i")
	p2pBase := flag.Int("p2p-base", envInt("TESTNET_P2P_BASE", 19080), "libp2p port of node i is p2p-base+i")
	network := flag.String("network", envOr("TESTNET_NETWORK", "kpnode-testnet"), "network name")
	extra := flag.String("node-flags", os.Getenv("TESTNET_NODE_FLAGS"), "extra flags for every kpnode run, space-separated")
	flag.Parse()
	args := flag.Args()
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: launch [flags] up [N] | status | logs [i] | down | kill i | start i")
		os.Exit(2)
	}
	l := &launcher{bin: *bin, dir: *dir, apiBase: *apiBase, p2pBase: *p2pBase, network: *network, extra: strings.Fields(*extra)}
	var err error
	switch args[0] {
	case "up":
		n := 5
		if len(args) > 1 {
			if n, err = strconv.Atoi(args[1]); err != nil || n < 1 || n > 100 {
				fmt.Fprintln(os.Stderr, "up: N must be a number from 1 to 100")
				os.Exit(2)
			}
		}
		err = l.up(n)
	case "status":
		err = l.status()
	case "logs":
		i := 0
		if len(args) > 1 {
			i, _ = strconv.Atoi(args[1])
		}
		err = l.logs(i)
	case "down":
		err = l.down()
	case "kill", "start":
		i := 0
		if len(args) > 1 {
			i, _ = strconv.Atoi(args[1])
		}
		if args[0] == "kill" {
			err = l.kill(i)
		} else {
			err = l.restart(i)
		}
	default:
		err = fmt.Errorf("unknown command %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testnet:", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envInt(k string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(k)); err == nil {
		return v
	}
	return def
}

type launcher struct {
	bin, dir, network string
	apiBase, p2pBase  int
	extra             []string
}

func (l *launcher) manifest() string { return filepath.Join(l.dir, "nodes.json") }

func (l *launcher) load() ([]nodeInfo, error) {
	raw, err := os.ReadFile(l.manifest())
	if err != nil {
		return nil, err
	}
	var nodes []nodeInfo
	return nodes, json.Unmarshal(raw, &nodes)
}

// alive reports whether pid is a running kpnode process of this testnet.
func (l *launcher) alive(n nodeInfo) bool {
	if n.PID <= 0 || syscall.Kill(n.PID, 0) != nil {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", n.PID))
	return err == nil && strings.Contains(string(cmdline), n.DataDir)
}

func (l *launcher) up(count int) error {
	if nodes, err := l.load(); err == nil {
		running := 0
		for _, n := range nodes {
			if l.alive(n) {
				running++
			}
		}
		if running > 0 {
			return fmt.Errorf("a testnet is already running in %s (%d of %d nodes up); run 'down' first", l.dir, running, len(nodes))
		}
	}
	if l.bin == "" {
		return errors.New("up needs -bin")
	}
	abs, err := filepath.Abs(l.dir)
	if err != nil {
		return err
	}
	l.dir = abs
	if err := os.MkdirAll(l.dir, 0o755); err != nil {
		return err
	}
	var nodes []nodeInfo
	var bootstrap string
	defer func() {
		if err != nil {
			for _, n := range nodes {
				syscall.Kill(n.PID, syscall.SIGTERM)
			}
		}
	}()
	for i := 1; i <= count; i++ {
		var n nodeInfo
		n, err = l.start(i, bootstrap)
		if err != nil {
			return fmt.Errorf("node %d: %w", i, err)
		}
		nodes = append(nodes, n)
		if i == 1 {
			// Node 1 must answer before the others can bootstrap from it.
			var st status
			if st, err = waitStatus(n, 30*time.Second, func(status) bool { return true }); err != nil {
				return fmt.Errorf("node 1: %w (see %s)", err, n.Log)
			}
			for _, a := range st.Addrs {
				if strings.Contains(a, "/tcp/") {
					bootstrap = a
				}
			}
		}
	}
	for i := range nodes {
		st, werr := waitStatus(nodes[i], 60*time.Second, func(s status) bool { return count == 1 || s.Ready })
		if werr != nil {
			err = fmt.Errorf("node %d not ready: %w (see %s)", i+1, werr, nodes[i].Log)
			return err
		}
		nodes[i].PeerID, nodes[i].Addrs, nodes[i].Network = st.PeerID, st.Addrs, st.Network
	}
	raw, err := json.MarshalIndent(nodes, "", "  ")
	if err != nil {
		return err
	}
	if err = os.WriteFile(l.manifest(), append(raw, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("testnet %q: %d nodes up in %s\n\n", l.network, count, l.dir)
	printTable(nodes, nil)
	fmt.Printf("\nnodes.json: %s\n", l.manifest())
	return nil
}

func (l *launcher) start(i int, bootstrap string) (nodeInfo, error) {
	n := nodeInfo{
		Index:   i,
		API:     fmt.Sprintf("http://127.0.0.1:%d", l.apiBase+i),
		Network: l.network,
		DataDir: filepath.Join(l.dir, fmt.Sprintf("node-%d", i)),
		Log:     filepath.Join(l.dir, fmt.Sprintf("node-%d.log", i)),
	}
	p2p := l.p2pBase + i
	args := []string{"run",
		"--data", n.DataDir,
		"--api", fmt.Sprintf("127.0.0.1:%d", l.apiBase+i),
		"--listen", fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", p2p),
		"--listen", fmt.Sprintf("/ip4/127.0.0.1/udp/%d/quic-v1", p2p),
		"--network", l.network,
		"--log-format", "json",
	}
	if bootstrap != "" {
		args = append(args, "--bootstrap", bootstrap)
	}
	args = append(args, l.extra...)
	logf, err := os.OpenFile(n.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return n, err
	}
	defer logf.Close()
	cmd := exec.Command(l.bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = os.Environ()
	// Its own session: the node outlives this launcher and ^C in the shell.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return n, err
	}
	n.PID = cmd.Process.Pid
	go cmd.Wait() // reap it if it dies while we wait
	return n, nil
}

func getStatus(ctx context.Context, api string) (status, error) {
	var st status
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, api+"/v1/status", nil)
	if err != nil {
		return st, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("status %d", resp.StatusCode)
	}
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// waitStatus polls the node's /v1/status until ok holds, the process dies
// or the timeout passes.
func waitStatus(n nodeInfo, timeout time.Duration, ok func(status) bool) (status, error) {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if syscall.Kill(n.PID, 0) != nil {
			return status{}, errors.New("process exited")
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := getStatus(ctx, n.API)
		cancel()
		if err == nil && ok(st) {
			return st, nil
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	if last == nil {
		last = errors.New("not ready")
	}
	return status{}, fmt.Errorf("timed out after %v: %w", timeout, last)
}

func printTable(nodes []nodeInfo, sts map[int]*status) {
	fmt.Printf("%-5s %-24s %-54s %-8s", "index", "api", "peer_id", "pid")
	if sts != nil {
		fmt.Printf(" %-6s %-6s %-8s %-8s", "state", "peers", "bundles", "accounts")
	}
	fmt.Println()
	for _, n := range nodes {
		fmt.Printf("%-5d %-24s %-54s %-8d", n.Index, n.API, n.PeerID, n.PID)
		if sts != nil {
			if st := sts[n.Index]; st != nil {
				state := "up"
				if st.Ready {
					state = "ready"
				}
				fmt.Printf(" %-6s %-6d %-8d %-8d", state, st.ConnectedPeers, st.Bundles, st.Accounts)
			} else {
				fmt.Printf(" %-6s", "down")
			}
		}
		fmt.Println()
	}
}

func (l *launcher) status() error {
	nodes, err := l.load()
	if err != nil {
		return fmt.Errorf("no testnet in %s: %w", l.dir, err)
	}
	sts := map[int]*status{}
	for _, n := range nodes {
		if !l.alive(n) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := getStatus(ctx, n.API)
		cancel()
		if err == nil {
			sts[n.Index] = &st
		}
	}
	printTable(nodes, sts)
	return nil
}

func (l *launcher) logs(i int) error {
	nodes, err := l.load()
	if err != nil {
		return fmt.Errorf("no testnet in %s: %w", l.dir, err)
	}
	for _, n := range nodes {
		if i != 0 && n.Index != i {
			continue
		}
		f, err := os.Open(n.Log)
		if err != nil {
			return err
		}
		if i != 0 {
			_, err = io.Copy(os.Stdout, f)
			f.Close()
			return err
		}
		var tail []string
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			tail = append(tail, sc.Text())
			if len(tail) > 10 {
				tail = tail[1:]
			}
		}
		f.Close()
		fmt.Printf("== node %d (%s)\n%s\n", n.Index, n.Log, strings.Join(tail, "\n"))
	}
	if i != 0 {
		return fmt.Errorf("no node %d", i)
	}
	return nil
}

// down stops the nodes listed in nodes.json, by PID, checking first that
// each PID is still one of this testnet's kpnode processes.
func (l *launcher) down() error {
	nodes, err := l.load()
	if err != nil {
		return fmt.Errorf("no testnet in %s: %w", l.dir, err)
	}
	for _, n := range nodes {
		if l.alive(n) {
			syscall.Kill(n.PID, syscall.SIGTERM)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for _, n := range nodes {
		for l.alive(n) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if l.alive(n) {
			syscall.Kill(n.PID, syscall.SIGKILL)
			fmt.Printf("node %d (pid %d) did not stop on SIGTERM; killed\n", n.Index, n.PID)
		}
	}
	if err := os.Remove(l.manifest()); err != nil {
		return err
	}
	fmt.Printf("testnet in %s stopped (%d nodes); data and logs kept\n", l.dir, len(nodes))
	return nil
}

// kill ends node i with SIGKILL, as a crash would, and waits until it is gone.
func (l *launcher) kill(i int) error {
	nodes, err := l.load()
	if err != nil {
		return fmt.Errorf("no testnet in %s: %w", l.dir, err)
	}
	if i < 1 || i > len(nodes) {
		return fmt.Errorf("no node %d (1..%d)", i, len(nodes))
	}
	n := nodes[i-1]
	if !l.alive(n) {
		return fmt.Errorf("node %d is not running", i)
	}
	if err := syscall.Kill(n.PID, syscall.SIGKILL); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for l.alive(n) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("node %d (pid %d) killed; 'start %d' restarts it on %s\n", i, n.PID, i, n.DataDir)
	return nil
}

// restart starts node i again on its data dir and ports (taken from
// nodes.json), bootstrapping from node 1 like at 'up', waits until it is
// ready and records its new PID.
func (l *launcher) restart(i int) error {
	nodes, err := l.load()
	if err != nil {
		return fmt.Errorf("no testnet in %s: %w", l.dir, err)
	}
	if i < 1 || i > len(nodes) {
		return fmt.Errorf("no node %d (1..%d)", i, len(nodes))
	}
	if l.bin == "" {
		return errors.New("start needs -bin")
	}
	n := nodes[i-1]
	if l.alive(n) {
		return fmt.Errorf("node %d is running (pid %d)", i, n.PID)
	}
	// The ports of 'up', whatever the environment says now.
	if p, err := portOf(n.API, ":"); err == nil {
		l.apiBase = p - i
	}
	for _, a := range n.Addrs {
		if p, err := portOf(a, "/tcp/"); err == nil {
			l.p2pBase = p - i
			break
		}
	}
	l.dir, l.network = filepath.Dir(n.DataDir), n.Network
	var bootstrap string
	if i != 1 {
		for _, a := range nodes[0].Addrs {
			if strings.Contains(a, "/tcp/") {
				bootstrap = a
			}
		}
	}
	started, err := l.start(i, bootstrap)
	if err != nil {
		return err
	}
	st, err := waitStatus(started, 60*time.Second, func(s status) bool { return len(nodes) == 1 || s.Ready })
	if err != nil {
		syscall.Kill(started.PID, syscall.SIGTERM)
		return fmt.Errorf("node %d not ready: %w (see %s)", i, err, started.Log)
	}
	started.PeerID, started.Addrs, started.Network = st.PeerID, st.Addrs, st.Network
	nodes[i-1] = started
	raw, err := json.MarshalIndent(nodes, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(l.manifest(), append(raw, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("node %d restarted (pid %d, %d bundles, %d accounts)\n", i, started.PID, st.Bundles, st.Accounts)
	return nil
}

// portOf reads the port after the last sep in s ("http://h:18081",
// "/ip4/127.0.0.1/tcp/19081/p2p/...").
func portOf(s, sep string) (int, error) {
	j := strings.LastIndex(s, sep)
	if j < 0 {
		return 0, fmt.Errorf("no port in %q", s)
	}
	rest := s[j+len(sep):]
	if k := strings.IndexByte(rest, '/'); k >= 0 {
		rest = rest[:k]
	}
	return strconv.Atoi(rest)
}
