package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	mh "github.com/multiformats/go-multihash"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet"
)

// lookup: a light node's GET for a device it has never seen (DHT providers
// of the shard, fetch, validate) in a network whose shards are spread over
// -nodes full nodes, against a bare DHT client's first provider plus one
// fetch round trip.
func lookupBench(args []string) error {
	fs := flag.NewFlagSet("lookup", flag.ExitOnError)
	count := fs.Int("nodes", 20, "full nodes (2..50), each holding 2 of the 8 shards")
	runs := fs.Int("runs", 100, "lookups (1..1000)")
	fs.Parse(args)
	if *count < 2 || *count > 50 || *runs < 1 || *runs > 1000 {
		return errors.New("nodes must be 2..50 and runs 1..1000")
	}
	const S = protocol.DefaultShardCount
	e, err := newEnv(15 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx := e.ctx
	c, err := e.cluster(testnet.Options{Nodes: *count, Configure: func(i int, cfg *node.Config) {
		cfg.Shards, _ = protocol.ParseShardSet(fmt.Sprintf("%d,%d", (2*i)%S, (2*i+1)%S), S)
	}})
	if err != nil {
		return err
	}
	defer c.Close()
	light, err := c.Add(ctx, func(cfg *node.Config) { cfg.Light = true; cfg.Shards = protocol.NoShards(S) })
	if err != nil {
		return err
	}
	for light.DHTPeers() == 0 {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(10 * time.Millisecond)
	}
	bundles, err := newBundles(*runs)
	if err != nil {
		return err
	}
	holderOf := func(shard int) *node.Node {
		for _, n := range c.Nodes[:*count] {
			if n.Shards().Has(shard) {
				return n
			}
		}
		return nil
	}
	for i := range bundles {
		shard := protocol.Shard(bundles[i].DeviceID, S)
		if err := holderOf(shard).SubmitBundle(ctx, &bundles[i]); err != nil {
			return err
		}
	}
	// Every holder of each shard stores its bundles before timing starts.
	for _, n := range c.Nodes[:*count] {
		for i := range bundles {
			if !n.Shards().HasKey(bundles[i].DeviceID) {
				continue
			}
			for {
				if got, _ := n.Bundles(ctx, bundles[i].DeviceID); len(got) > 0 {
					break
				}
				if ctx.Err() != nil {
					return ctx.Err()
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
	}
	var got []time.Duration
	for i := range bundles {
		start := time.Now()
		if _, err := light.LatestBundle(ctx, bundles[i].DeviceID); err != nil {
			return fmt.Errorf("lookup %d: %w", i, err)
		}
		got = append(got, time.Since(start))
	}

	// Ceiling: a bare DHT client on the same network finds the first
	// provider of the shard, then the light node fetches once from it.
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())
	if err != nil {
		return err
	}
	defer h.Close()
	d, err := dht.New(h, dht.Mode(dht.ModeClient), dht.ProtocolPrefix(p2pprotocol.ID(protocol.DHTPrefix(light.NetworkID()))))
	if err != nil {
		return err
	}
	defer d.Close()
	ai, err := peer.AddrInfoFromString(c.Bootstrap()[0])
	if err != nil {
		return err
	}
	if err := h.Connect(ctx, *ai); err != nil {
		return err
	}
	for d.RoutingTable().Size() == 0 && ctx.Err() == nil { // identify adds the peer shortly after connect
		time.Sleep(10 * time.Millisecond)
	}
	if err := <-d.RefreshRoutingTable(); err != nil || d.RoutingTable().Size() == 0 {
		return fmt.Errorf("bare DHT client: routing table of %d peers: %v", d.RoutingTable().Size(), err)
	}
	var ceiling []time.Duration
	for i := range bundles {
		sum, _ := mh.Sum(protocol.ShardProviderKey(light.NetworkID(), protocol.Shard(bundles[i].DeviceID, S)), mh.SHA2_256, -1)
		start := time.Now()
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		p, ok := <-d.FindProvidersAsync(fctx, cid.NewCidV1(cid.Raw, sum), 1)
		fcancel()
		if !ok {
			return errors.New("bare DHT client found no provider")
		}
		found := time.Since(start)
		start = time.Now()
		if _, err := light.FetchLatest(ctx, p.ID, bundles[i].DeviceID); err != nil {
			return err
		}
		ceiling = append(ceiling, found+time.Since(start))
	}
	report(fmt.Sprintf("light-node lookup, %d full nodes, GET of an unseen device", *count), got, ceiling)
	return nil
}

// memory: RSS of a node process's heap-and-all after storing -bundles
// bundles of a real KeyPackage's size.
func memoryBench(args []string) error {
	fs := flag.NewFlagSet("memory", flag.ExitOnError)
	count := fs.Int("bundles", 100_000, "bundles to store (1..1000000)")
	fs.Parse(args)
	if *count < 1 || *count > 1_000_000 {
		return errors.New("bundles must be 1..1000000")
	}
	e, err := newEnv(20 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx, dir := e.ctx, e.dir
	n, err := startLocalNode(ctx, dir, protocol.MLSOff)
	if err != nil {
		return err
	}
	defer n.Close()
	kp := make([]byte, 2850)
	for i := 0; i < *count; i++ {
		rand.Read(kp)
		b := protocol.SignBundle(ed25519Key(), uint64(time.Now().UnixMilli()), kp)
		if _, err := n.Ingest(ctx, &b); err != nil {
			return err
		}
	}
	runtime.GC()
	total, anon, file, err := rss()
	if err != nil {
		return err
	}
	st := n.Status(ctx)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Printf("memory: %d bundles stored (%d devices): RSS %.0f MiB = anonymous %.0f MiB + file-backed %.0f MiB (mmapped Badger files); Go heap in use %.0f MiB, Go runtime total %.0f MiB | target RSS < 300 MiB\n",
		st.Bundles, st.Devices, mib(total), mib(anon), mib(file), mib(int64(ms.HeapInuse)), mib(int64(ms.Sys)))
	return nil
}

// rss reads the process's resident memory from /proc/self/status: total,
// anonymous (heap, stacks, Badger's buffers) and file-backed (mmapped Badger
// tables and value log, which the kernel can drop and re-read).
func rss() (total, anon, file int64, err error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	field := func(line, name string, dst *int64) {
		if v, ok := strings.CutPrefix(line, name); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			*dst = kb << 10
		}
	}
	for sc.Scan() {
		field(sc.Text(), "VmRSS:", &total)
		field(sc.Text(), "RssAnon:", &anon)
		field(sc.Text(), "RssFile:", &file)
	}
	if total == 0 {
		return 0, 0, 0, errors.New("no VmRSS in /proc/self/status")
	}
	return total, anon, file, nil
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
