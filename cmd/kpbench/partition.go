package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kpnode/kpnode/testnet/launch/realnet"
)

// realBinary returns the kpnode binary to run: bin if set, else one built
// into dir from this source tree.
func realBinary(ctx context.Context, bin, dir string) (string, error) {
	if bin != "" {
		return filepath.Abs(bin)
	}
	fmt.Println("building kpnode...")
	return realnet.Build(ctx, dir)
}

// partition: two halves of real kpnode processes publish on both sides,
// then one node of B restarts knowing A; the figures of the heal.
func partition(args []string) error {
	fs := flag.NewFlagSet("partition", flag.ExitOnError)
	bin := fs.String("bin", "", "kpnode binary (default: build ./cmd/kpnode)")
	half := fs.Int("half", 3, "nodes per half (2..10)")
	bundles := fs.Int("bundles", 300, "bundles published on each side (1..10000)")
	accounts := fs.Int("accounts", 30, "accounts updated on both sides (1..1000)")
	updates := fs.Int("updates", 4, "most account versions one side publishes per account (1..50)")
	converge := fs.Duration("converge", 3*time.Minute, "give up waiting for convergence after this long")
	fs.Parse(args)
	if *half < 2 || *half > 10 || *bundles < 1 || *bundles > 10_000 || *accounts < 1 || *accounts > 1000 || *updates < 1 || *updates > 50 {
		return errors.New("half 2..10, bundles 1..10000, accounts 1..1000, updates 1..50")
	}
	e, err := newEnv(*converge + 5*time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	b, err := realBinary(e.ctx, *bin, e.dir)
	if err != nil {
		return err
	}
	res, err := realnet.Partition(e.ctx, realnet.PartitionOptions{Bin: b, Dir: e.dir, Network: "kpbench-partition",
		Half: *half, Bundles: *bundles, Accounts: *accounts, Updates: *updates, Converge: *converge, Log: os.Stdout})
	if res != nil && len(res.Counts) > 0 {
		res.Print(os.Stdout)
	}
	return err
}
