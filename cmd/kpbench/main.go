// Command kpbench measures kpnode against the ceilings of the design's
// performance table. Each figure is printed next to its ceiling measured in
// the same run, as a ratio.
//
//	kpbench propagation [-nodes 10] [-runs 50]
//	    publish on one node → stored on all others, in-process nodes on
//	    loopback, against raw gossipsub delivery over the same graph.
//	kpbench fetch [-runs 1000]
//	    fetch round trip between two nodes against a bare stream echo of the
//	    same bytes.
//	kpbench catchup [-missed 10000]
//	    a node offline while bundles are published catches up by sync: time
//	    to converge and sync bytes against the bytes of the missing bundles.
//	kpbench lookup [-nodes 20] [-runs 100]
//	    a light node's GET of an unseen device through the DHT, against a
//	    bare DHT client's first provider plus one fetch round trip.
//	kpbench memory [-bundles 100000]
//	    process RSS with that many bundles stored.
//	kpbench get [-clients 16] [-requests 50000]
//	    local GET /v0/account throughput and p99 against a bare net/http
//	    handler serving the same bytes from memory.
//	kpbench ingest [-count 2000] [-clients 16]
//	    bundles POSTed per second (fsync on) against a tight loop of the same
//	    validation and Badger writes in one process.
//	kpbench burst -nodes .testnet/nodes.json [-count 1000] [-clients 16]
//	    posts count bundles (real 0x004D KeyPackages) to node 1 of a running
//	    testnet as fast as its API takes them and reports when every node
//	    serves every one of them.
//	kpbench partition [-half 3] [-bundles 300] [-accounts 30]
//	    two halves of real kpnode processes publish bundles and account
//	    updates apart, then heal: the sets after healing, acknowledged
//	    bundles missing (must be 0), time to converge.
//	kpbench chaos [-nodes 6] [-duration 2m] [-rate 20]
//	    a paced publish to random live nodes while a random non-bootstrap
//	    node is SIGKILLed and restarted every 15-20 s: acknowledged bundles
//	    lost (must be 0) and time to converge.
//	kpbench claim [-only throughput|light|double] [-devices 200] [-pool 20] [-runs 200] [-duration 60s]
//	    single-use KeyPackages: claims/s of one node over HTTP against GET
//	    /v0/keypackage of the same devices; p50/p99 of a claim through a
//	    light node against a fetch round trip from it to the holder; the
//	    double hand-out rate of 10 claims/s per device for 60 s, pools of
//	    100 kept topped up, requesters on 3 nodes (target < 1 %).
//	kpbench attack -scenario sync-responder|sync-initiator|big-bundle|fetch-all|rollback
//	    one real kpnode under a hostile libp2p host while an honest client
//	    GETs: RSS growth, CPU per hostile vs honest request, time until the
//	    attacker is cut off, honest GET p50/p99, each beside its target.
package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/testnet"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kpbench propagation|fetch|catchup|lookup|memory|get|ingest|burst|partition|chaos|attack|claim [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "burst":
		err = burst(os.Args[2:])
	case "propagation":
		err = propagation(os.Args[2:])
	case "fetch":
		err = fetchRTT(os.Args[2:])
	case "catchup":
		err = catchup(os.Args[2:])
	case "lookup":
		err = lookupBench(os.Args[2:])
	case "memory":
		err = memoryBench(os.Args[2:])
	case "get":
		err = getBench(os.Args[2:])
	case "ingest":
		err = ingestBench(os.Args[2:])
	case "partition":
		err = partition(os.Args[2:])
	case "chaos":
		err = chaos(os.Args[2:])
	case "attack":
		err = attack(os.Args[2:])
	case "claim":
		err = claimBench(os.Args[2:])
	default:
		err = fmt.Errorf("unknown benchmark %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kpbench:", err)
		os.Exit(1)
	}
}

type testnetNode struct {
	Index int    `json:"index"`
	API   string `json:"api"`
}

func burst(args []string) error {
	fs := flag.NewFlagSet("burst", flag.ExitOnError)
	nodesFile := fs.String("nodes", ".testnet/nodes.json", "nodes.json of a running testnet")
	count := fs.Int("count", 1000, "bundles to post (at most 100000)")
	clients := fs.Int("clients", 16, "concurrent HTTP clients (at most 256)")
	timeout := fs.Duration("timeout", 60*time.Second, "give up waiting for the nodes after this long")
	fs.Parse(args)
	if *count < 1 || *count > 100_000 || *clients < 1 || *clients > 256 {
		return errors.New("count must be 1..100000 and clients 1..256")
	}
	raw, err := os.ReadFile(*nodesFile)
	if err != nil {
		return err
	}
	var nodes []testnetNode
	if err := json.Unmarshal(raw, &nodes); err != nil || len(nodes) == 0 {
		return fmt.Errorf("%s: no nodes (%v)", *nodesFile, err)
	}
	fmt.Printf("generating %d KeyPackages (0x004D, last resort)...\n", *count)
	bundles := make([]protocol.Bundle, *count)
	for i := range bundles {
		_, dev, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: dev, LastResort: true})
		if err != nil {
			return err
		}
		bundles[i] = protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
	}
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: *clients}, Timeout: 30 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	target := httpapi.NewClient(nodes[0].API, hc)
	start := time.Now()
	var failed atomic.Int64
	if err := parallel(ctx, *clients, len(bundles), func(i int) error {
		if err := target.PublishBundle(ctx, &bundles[i]); err != nil {
			failed.Add(1)
			fmt.Fprintf(os.Stderr, "post %d: %v\n", i, err)
		}
		return nil
	}); err != nil {
		return err
	}
	posted := time.Since(start)
	fmt.Printf("posted %d bundles to node 1 in %v (%.0f/s), %d failed\n", *count, posted.Round(time.Millisecond), float64(*count)/posted.Seconds(), failed.Load())
	// Each node is done when it serves the last-posted bundles and its
	// status counts them all; then every bundle is checked on every node.
	for _, n := range nodes {
		c := httpapi.NewClient(n.API, hc)
		for {
			raw, err := c.Status(ctx)
			var st struct{ Bundles int64 }
			if err == nil && json.Unmarshal(raw, &st) == nil && st.Bundles >= int64(*count) {
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("node %d holds %d of %d bundles after %v", n.Index, st.Bundles, *count, time.Since(start).Round(time.Millisecond))
			}
			time.Sleep(5 * time.Millisecond)
		}
		fmt.Printf("node %d holds all %d after %v\n", n.Index, *count, time.Since(start).Round(time.Millisecond))
	}
	all := time.Since(start)
	for _, n := range nodes {
		c := httpapi.NewClient(n.API, hc)
		for i := range bundles {
			got, err := c.FetchBundle(ctx, bundles[i].DeviceID)
			if err != nil || string(got.Payload) != string(bundles[i].Payload) {
				return fmt.Errorf("node %d does not serve bundle %d: %v", n.Index, i, err)
			}
		}
	}
	fmt.Printf("burst: %d bundles, %d clients: every bundle served by all %d nodes %v after the first POST (posting took %v)\n",
		*count, *clients, len(nodes), all.Round(time.Millisecond), posted.Round(time.Millisecond))
	return nil
}

// env is one benchmark run's scratch directory and deadline.
type env struct {
	ctx   context.Context
	dir   string
	close func()
}

func newEnv(timeout time.Duration) (*env, error) {
	dir, err := os.MkdirTemp("", "kpbench-")
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	return &env{ctx: ctx, dir: dir, close: func() { cancel(); os.RemoveAll(dir) }}, nil
}

// cluster starts in-process nodes in the run's directory and waits until
// they are ready.
func (e *env) cluster(opts testnet.Options) (*testnet.Cluster, error) {
	opts.Dir = e.dir
	c, err := testnet.Start(e.ctx, opts)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(e.ctx, 2*time.Minute)
	defer cancel()
	if err := c.WaitReady(wctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// parallel calls fn(i) for i in [0, n) from workers goroutines, stopping at
// the first error or when ctx ends, and returns that error.
func parallel(ctx context.Context, workers, n int, fn func(i int) error) error {
	var next atomic.Int64
	var first error
	var once sync.Once
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(i); err != nil {
					once.Do(func() { first = err })
					next.Store(int64(n)) // the others stop too
					return
				}
			}
		}()
	}
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}
