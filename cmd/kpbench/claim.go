package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/testnet"
)

// claim: the single-use KeyPackages of issue 9, three figures.
//
//   - throughput: claims/s one node serves over HTTP (fsync on) from
//     -devices devices of -pool one-time bundles each, -clients concurrent
//     clients spread over -requesters client IPs (127.0.x.y, so that the
//     per-requester limit of 20/s does not cap the figure; the limits stay
//     on), against GET /v0/keypackage of the same devices with the same
//     clients: the node's cheapest read of the same bundles.
//   - light: p50/p99 of a claim through a light node (HTTP on the light
//     node, which sends fetch KIND_CLAIM to the holder) against a fetch
//     round trip (KIND_LATEST) from the same light node to the same holder.
//     Both are paced under the holder's per-peer claim limit.
//   - double: -duration of -double-devices devices claimed at 10 claims/s
//     each by 6 requesters on 3 full nodes, pools of 100 that each device
//     keeps topped up (it consumes what was handed out and publishes new
//     ones when its count drops under 70): the double hand-out rate.
func claimBench(args []string) error {
	fs := flag.NewFlagSet("claim", flag.ExitOnError)
	only := fs.String("only", "", "run one part: throughput, light or double (default: all)")
	devices := fs.Int("devices", 200, "throughput: devices (1..2000)")
	poolSize := fs.Int("pool", 20, "throughput: one-time bundles per device (1..100)")
	clients := fs.Int("clients", 32, "throughput: concurrent HTTP clients (1..256)")
	requesters := fs.Int("requesters", 250, "throughput: distinct client IPs (1..4000)")
	runs := fs.Int("runs", 200, "light: timed claims and fetches (1..2000)")
	duration := fs.Duration("duration", 60*time.Second, "double: how long to claim (1s..10m)")
	doubleDevices := fs.Int("double-devices", 4, "double: devices claimed at 10/s each (1..50)")
	fs.Parse(args)
	switch {
	case *devices < 1 || *devices > 2000 || *poolSize < 1 || *poolSize > 100:
		return errors.New("devices must be 1..2000 and pool 1..100")
	case *clients < 1 || *clients > 256 || *requesters < 1 || *requesters > 4000:
		return errors.New("clients must be 1..256 and requesters 1..4000")
	case *runs < 1 || *runs > 2000:
		return errors.New("runs must be 1..2000")
	case *duration < time.Second || *duration > 10*time.Minute || *doubleDevices < 1 || *doubleDevices > 50:
		return errors.New("duration must be 1s..10m and double-devices 1..50")
	case *only != "" && *only != "throughput" && *only != "light" && *only != "double":
		return fmt.Errorf("unknown part %q", *only)
	}
	if *only == "" || *only == "throughput" {
		if err := claimThroughput(*devices, *poolSize, *clients, *requesters); err != nil {
			return fmt.Errorf("throughput: %w", err)
		}
	}
	if *only == "" || *only == "light" {
		if err := claimLight(*runs); err != nil {
			return fmt.Errorf("light: %w", err)
		}
	}
	if *only == "" || *only == "double" {
		if err := claimDouble(*duration, *doubleDevices); err != nil {
			return fmt.Errorf("double: %w", err)
		}
	}
	return nil
}

// devicePool is a device key and its one-time bundles, by ref.
type devicePool struct {
	dev     ed25519.PrivateKey
	id      protocol.Key
	bundles []protocol.Bundle
	refs    []protocol.Ref
}

// newDevicePool signs n one-time KeyPackages (X-Wing, the chat client's
// suite) for dev, and a last-resort one if lastResort.
func newDevicePool(dev ed25519.PrivateKey, n int, lastResort bool) (*devicePool, error) {
	p := &devicePool{dev: dev}
	copy(p.id[:], dev.Public().(ed25519.PublicKey))
	if err := p.add(n, lastResort); err != nil {
		return nil, err
	}
	return p, nil
}

// add signs n more one-time bundles (and a last-resort one), newest last.
func (p *devicePool) add(n int, lastResort bool) error {
	now := uint64(time.Now().UnixMilli())
	for i := 0; i <= n; i++ {
		lr := i == n
		if lr && !lastResort {
			break
		}
		kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: p.dev, LastResort: lr})
		if err != nil {
			return err
		}
		b := protocol.SignBundle(p.dev, now-uint64(n-i), kp)
		info, err := protocol.DefaultPolicy().ValidateBundle(&b, time.Now())
		if err != nil {
			return err
		}
		p.bundles = append(p.bundles, b)
		p.refs = append(p.refs, info.Ref)
	}
	return nil
}

// submit stores the pool's bundles from index from on n.
func (p *devicePool) submit(ctx context.Context, n *node.Node, from int) error {
	for i := from; i < len(p.bundles); i++ {
		if err := n.SubmitBundle(ctx, &p.bundles[i]); err != nil {
			return err
		}
	}
	return nil
}

// waitHeld waits until every node holds at least want bundles of the device.
func waitHeld(ctx context.Context, nodes []*node.Node, id protocol.Key, want int) error {
	for i, n := range nodes {
		for {
			got, _ := n.Bundles(ctx, id)
			if len(got) >= want {
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("node %d holds %d of %d bundles of %s", i, len(got), want, id)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

// requesterClient is an HTTP client whose connections come from the
// loopback address ip (a distinct requester for the claim limits).
func requesterClient(ip net.IP) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 5 * time.Second}
	return &http.Client{Transport: &http.Transport{DialContext: d.DialContext, MaxIdleConnsPerHost: 4}, Timeout: 10 * time.Second}
}

// loopbackIP is the i-th address of 127.0.1.0/16 onwards (127.0.1.1, …).
func loopbackIP(i int) net.IP { return net.IPv4(127, 0, byte(1+i/250), byte(1+i%250)) }

// claimAnswer is what a claim returned.
type claimAnswer struct {
	code       int
	ref        string
	lastResort bool
	body       string
}

// postClaim sends POST /v1/keypackages/{device_id}/claim to the API at base.
func postClaim(ctx context.Context, hc *http.Client, base string, dev protocol.Key) (claimAnswer, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/keypackages/"+dev.String()+"/claim", nil)
	if err != nil {
		return claimAnswer{}, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return claimAnswer{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return claimAnswer{}, err
	}
	a := claimAnswer{code: resp.StatusCode, body: string(raw)}
	if resp.StatusCode == http.StatusOK {
		var cb struct {
			DeviceID   string `json:"device_id"`
			Ref        string `json:"ref"`
			LastResort bool   `json:"last_resort"`
		}
		if err := json.Unmarshal(raw, &cb); err != nil {
			return a, fmt.Errorf("claim answer: %w", err)
		}
		if cb.DeviceID != dev.String() {
			return a, fmt.Errorf("claim answer names device %s, asked %s", cb.DeviceID, dev)
		}
		a.ref, a.lastResort = cb.Ref, cb.LastResort
	}
	return a, nil
}

// claimThroughput: claims/s of one node against GET /v0/keypackage.
func claimThroughput(devices, poolSize, clients, requesters int) error {
	e, err := newEnv(15 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx := e.ctx
	n, err := startLocalNode(ctx, e.dir, protocol.MLSStrict)
	if err != nil {
		return err
	}
	defer n.Close()
	fmt.Printf("generating %d KeyPackages (0x004D; %d devices × %d one-time)...\n", devices*poolSize, devices, poolSize)
	pools := make([]*devicePool, devices)
	for d := range pools {
		if pools[d], err = newDevicePool(ed25519Key(), poolSize, false); err != nil {
			return err
		}
		if err := pools[d].submit(ctx, n, 0); err != nil {
			return err
		}
	}
	base := "http://" + n.APIAddr().String()
	hcs := make([]*http.Client, requesters)
	for r := range hcs {
		hcs[r] = requesterClient(loopbackIP(r))
	}
	// Claim i is device i%devices from requester i%requesters: every
	// requester and every device stays within its burst of 40.
	total := devices * poolSize
	var mu sync.Mutex
	seen := make(map[string]int, total)
	var limited, lastResort atomic.Int64
	lat := make([]time.Duration, total)
	start := time.Now()
	err = parallel(ctx, clients, total, func(i int) error {
		t0 := time.Now()
		a, err := postClaim(ctx, hcs[i%requesters], base, pools[i%devices].id)
		if err != nil {
			return err
		}
		lat[i] = time.Since(t0)
		switch {
		case a.code == http.StatusTooManyRequests:
			limited.Add(1)
		case a.code != http.StatusOK:
			return fmt.Errorf("claim %d: http %d %s", i, a.code, a.body)
		case a.lastResort:
			lastResort.Add(1)
		default:
			mu.Lock()
			seen[a.ref]++
			mu.Unlock()
		}
		return nil
	})
	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	twice := 0
	for _, k := range seen {
		if k > 1 {
			twice++
		}
	}
	// Ceiling: the same requests' read, GET /v0/keypackage of the devices.
	ceil := make([]time.Duration, total)
	cstart := time.Now()
	err = parallel(ctx, clients, total, func(i int) error {
		t0 := time.Now()
		resp, err := hcs[i%requesters].Get(base + "/v0/keypackage/" + pools[i%devices].id.String())
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET: status %d", resp.StatusCode)
		}
		ceil[i] = time.Since(t0)
		return nil
	})
	if err != nil {
		return err
	}
	ceilTime := time.Since(cstart)
	rate, ceilRate := float64(total)/elapsed.Seconds(), float64(total)/ceilTime.Seconds()
	fmt.Printf("claim throughput, one node (fsync on; %d devices × %d one-time, %d clients from %d client IPs): %.0f claims/s, p50 %v p99 %v; %d one-time handed out, %d twice, %d last-resort, %d rate limited | ceiling GET /v0/keypackage %.0f req/s, p50 %v p99 %v | throughput ratio %.2f×\n",
		devices, poolSize, clients, requesters, rate, quantile(lat, 0.5).Round(time.Microsecond), quantile(lat, 0.99).Round(time.Microsecond),
		len(seen), twice, lastResort.Load(), limited.Load(),
		ceilRate, quantile(ceil, 0.5).Round(time.Microsecond), quantile(ceil, 0.99).Round(time.Microsecond), rate/ceilRate)
	return nil
}

// claimLight: a claim through a light node against a fetch round trip from
// the light node to the holder.
func claimLight(runs int) error {
	e, err := newEnv(15 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx := e.ctx
	// Node 0 holds every shard, node 1 only shard 1: the devices are all of
	// shard 0, so node 0 is their one holder and the light node's claims
	// and fetches go to the same peer.
	const S = protocol.DefaultShardCount
	c, err := e.cluster(testnet.Options{Nodes: 2, Configure: func(i int, cfg *node.Config) {
		if i == 1 {
			cfg.Shards, _ = protocol.ParseShardSet("1", S)
		}
	}})
	if err != nil {
		return err
	}
	defer c.Close()
	holder := c.Nodes[0]
	light, err := c.Add(ctx, func(cfg *node.Config) {
		cfg.Light = true
		cfg.Shards = protocol.NoShards(protocol.DefaultShardCount)
	})
	if err != nil {
		return err
	}
	for light.DHTPeers() == 0 {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Devices of 25 one-time bundles: a warm-up claim each, then runs.
	const perDevice = 25
	devs := (runs + perDevice - 2) / (perDevice - 1)
	pools := make([]*devicePool, devs)
	for d := range pools {
		if pools[d], err = newDevicePool(keyInShard(0, S), perDevice, true); err != nil {
			return err
		}
		if err := pools[d].submit(ctx, holder, 0); err != nil {
			return err
		}
	}
	hc := &http.Client{Timeout: 10 * time.Second}
	base := "http://" + light.APIAddr().String()
	// Paced at one request per 60 ms: under the holder's claim limit for
	// the light node's peer ID (20/s) and the light node's for its client.
	pace := time.NewTicker(60 * time.Millisecond)
	defer pace.Stop()
	// Warm-up, not timed: one claim per device, retried while the light
	// node cannot reach a holder yet (503) as the DHT forms.
	for _, p := range pools {
		for {
			<-pace.C
			a, err := postClaim(ctx, hc, base, p.id)
			if err == nil && a.code == http.StatusOK {
				break
			}
			if err == nil && a.code != http.StatusServiceUnavailable || ctx.Err() != nil {
				return fmt.Errorf("warm-up claim through the light node: %+v %v", a, err)
			}
		}
	}
	got := make([]time.Duration, 0, runs)
	lastResort := 0
	for i := 0; i < runs; i++ {
		<-pace.C
		t0 := time.Now()
		a, err := postClaim(ctx, hc, base, pools[i%devs].id)
		if err != nil {
			return err
		}
		if a.code != http.StatusOK {
			return fmt.Errorf("claim %d through the light node: http %d %s", i, a.code, a.body)
		}
		got = append(got, time.Since(t0))
		if a.lastResort {
			lastResort++
		}
	}
	ceiling := make([]time.Duration, 0, runs)
	for i := 0; i < runs; i++ {
		<-pace.C
		t0 := time.Now()
		if _, err := light.FetchLatest(ctx, holder.PeerID(), pools[i%devs].id); err != nil {
			return err
		}
		ceiling = append(ceiling, time.Since(t0))
	}
	report(fmt.Sprintf("claim through a light node (HTTP POST on the light node → fetch KIND_CLAIM to the holder; %d last-resort) vs fetch KIND_LATEST round trip light → holder", lastResort), got, ceiling)
	return nil
}

// keyInShard returns a device key whose shard is s of count.
func keyInShard(s, count int) ed25519.PrivateKey {
	for {
		k := ed25519Key()
		var id protocol.Key
		copy(id[:], k.Public().(ed25519.PublicKey))
		if protocol.Shard(id, count) == s {
			return k
		}
	}
}

// doubleDevice is one device of the double hand-out run: its pool and the
// refs handed out since its last consume notice.
type doubleDevice struct {
	mu      sync.Mutex
	pool    *devicePool
	pending []protocol.Ref
	home    int // the node it publishes to
}

// claimDouble: the 60 s double hand-out measurement.
func claimDouble(duration time.Duration, devices int) error {
	const (
		poolSize   = 100
		perSecond  = 10
		requesters = 6
		refillAt   = 70 // 7 s of claims left: room for a slow refill on a loaded machine
	)
	e, err := newEnv(duration + 10*time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx := e.ctx
	c, err := e.cluster(testnet.Options{Nodes: 3, Configure: func(_ int, cfg *node.Config) { cfg.MaxPerDevice = 3 * poolSize }})
	if err != nil {
		return err
	}
	defer c.Close()
	devs := make([]*doubleDevice, devices)
	for d := range devs {
		p, err := newDevicePool(ed25519Key(), poolSize, true)
		if err != nil {
			return err
		}
		devs[d] = &doubleDevice{pool: p, home: d % 3}
		if err := p.submit(ctx, c.Nodes[d%3], 0); err != nil {
			return err
		}
	}
	for _, d := range devs {
		if err := waitHeld(ctx, c.Nodes, d.pool.id, poolSize+1); err != nil {
			return err
		}
	}
	bases := make([]string, 3)
	for i, n := range c.Nodes {
		bases[i] = "http://" + n.APIAddr().String()
	}
	hcs := make([]*http.Client, requesters)
	for r := range hcs {
		hcs[r] = requesterClient(loopbackIP(r))
	}

	// Each device checks its count every second and, under refillAt,
	// consumes what was handed out and publishes new bundles up to the pool.
	stop := make(chan struct{})
	var refills, consumed atomic.Int64
	var bg sync.WaitGroup
	var bgErr error
	var bgOnce sync.Once
	for _, d := range devs {
		bg.Add(1)
		go func() {
			defer bg.Done()
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				if err := d.refill(ctx, c.Nodes[d.home], bases[d.home], poolSize, refillAt, &refills, &consumed); err != nil {
					bgOnce.Do(func() { bgErr = err })
					return
				}
			}
		}()
	}

	type rec struct {
		dev        int
		node       int
		code       int
		ref        string
		lastResort bool
		lat        time.Duration
	}
	var mu sync.Mutex
	var recs []rec
	var failures []string
	var wg sync.WaitGroup
	fmt.Printf("claiming %d devices at %d/s each for %v from %d requesters on 3 nodes...\n", devices, perSecond, duration, requesters)
	start := time.Now()
	tick := time.NewTicker(time.Second / perSecond)
	for k := 0; k < int(duration.Seconds()*perSecond); k++ {
		<-tick.C
		for di, d := range devs {
			r := (k*devices + di) % requesters
			wg.Add(1)
			go func() {
				defer wg.Done()
				t0 := time.Now()
				a, err := postClaim(ctx, hcs[r], bases[r%3], d.pool.id)
				mu.Lock()
				defer mu.Unlock()
				if err != nil || a.code != http.StatusOK {
					failures = append(failures, fmt.Sprintf("http %d %s %v", a.code, a.body, err))
					return
				}
				recs = append(recs, rec{dev: di, node: r % 3, code: a.code, ref: a.ref, lastResort: a.lastResort, lat: time.Since(t0)})
				if !a.lastResort {
					if ref, err := protocol.ParseRef(a.ref); err == nil {
						d.mu.Lock()
						d.pending = append(d.pending, ref)
						d.mu.Unlock()
					}
				}
			}()
		}
	}
	tick.Stop()
	wg.Wait()
	elapsed := time.Since(start)
	close(stop)
	bg.Wait()
	if bgErr != nil {
		return bgErr
	}

	type key struct {
		dev int
		ref string
	}
	times := map[key]int{}
	by := map[key][]int{} // the nodes that handed each ref out
	oneTime, lastResort := 0, 0
	lat := make([]time.Duration, 0, len(recs))
	for _, r := range recs {
		lat = append(lat, r.lat)
		if r.lastResort {
			lastResort++
			continue
		}
		oneTime++
		times[key{r.dev, r.ref}]++
		by[key{r.dev, r.ref}] = append(by[key{r.dev, r.ref}], r.node)
	}
	twice, extra := 0, 0
	for _, k := range times {
		if k > 1 {
			twice++
			extra += k - 1
		}
	}
	fallbacks := 0.0
	for _, n := range c.Nodes {
		fallbacks += metricSum(n, "kpnode_claim_owner_fallbacks_total")
	}
	rate := 0.0
	if oneTime > 0 {
		rate = float64(extra) / float64(oneTime)
	}
	fmt.Printf("double hand-out, 3 nodes, %d devices × %d claims/s for %v, pools of %d (topped up: %d refills, %d consumed), %d requesters: %d claims (%d one-time, %d last-resort, %d failed), p50 %v p99 %v; %d refs handed out twice or more, %d extra hand-outs, %.0f owner fallbacks: double hand-out rate %.3f%% | target < 1%%\n",
		devices, perSecond, elapsed.Round(time.Millisecond), poolSize, refills.Load(), consumed.Load(), requesters,
		len(recs)+len(failures), oneTime, lastResort, len(failures), quantile(lat, 0.5).Round(time.Microsecond), quantile(lat, 0.99).Round(time.Microsecond),
		twice, extra, fallbacks, 100*rate)
	if len(failures) > 0 {
		fmt.Printf("first failure: %s\n", failures[0])
	}
	shown := 0
	for k, nodes := range by {
		if len(nodes) > 1 && shown < 5 {
			fmt.Printf("  ref %.16s… of device %d handed out by nodes %v\n", k.ref, k.dev, nodes)
			shown++
		}
	}
	return nil
}

// refill tops the device's pool up when its count on its home node is
// under refillAt: a consume notice for the refs handed out since the last
// one (the device saw them used), then new bundles up to poolSize.
func (d *doubleDevice) refill(ctx context.Context, n *node.Node, base string, poolSize, refillAt int, refills, consumed *atomic.Int64) error {
	oneTime, err := getCount(ctx, base, d.pool.id)
	if err != nil || oneTime >= refillAt {
		return err
	}
	d.mu.Lock()
	pending := d.pending
	if len(pending) > protocol.MaxConsumeRefs {
		pending = pending[:protocol.MaxConsumeRefs]
	}
	d.pending = d.pending[len(pending):]
	d.mu.Unlock()
	if len(pending) > 0 {
		refs := dedupRefs(pending)
		notice := protocol.SignConsume(d.pool.dev, uint64(time.Now().UnixMilli()), refs)
		if err := postConsume(ctx, base, &notice); err != nil {
			return err
		}
		consumed.Add(int64(len(refs)))
	}
	from := len(d.pool.bundles)
	if err := d.pool.add(poolSize-oneTime, false); err != nil {
		return err
	}
	refills.Add(1)
	return d.pool.submit(ctx, n, from)
}

// dedupRefs drops repeated refs (a ref handed out twice is consumed once).
func dedupRefs(refs []protocol.Ref) []protocol.Ref {
	seen := make(map[protocol.Ref]bool, len(refs))
	out := refs[:0:0]
	for _, r := range refs {
		if !seen[r] {
			seen[r] = true
			out = append(out, r)
		}
	}
	return out
}

// getCount reads one_time from GET /v1/keypackages/{device_id}/count.
func getCount(ctx context.Context, base string, dev protocol.Key) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/keypackages/"+dev.String()+"/count", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var cb struct {
		OneTime int `json:"one_time"`
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("count: http %d", resp.StatusCode)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&cb); err != nil {
		return 0, err
	}
	return cb.OneTime, nil
}

// postConsume posts a consume notice to POST /v1/consume.
func postConsume(ctx context.Context, base string, n *protocol.ConsumeNotice) error {
	b64 := base64.StdEncoding
	body, _ := json.Marshal(map[string]string{"device_id": n.DeviceID.String(),
		"payload": b64.EncodeToString(n.Payload), "signature": b64.EncodeToString(n.Signature[:])})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/consume", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<12))
		return fmt.Errorf("consume: http %d %s", resp.StatusCode, raw)
	}
	return nil
}
