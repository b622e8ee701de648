package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/ipfs/go-cid"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/core/routing"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/node/discovery"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// Config is what kpsim simulates.
type Config struct {
	Sizes         []int
	LightFraction float64
	Shards        int
	Replication   int
	Degree        int
	Pubs          int
	Interval      time.Duration
	Lookups       int
	RejoinBundles int
	Away          time.Duration
	Latency       time.Duration
	Seed          int64
	// Warmup is the virtual time between ready and the traffic windows.
	Warmup time.Duration
	// Settle bounds how long (virtual) the network may take to become
	// ready, to deliver a stream, and a rejoined node to catch up.
	Settle time.Duration
}

// DefaultConfig returns kpsim's defaults.
func DefaultConfig() Config {
	return Config{
		LightFraction: 0.1,
		Shards:        protocol.DefaultShardCount,
		Replication:   3,
		Degree:        simnet.DefaultDegree,
		Pubs:          20,
		Interval:      250 * time.Millisecond,
		Lookups:       10,
		RejoinBundles: 10,
		Away:          45 * time.Second,
		Latency:       simnet.DefaultLatency,
		Seed:          1,
		Warmup:        time.Minute,
		Settle:        5 * time.Minute,
	}
}

// Validate reports whether c can run.
func (c Config) Validate() error {
	switch {
	case len(c.Sizes) == 0:
		return errors.New("no network size")
	case c.LightFraction < 0 || c.LightFraction >= 1:
		return fmt.Errorf("light fraction %v not in [0, 1)", c.LightFraction)
	case c.Pubs < 1 || c.Lookups < 1 || c.RejoinBundles < 1:
		return errors.New("pubs, lookups and rejoin bundles must be positive")
	case c.Interval <= 0 || c.Away <= 0 || c.Settle <= 0:
		return errors.New("interval, away and settle must be positive")
	}
	for _, n := range c.Sizes {
		if full, _ := c.split(n); full < c.Replication+1 || full < 2 {
			return fmt.Errorf("N=%d leaves too few full nodes for replication %d", n, c.Replication)
		}
	}
	return nil
}

// split returns the full and light node counts of a network of n.
func (c Config) split(n int) (full, light int) {
	light = max(1, int(math.Round(float64(n)*c.LightFraction)))
	return n - light, light
}

// Result is what one network of N nodes measured. Times are virtual.
type Result struct {
	N, Full, Light, Shards int
	// HoldersPerShard is the mean number of full nodes holding a shard.
	HoldersPerShard float64
	Pubs            int
	// ReadySec: virtual time from Start until every node was ready.
	ReadySec float64
	// Propagation from SubmitBundle to each holder's store, over every
	// (bundle, holder) pair, and to the last holder of each bundle.
	PropP50Ms, PropP99Ms, PropAllP99Ms float64
	// Delivered is the fraction of (bundle, holder) pairs stored.
	Delivered float64
	// Traffic of the publication window net of an idle window of the same
	// length (QUIC packets and bytes sent on the simulated links), per
	// node per publication.
	PktsPerNodePerPub, BytesPerNodePerPub float64
	// HolderBytesPerHeldPub: a full node's bytes (in+out, net of the
	// background) per publication of a shard it holds; LightBytesPerPub: a
	// light node's bytes (in+out) per publication.
	HolderBytesPerHeldPub, LightBytesPerPub float64
	// Lookups from a light node: LatestBundle latency, and the kad-dht
	// query for the shard's providers from the same host.
	LookupOK                 int
	LookupP50Ms, LookupP99Ms float64
	// LookupBytes: bytes sent by all nodes per lookup (DHT query and
	// fetches), net of the background.
	LookupBytes              float64
	DHTHops, DHTPeersQueried float64
	DHTFirstProviderMs       float64
	// A full node cut off for Away while RejoinBundles of its shard were
	// published, then reconnected: its sync bytes (in+out) and initiator
	// rounds until it held them all, and the virtual time that took.
	RejoinMissed                      int
	SyncBytes, SyncRounds, CatchupSec float64
	RejoinCaughtUp                    bool
	// Memory: heap in use after GC once the network was ready, per node;
	// the process's peak RSS so far.
	HeapPerNodeMiB, PeakRSSMiB float64
	WallSec                    float64

	idleBytesPerSec float64 // background, all nodes
}

// wall returns the real time: inside a bubble time.Now is virtual.
func wall() time.Time {
	var tv syscall.Timeval
	_ = syscall.Gettimeofday(&tv)
	return time.Unix(tv.Sec, int64(tv.Usec)*1000)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kpsim: %s "+format+"\n", append([]any{wall().UTC().Format("15:04:05")}, args...)...)
}

// stores records when each node stored each device's bundle (virtual).
type stores struct {
	mu sync.Mutex
	at map[protocol.Key]map[int]time.Time
}

func (s *stores) add(i int, dev protocol.Key) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.at[dev]
	if m == nil {
		m = map[int]time.Time{}
		s.at[dev] = m
	}
	if _, ok := m[i]; !ok {
		m[i] = now
	}
}

func (s *stores) has(i int, dev protocol.Key) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.at[dev][i]
	return ok
}

func (s *stores) when(i int, dev protocol.Key) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.at[dev][i]
	return t, ok
}

type published struct {
	b     protocol.Bundle
	shard int
	at    time.Time
}

// Simulate builds a network of n nodes in a synctest bubble, runs the
// scenario and returns what it measured.
func Simulate(t *testing.T, c Config, n int) Result {
	full, light := c.split(n)
	res := Result{N: n, Full: full, Light: light, Shards: c.Shards, Pubs: c.Pubs}
	synctest.Test(t, func(t *testing.T) {
		if err := simulate(t, c, &res); err != nil {
			t.Errorf("N=%d: %v", n, err)
		}
	})
	return res
}

func simulate(t *testing.T, c Config, res *Result) error {
	st := &stores{at: map[protocol.Key]map[int]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w0 := wall()
	nw, err := simnet.New(simnet.Options{
		Full: res.Full, Light: res.Light, ShardCount: c.Shards, Replication: c.Replication,
		Latency: c.Latency, Seed: c.Seed, Degree: c.Degree,
		NodeConfig: func(i int, nc *node.Config) {
			nc.OnBundleStored = func(dev protocol.Key, _ protocol.Ref) { st.add(i, dev) }
		},
	})
	if err != nil {
		return err
	}
	defer func() {
		w := wall()
		if err := nw.Close(); err != nil {
			t.Logf("close: %v", err)
		}
		logf("N=%d closed in %v wall", res.N, wall().Sub(w).Round(time.Millisecond))
	}()
	logf("N=%d built in %v wall", res.N, wall().Sub(w0).Round(time.Millisecond))
	v0 := time.Now()
	if err := nw.Start(ctx); err != nil {
		return err
	}
	rctx, rcancel := context.WithTimeout(ctx, c.Settle)
	err = nw.WaitReady(rctx)
	rcancel()
	if err != nil {
		return fmt.Errorf("ready: %w", err)
	}
	res.ReadySec = time.Since(v0).Seconds()
	var holders float64
	for s := range c.Shards {
		holders += float64(len(nw.HoldersOfShard(s)))
	}
	res.HoldersPerShard = holders / float64(c.Shards)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	res.HeapPerNodeMiB = float64(ms.HeapAlloc) / float64(res.N) / (1 << 20)
	logf("N=%d ready after %.1f s virtual, %v wall; heap %.2f MiB/node", res.N, res.ReadySec, wall().Sub(w0).Round(time.Second), res.HeapPerNodeMiB)

	rng := rand.New(rand.NewPCG(uint64(c.Seed), uint64(res.N)))
	if err := measureStream(ctx, c, nw, st, rng, res); err != nil {
		return err
	}
	logf("N=%d stream: p50 %.0f ms, p99 %.0f ms, delivered %.4f", res.N, res.PropP50Ms, res.PropP99Ms, res.Delivered)
	if err := measureLookups(ctx, c, nw, rng, res); err != nil {
		return err
	}
	logf("N=%d lookups: %d/%d ok, p50 %.0f ms, %.1f hops", res.N, res.LookupOK, c.Lookups, res.LookupP50Ms, res.DHTHops)
	if err := measureRejoin(ctx, c, nw, st, rng, res); err != nil {
		return err
	}
	logf("N=%d rejoin: %.0f sync bytes, %.0f rounds, %.1f s", res.N, res.SyncBytes, res.SyncRounds, res.CatchupSec)
	res.PeakRSSMiB = peakRSSMiB()
	return nil
}

type traffic struct {
	pkts, bytes float64
	// sent is each node's bytes sent plus received.
	node []float64
}

func totalTraffic(nw *simnet.Network) traffic {
	var tr traffic
	for i := range nw.Nodes {
		x := nw.Traffic(i)
		tr.pkts += float64(x.PacketsSent)
		tr.bytes += float64(x.BytesSent)
		tr.node = append(tr.node, float64(x.BytesSent+x.BytesRcvd))
	}
	return tr
}

// measureStream publishes c.Pubs bundles, one every c.Interval, each
// through a random node, and waits until every holder stored every one.
// An idle window of the same length before it is the traffic baseline.
func measureStream(ctx context.Context, c Config, nw *simnet.Network, st *stores, rng *rand.Rand, res *Result) error {
	// Build the bundles first: their MLS key generation is CPU, not
	// network, and happens outside both windows.
	pubs := make([]published, c.Pubs)
	for k := range pubs {
		shard := rng.IntN(c.Shards)
		b, err := nw.NewBundle(shard)
		if err != nil {
			return err
		}
		pubs[k] = published{b: b, shard: shard}
	}
	// Let the start-up traffic (DHT refreshes, first syncs) pass, then
	// take an idle window before and after the publication window as the
	// background to subtract.
	time.Sleep(c.Warmup)
	window := time.Duration(c.Pubs)*c.Interval + 5*time.Second
	idle0, t0 := totalTraffic(nw), time.Now()
	time.Sleep(window) // pacing: the idle window, not synchronisation
	idle1, t1 := totalTraffic(nw), time.Now()

	start := time.Now()
	tick := time.NewTicker(c.Interval)
	defer tick.Stop()
	for k := range pubs {
		p := &pubs[k]
		p.at = time.Now()
		if err := nw.Nodes[rng.IntN(len(nw.Nodes))].SubmitBundle(ctx, &p.b); err != nil {
			return fmt.Errorf("publish %d: %w", k, err)
		}
		if k < len(pubs)-1 {
			<-tick.C
		}
	}
	all := func() bool {
		for _, p := range pubs {
			for _, h := range nw.HoldersOfShard(p.shard) {
				if !st.has(h, p.b.DeviceID) {
					return false
				}
			}
		}
		return true
	}
	wctx, wcancel := context.WithTimeout(ctx, c.Settle)
	werr := nw.WaitFor(wctx, all)
	wcancel()
	if rest := window - time.Since(start); rest > 0 {
		time.Sleep(rest) // the publication window as long as the idle one
	}
	busy1, t2 := totalTraffic(nw), time.Now()
	time.Sleep(window) // pacing: the second idle window
	idle2, t3 := totalTraffic(nw), time.Now()

	// Background rate: both idle windows together.
	idleSec := t1.Sub(t0).Seconds() + t3.Sub(t2).Seconds()
	busySec := t2.Sub(start).Seconds()
	per := float64(res.N) * float64(c.Pubs)
	res.PktsPerNodePerPub = ((busy1.pkts - idle1.pkts) - (idle1.pkts-idle0.pkts+idle2.pkts-busy1.pkts)*busySec/idleSec) / per
	res.BytesPerNodePerPub = ((busy1.bytes - idle1.bytes) - (idle1.bytes-idle0.bytes+idle2.bytes-busy1.bytes)*busySec/idleSec) / per

	// Per node, in and out: a full node's net traffic is charged to the
	// publications of the shards it holds (an upper bound: it also relays
	// DHT and IHAVE traffic for others); light nodes hold nothing.
	held := make([]int, len(nw.Nodes))
	for _, p := range pubs {
		for _, h := range nw.HoldersOfShard(p.shard) {
			held[h]++
		}
	}
	var holderBytes, lightBytes float64
	var heldPubs int
	for i, n := range nw.Nodes {
		net := (busy1.node[i] - idle1.node[i]) - (idle1.node[i]-idle0.node[i]+idle2.node[i]-busy1.node[i])*busySec/idleSec
		if n.Light {
			lightBytes += net
		} else {
			holderBytes += net
			heldPubs += held[i]
		}
	}
	res.idleBytesPerSec = (idle1.bytes - idle0.bytes + idle2.bytes - busy1.bytes) / idleSec
	res.HolderBytesPerHeldPub = holderBytes / float64(max(heldPubs, 1))
	res.LightBytesPerPub = lightBytes / float64(res.Light*c.Pubs)

	var delays, last []float64
	pairs := 0
	for _, p := range pubs {
		worst, complete := 0.0, true
		for _, h := range nw.HoldersOfShard(p.shard) {
			pairs++
			at, ok := st.when(h, p.b.DeviceID)
			if !ok {
				complete = false
				continue
			}
			d := float64(at.Sub(p.at).Microseconds()) / 1000
			delays = append(delays, d)
			worst = max(worst, d)
		}
		if complete {
			last = append(last, worst)
		}
	}
	res.Delivered = float64(len(delays)) / float64(pairs)
	res.PropP50Ms = quantile(delays, 0.5)
	res.PropP99Ms = quantile(delays, 0.99)
	res.PropAllP99Ms = quantile(last, 0.99)
	if werr != nil {
		return fmt.Errorf("stream not delivered to every holder (%.4f): %w", res.Delivered, werr)
	}
	return nil
}

// measureLookups asks a light node for c.Lookups devices it has never
// seen (LatestBundle: DHT, then fetches from holders) and, on the same
// host, runs the same kad-dht provider query with query events, which
// give the hops: a peer the query started from is hop 1, a peer named by a
// hop-k peer is hop k+1; the hops of a query (which stops at the first
// provider) are the largest hop it asked.
func measureLookups(ctx context.Context, c Config, nw *simnet.Network, rng *rand.Rand, res *Result) error {
	var lights []*simnet.Node
	for _, n := range nw.Nodes {
		if n.Light {
			lights = append(lights, n)
		}
	}
	ln := lights[rng.IntN(len(lights))]
	var devs []protocol.Bundle
	for range c.Lookups {
		b, err := nw.NewBundle(-1)
		if err != nil {
			return err
		}
		if err := nw.Nodes[rng.IntN(res.Full)].SubmitBundle(ctx, &b); err != nil {
			return err
		}
		devs = append(devs, b)
	}
	wctx, wcancel := context.WithTimeout(ctx, c.Settle)
	err := nw.WaitFor(wctx, func() bool {
		for _, b := range devs {
			if len(nw.Holders(wctx, b.DeviceID)) < len(nw.HoldersOfShard(protocol.Shard(b.DeviceID, c.Shards))) {
				return false
			}
		}
		return true
	})
	wcancel()
	if err != nil {
		return fmt.Errorf("lookup bundles not stored: %w", err)
	}

	var lat []float64
	tr0, w0 := totalTraffic(nw), time.Now()
	for _, b := range devs {
		t0 := time.Now()
		got, err := ln.LatestBundle(ctx, b.DeviceID)
		if err == nil && bytes.Equal(got.Payload, b.Payload) {
			res.LookupOK++
			lat = append(lat, float64(time.Since(t0).Microseconds())/1000)
		}
	}
	tr1, w1 := totalTraffic(nw), time.Now()
	res.LookupBytes = (tr1.bytes - tr0.bytes - res.idleBytesPerSec*w1.Sub(w0).Seconds()) / float64(len(devs))
	res.LookupP50Ms = quantile(lat, 0.5)
	res.LookupP99Ms = quantile(lat, 0.99)

	d, err := dht.New(ln.Host, dht.Mode(dht.ModeClient),
		dht.ProtocolPrefix(p2pprotocol.ID(protocol.DHTPrefix(ln.NetworkID()))))
	if err != nil {
		return fmt.Errorf("dht client: %w", err)
	}
	defer d.Close()
	wctx, wcancel = context.WithTimeout(ctx, c.Settle)
	err = nw.WaitFor(wctx, func() bool { return d.RoutingTable().Size() > 0 })
	wcancel()
	if err != nil {
		return fmt.Errorf("light node's DHT client: %w", err)
	}
	var hops, asked, first []float64
	for _, b := range devs {
		h, q, f, ok := dhtQuery(ctx, d, discovery.ShardCID(ln.NetworkID(), protocol.Shard(b.DeviceID, c.Shards)))
		if ok {
			hops = append(hops, h)
			asked = append(asked, q)
			first = append(first, f)
		}
	}
	res.DHTHops = mean(hops)
	res.DHTPeersQueried = mean(asked)
	res.DHTFirstProviderMs = quantile(first, 0.5)
	return nil
}

func dhtQuery(ctx context.Context, d *dht.IpfsDHT, key cid.Cid) (hops, asked, firstMs float64, ok bool) {
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	qctx, events := routing.RegisterForQueryEvents(qctx)
	// depth: hop of each peer the query learnt of; sent: peers asked.
	depth := map[peer.ID]int{}
	sent := map[peer.ID]bool{}
	deepest := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range events {
			switch ev.Type {
			case routing.SendingQuery:
				k := max(depth[ev.ID], 1)
				depth[ev.ID] = k
				sent[ev.ID] = true
				deepest = max(deepest, k)
			case routing.PeerResponse:
				k := max(depth[ev.ID], 1)
				for _, ai := range ev.Responses {
					if cur, ok := depth[ai.ID]; !ok || k+1 < cur {
						depth[ai.ID] = k + 1
					}
				}
			}
		}
	}()
	t0 := time.Now()
	for range d.FindProvidersAsync(qctx, key, 1) {
		if !ok {
			firstMs = float64(time.Since(t0).Microseconds()) / 1000
			ok = true
		}
	}
	cancel()
	<-done
	// With count 1 the query stops at the first provider, so the deepest
	// peer asked is the hop that found it (or a concurrent one as deep).
	hops = float64(deepest)
	asked = float64(len(sent))
	return hops, asked, firstMs, ok
}

// measureRejoin cuts a full node off for c.Away (long enough for its
// connections to time out), publishes c.RejoinBundles bundles of its shard
// meanwhile, reconnects it and measures its sync until it holds them all.
func measureRejoin(ctx context.Context, c Config, nw *simnet.Network, st *stores, rng *rand.Rand, res *Result) error {
	r := res.Full - 1
	shard := nw.Nodes[r].Shards().List()[0]
	nw.Partition([]int{r})
	cutAt := time.Now()
	var devs []protocol.Key
	for range c.RejoinBundles {
		b, err := nw.NewBundle(shard)
		if err != nil {
			return err
		}
		from := rng.IntN(res.Full - 1) // any full node but r
		if err := nw.Nodes[from].SubmitBundle(ctx, &b); err != nil {
			return err
		}
		devs = append(devs, b.DeviceID)
		time.Sleep(c.Interval) // pacing
	}
	others := slices.DeleteFunc(nw.HoldersOfShard(shard), func(i int) bool { return i == r })
	wctx, wcancel := context.WithTimeout(ctx, c.Settle)
	err := nw.WaitFor(wctx, func() bool {
		for _, d := range devs {
			for _, h := range others {
				if !st.has(h, d) {
					return false
				}
			}
		}
		return true
	})
	wcancel()
	if err != nil {
		return fmt.Errorf("rejoin bundles not stored by the other holders: %w", err)
	}
	for _, d := range devs {
		if !st.has(r, d) {
			res.RejoinMissed++
		}
	}
	if rest := c.Away - time.Since(cutAt); rest > 0 {
		time.Sleep(rest) // away for c.Away
	}
	syncBytes := func() float64 {
		return nw.Metric(r, `kpnode_sync_bytes_total{direction="in"}`) + nw.Metric(r, `kpnode_sync_bytes_total{direction="out"}`)
	}
	b0, r0 := syncBytes(), nw.Metric(r, "kpnode_sync_rounds_total")
	t0 := time.Now()
	if err := nw.Heal(ctx); err != nil {
		return err
	}
	// Heal redials the seeded links only: the node finds its shard's
	// holders through the DHT itself (node/peering.go) and syncs with them.
	wctx, wcancel = context.WithTimeout(ctx, c.Settle)
	err = nw.WaitFor(wctx, func() bool {
		for _, d := range devs {
			if !st.has(r, d) {
				return false
			}
		}
		return true
	})
	wcancel()
	res.CatchupSec = time.Since(t0).Seconds()
	// A session's last rounds move bytes after the records it pulled are
	// stored: wait until the node's sync byte count has not moved for
	// syncQuiet (virtual time) before reading it.
	for prev := syncBytes(); err == nil; {
		time.Sleep(syncQuiet)
		cur := syncBytes()
		if cur == prev || time.Since(t0) > c.Settle {
			break
		}
		prev = cur
	}
	res.SyncBytes = syncBytes() - b0
	res.SyncRounds = nw.Metric(r, "kpnode_sync_rounds_total") - r0
	res.RejoinCaughtUp = err == nil
	if err != nil {
		return fmt.Errorf("rejoined node %d did not catch up: %w", r, err)
	}
	return nil
}

// syncQuiet is how long (virtual time) the rejoined node's sync byte count
// must stay unchanged before the rejoin's sync cost is read.
const syncQuiet = 5 * time.Second

func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	var s float64
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

// peakRSSMiB reads the process's peak resident set (VmHWM) from /proc.
func peakRSSMiB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return math.NaN()
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			if err == nil {
				return kb / 1024
			}
		}
	}
	return math.NaN()
}
