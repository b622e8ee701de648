package testnet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// Nothing is lost in a burst: 1,000 bundles posted to one node's HTTP API
// by 16 concurrent clients, as fast as it takes them, are all stored by every
// node of a 5-node network. (KeyPackages are opaque here so the test
// measures gossip, not MLS; payloads have a real KeyPackage's size.) The
// network is simulated (100 Mbit/s links, 10 ms latency) and runs in
// virtual time; the clients reach the API's handler in process.
func TestBurstReachesEveryNode(t *testing.T) {
	if testing.Short() {
		t.Skip("burst test in -short mode")
	}
	synctest.Test(t, burstReachesEveryNode)
}

func burstReachesEveryNode(t *testing.T) {
	nw := startSim(t, simnet.Options{Full: 5, ShardCount: protocol.DefaultShardCount, MLS: protocol.MLSOff,
		NodeConfig: func(_ int, cfg *node.Config) { cfg.Shards = protocol.AllShards(protocol.DefaultShardCount) }})
	const total, clients = 1000, 16
	bundles := make([]protocol.Bundle, total)
	for i := range bundles {
		_, dev, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		kp := make([]byte, 2850)
		rand.Read(kp)
		bundles[i] = protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	api := httpapi.NewClient("node-0.invalid", &http.Client{
		Transport: handlerTransport{nw.Nodes[0].Handler()}, Timeout: 30 * time.Second})
	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for w := 0; w < clients; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= total {
					return
				}
				if err := api.PublishBundle(ctx, &bundles[i]); err != nil {
					errs <- fmt.Errorf("bundle %d: %w", i, err)
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
	posted := time.Since(start)
	for i, n := range nw.Nodes {
		if err := eventually(ctx, func() bool {
			raw := n.Status(ctx)
			return raw.Bundles == total
		}); err != nil {
			t.Fatalf("node %d holds %d of %d bundles", i, n.Status(ctx).Bundles, total)
		}
	}
	t.Logf("%d bundles posted in %v, on all %d nodes after %v", total, posted.Round(time.Millisecond), len(nw.Nodes), time.Since(start).Round(time.Millisecond))
}
