package main

import (
	"errors"
	"flag"
	"os"
	"time"

	"github.com/kpnode/kpnode/testnet/launch/realnet"
)

// chaos: a paced publish to random live nodes while a random non-bootstrap
// node is SIGKILLed and restarted on its data dir every 15-20 s.
func chaos(args []string) error {
	fs := flag.NewFlagSet("chaos", flag.ExitOnError)
	bin := fs.String("bin", "", "kpnode binary (default: build ./cmd/kpnode)")
	nodes := fs.Int("nodes", 6, "nodes (3..20); node 1 is the bootstrap node and is never killed")
	duration := fs.Duration("duration", 2*time.Minute, "length of the paced publish (at most 30m)")
	rate := fs.Int("rate", 20, "bundles per second (1..200); at most duration×rate bundles")
	every := fs.Duration("kill-every", 17500*time.Millisecond, "mean time between SIGKILLs (±25%)")
	down := fs.Duration("down-for", 3*time.Second, "how long a killed node stays down")
	converge := fs.Duration("converge", 2*time.Minute, "give up waiting for convergence after this long")
	fs.Parse(args)
	if *nodes < 3 || *nodes > 20 || *duration <= 0 || *duration > 30*time.Minute || *rate < 1 || *rate > 200 || *every <= 0 || *down <= 0 {
		return errors.New("nodes 3..20, duration up to 30m, rate 1..200, kill-every and down-for positive")
	}
	e, err := newEnv(*duration + *converge + 10*time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	b, err := realBinary(e.ctx, *bin, e.dir)
	if err != nil {
		return err
	}
	res, err := realnet.Chaos(e.ctx, realnet.ChaosOptions{Bin: b, Dir: e.dir, Network: "kpbench-chaos", Nodes: *nodes,
		Duration: *duration, Rate: *rate, KillEvery: *every, DownFor: *down, Converge: *converge, Log: os.Stdout})
	if res != nil && res.Posted > 0 {
		res.Print(os.Stdout)
	}
	return err
}
