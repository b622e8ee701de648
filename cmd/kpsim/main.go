// Command kpsim runs networks of kpnode nodes on go-libp2p's simulated
// network in virtual time (testing/synctest, through testnet/simnet) and
// measures how propagation, traffic, DHT lookups, sync after a rejoin and
// memory grow with the number of nodes.
//
//	go run ./cmd/kpsim -n 50,100,250 -out docs/scale/sim
//
// For each N it builds a network (full and light nodes, S shards each held
// by at least R full nodes), publishes a paced stream of real bundles
// (MLS-valid KeyPackages, as testnet/simnet.NewBundle makes them), and
// reports the figures as a Markdown table (stdout and OUT.md), JSON
// (OUT.json) and an SVG plot (OUT.svg) with one panel per figure against N
// on a log axis, each panel saying whether the figure fits a + b·log N
// better than a + b·N.
//
// synctest.Test needs a *testing.T, so main runs the simulation through
// testing.Main with one test; kpsim's own flags are parsed first.
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"
)

func main() {
	cfg := DefaultConfig()
	fs := flag.CommandLine
	ns := fs.String("n", "50,100,250,500,1000", "comma-separated network sizes")
	fs.Float64Var(&cfg.LightFraction, "light", cfg.LightFraction, "fraction of the nodes that are light (at least 1)")
	fs.IntVar(&cfg.Shards, "shards", cfg.Shards, "shard count S")
	fs.IntVar(&cfg.Replication, "replication", cfg.Replication, "minimum full nodes per shard R")
	fs.IntVar(&cfg.Degree, "degree", cfg.Degree, "peers each node dials at start")
	fs.IntVar(&cfg.Pubs, "pubs", cfg.Pubs, "bundles published per network")
	fs.DurationVar(&cfg.Interval, "interval", cfg.Interval, "virtual time between two publications")
	fs.IntVar(&cfg.Lookups, "lookups", cfg.Lookups, "lookups from a light node")
	fs.IntVar(&cfg.RejoinBundles, "rejoin-bundles", cfg.RejoinBundles, "bundles published while the rejoining node is away")
	fs.DurationVar(&cfg.Warmup, "warmup", cfg.Warmup, "virtual time between ready and the traffic windows")
	fs.DurationVar(&cfg.Away, "away", cfg.Away, "virtual time the rejoining node is cut off")
	fs.DurationVar(&cfg.Latency, "latency", cfg.Latency, "one-way link latency")
	fs.Int64Var(&cfg.Seed, "seed", cfg.Seed, "seed of identities, topology and devices")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	out := fs.String("out", "", "write OUT.md, OUT.json and OUT.svg (default: table on stdout only)")
	merge := fs.String("merge", "", "comma-separated JSON reports of earlier runs (same settings, other sizes) to write as one table, plot and fit, instead of simulating")
	testing.Init()
	flag.Parse()
	if *merge != "" {
		if err := mergeReports(os.Stdout, *out, strings.Split(*merge, ",")); err != nil {
			fmt.Fprintln(os.Stderr, "kpsim:", err)
			os.Exit(1)
		}
		return
	}
	for _, f := range strings.Split(*ns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			fmt.Fprintf(os.Stderr, "kpsim: -n: %v\n", err)
			os.Exit(2)
		}
		cfg.Sizes = append(cfg.Sizes, n)
	}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintln(os.Stderr, "kpsim:", err)
		os.Exit(2)
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "kpsim:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile() // testing.Main exits: stopped in run
	}
	run := func(t *testing.T) {
		if *cpuprofile != "" {
			defer pprof.StopCPUProfile()
		}
		var results []Result
		for _, n := range cfg.Sizes {
			start := time.Now()
			r := Simulate(t, cfg, n)
			r.WallSec = time.Since(start).Seconds()
			fmt.Fprintf(os.Stderr, "kpsim: N=%d done in %.0f s wall\n", n, r.WallSec)
			results = append(results, r)
			if t.Failed() {
				break
			}
			// Write after every N, so a long run leaves what it measured.
			if err := Write(os.Stdout, *out, cfg, results, len(results) == len(cfg.Sizes)); err != nil {
				t.Fatal(err)
			}
		}
	}
	testing.Main(func(_, _ string) (bool, error) { return true, nil },
		[]testing.InternalTest{{Name: "Sim", F: run}}, nil, nil)
}
