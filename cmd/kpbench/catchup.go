package main

import (
	"errors"
	"flag"
	"fmt"
	"net/http/httptest"
	"strconv"
	"strings"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet"
)

// metricSum adds up every sample of a metric family on a node's /metrics.
func metricSum(n *node.Node, name string) float64 {
	rec := httptest.NewRecorder()
	n.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	total := 0.0
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ") {
			v, _ := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			total += v
		}
	}
	return total
}

// catchup: a node offline while -missed bundles are published catches up
// by sync when it returns; the bytes sync moved are held against the bytes
// of the missing bundles (device_id ‖ payload ‖ signature).
func catchup(args []string) error {
	fs := flag.NewFlagSet("catchup", flag.ExitOnError)
	missed := fs.Int("missed", 10_000, "bundles published while the node is offline (1..100000)")
	fs.Parse(args)
	if *missed < 1 || *missed > 100_000 {
		return errors.New("missed must be 1..100000")
	}
	e, err := newEnv(20 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx := e.ctx
	c, err := e.cluster(testnet.Options{Nodes: 3})
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Printf("generating %d KeyPackages...\n", *missed)
	bundles, err := newBundles(*missed)
	if err != nil {
		return err
	}
	if err := c.Stop(2); err != nil {
		return err
	}
	if err := parallel(ctx, 8, len(bundles), func(i int) error { return c.Nodes[0].SubmitBundle(ctx, &bundles[i]) }); err != nil {
		return err
	}
	missingBytes := 0
	for _, b := range bundles {
		missingBytes += protocol.KeySize + len(b.Payload) + protocol.SignatureSize
	}
	want := int64(*missed)
	for c.Nodes[1].Status(ctx).Bundles < want {
		if ctx.Err() != nil {
			return errors.New("node 2 never got the bundles")
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	n, err := c.Restart(ctx, 2)
	if err != nil {
		return err
	}
	for n.Status(ctx).Bundles < want {
		if ctx.Err() != nil {
			return fmt.Errorf("node 3 holds %d of %d after %v", n.Status(ctx).Bundles, want, time.Since(start))
		}
		time.Sleep(10 * time.Millisecond)
	}
	converged := time.Since(start)
	moved := metricSum(n, "kpnode_sync_bytes_total")
	fmt.Printf("catch-up after %d publishes offline: converged %v after restart, sync moved %.0f bytes for %d bytes of missing bundles | ratio %.2f×\n",
		*missed, converged.Round(time.Millisecond), moved, missingBytes, moved/float64(missingBytes))
	return nil
}
