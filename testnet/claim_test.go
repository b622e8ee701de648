package testnet

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// Issue 9, "What it must show" (1): a device with 5 one-time bundles and one
// last-resort on a 3-node testnet; 5 claims spread over the 3 nodes return 5
// distinct one-time refs; the 6th and later return the last-resort bundle,
// flagged; count on every node agrees within 2 s, and every node lists the
// one-time bundles as claimed.
func TestClaimsAcrossNodes(t *testing.T) {
	c := startCluster(t, 3, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := newPool(t, nil, 5, true)
	// Published over HTTP, as the device does, on node 0.
	api0 := newAPI(t, c.Nodes[0])
	for _, b := range p.all() {
		if code, raw, err := api0.publish(ctx, b); err != nil || code/100 != 2 {
			t.Fatalf("publish: http %d %s, %v", code, raw, err)
		}
	}
	p.waitHeld(t, ctx, c.Nodes)
	apis := make([]*apiClient, len(c.Nodes))
	for i, n := range c.Nodes {
		apis[i] = newAPI(t, n)
		got, err := apis[i].count(ctx, p.id)
		if err != nil || got != (countBody{DeviceID: p.id.String(), OneTime: 5, LastResort: 1}) {
			t.Fatalf("node %d: count before any claim %+v (%v), want one_time 5, last_resort 1", i, got, err)
		}
	}

	// Five claims, round robin over the nodes, one after the other as
	// clients adding the device would make them.
	seen := map[protocol.Ref]int{}
	for k := 0; k < 5; k++ {
		code, cb, raw, err := apis[k%3].claim(ctx, p.id)
		if err != nil || code != http.StatusOK {
			t.Fatalf("claim %d on node %d: http %d %s (%v)", k+1, k%3, code, raw, err)
		}
		ref := p.checkClaim(t, cb)
		if cb.LastResort || ref == p.lrRef {
			t.Fatalf("claim %d on node %d: got the last-resort bundle while one-time ones were left", k+1, k%3)
		}
		if prev, dup := seen[ref]; dup {
			t.Fatalf("claim %d on node %d: ref %s was already handed out by claim %d", k+1, k%3, ref, prev)
		}
		seen[ref] = k + 1
	}
	// The pool is empty: the 6th and 7th claims, on two other nodes, get the
	// last-resort bundle, flagged.
	for k := 5; k < 7; k++ {
		code, cb, raw, err := apis[k%3].claim(ctx, p.id)
		if err != nil || code != http.StatusOK {
			t.Fatalf("claim %d on node %d: http %d %s (%v)", k+1, k%3, code, raw, err)
		}
		if ref := p.checkClaim(t, cb); ref != p.lrRef || !cb.LastResort {
			t.Fatalf("claim %d on node %d: ref %s last_resort %v, want the last-resort bundle %s, flagged", k+1, k%3, ref, cb.LastResort, p.lrRef)
		}
	}

	// Every node agrees within 2 s, and lists the one-time bundles claimed.
	want := countBody{DeviceID: p.id.String(), OneTime: 0, LastResort: 1, LastResortHandedOut: 2}
	start := time.Now()
	for i, api := range apis {
		var got countBody
		var err error
		nodetest.WaitFor(t, fmt.Sprintf("node %d to count %+v (has %+v, %v)", i, want, &got, &err), 2*time.Second-time.Since(start), func() bool {
			got, err = api.count(ctx, p.id)
			return err == nil && got == want
		})
		items, err := api.list(ctx, p.id)
		if err != nil || len(items) != 6 {
			t.Fatalf("node %d lists %d bundles (%v), want 6", i, len(items), err)
		}
		for _, it := range items {
			if !it.LastResort && !it.Claimed {
				t.Fatalf("node %d lists one-time ref %s with claimed=%v", i, it.Ref, it.Claimed)
			}
		}
	}
	t.Logf("count agreed on all 3 nodes %v after the last claim", time.Since(start).Round(time.Millisecond))

	// A device with nothing: 404 with the text.
	unknown := newPool(t, nil, 0, false)
	code, _, raw, err := apis[1].claim(ctx, unknown.id)
	if err != nil || code != http.StatusNotFound || errorText(raw) != "no keypackage for device" {
		t.Fatalf("claim of an unknown device: http %d %s (%v), want 404 no keypackage for device", code, raw, err)
	}
}

// claimRecord is one claim of a load run.
type claimRecord struct {
	dev        int
	node       int
	code       int
	ref        protocol.Ref
	lastResort bool
	latency    time.Duration
	err        error
}

// doubleHandOuts counts, over the one-time claims of records, the refs
// handed out more than once and the hand-outs beyond the first of each.
func doubleHandOuts(records []claimRecord) (oneTime, refsTwice, extra int) {
	type key struct {
		dev int
		ref protocol.Ref
	}
	times := map[key]int{}
	for _, r := range records {
		if r.code == http.StatusOK && !r.lastResort {
			oneTime++
			times[key{r.dev, r.ref}]++
		}
	}
	for _, n := range times {
		if n > 1 {
			refsTwice++
			extra += n - 1
		}
	}
	return oneTime, refsTwice, extra
}

// Issue 9, "What it must show" (2), in short: several requesters on the 3
// nodes claim concurrently at 10 claims/s per device from pools of 100, to
// the pools' last bundles (where nodes own few of the candidates left and
// ask the owners); the rate of double hand-outs (one-time hand-outs beyond
// the first of a ref, over one-time claims) stays under 1 %, and no claim
// falls back to the last-resort bundle while a one-time one is left. The 60 s run on real hosts is
// `kpbench claim -only double`.
//
// The network is simulated, in virtual time (links of 10 ms): what is
// measured is the protocol's, not how loaded the machine running the test
// is (on a loaded machine under -race, claims over loopback queue for
// seconds behind each other).
func TestConcurrentClaimsRarelyDoubleHandOut(t *testing.T) {
	synctest.Test(t, concurrentClaimsRarelyDoubleHandOut)
}

func concurrentClaimsRarelyDoubleHandOut(t *testing.T) {
	const (
		devices    = 4
		poolSize   = 100
		perSecond  = 10
		duration   = 10 * time.Second // 100 claims of each pool of 100: to its last bundle
		requesters = 6                // two per node, each its own client address
	)
	nw := startSim(t, simnet.Options{Full: 3, ShardCount: protocol.DefaultShardCount, NodeConfig: func(_ int, cfg *node.Config) {
		cfg.Shards = protocol.AllShards(protocol.DefaultShardCount)
		cfg.MaxPerDevice = 2 * poolSize
	}})
	nodes := []*node.Node{nw.Nodes[0].Node, nw.Nodes[1].Node, nw.Nodes[2].Node}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	pools := make([]*pool, devices)
	for d := range pools {
		pools[d] = newPool(t, nil, poolSize, true)
		pools[d].submit(t, ctx, nodes[d%3])
	}
	for _, p := range pools {
		p.waitHeld(t, ctx, nodes)
	}
	clients := make([]*apiClient, requesters)
	for r := range clients {
		clients[r] = handlerAPI(nodes[r%3], fmt.Sprintf("192.0.2.%d:4000", 20+r))
	}

	var mu sync.Mutex
	var records []claimRecord
	var wg sync.WaitGroup
	start := time.Now()
	tick := time.NewTicker(time.Second / perSecond)
	for k := 0; k < int(duration/time.Second)*perSecond; k++ {
		<-tick.C
		for d, p := range pools {
			r := (k*devices + d) % requesters
			wg.Add(1)
			go func() {
				defer wg.Done()
				t0 := time.Now()
				code, cb, raw, err := clients[r].claim(ctx, p.id)
				rec := claimRecord{dev: d, node: r % 3, code: code, lastResort: cb.LastResort, latency: time.Since(t0), err: err}
				if err == nil && code == http.StatusOK {
					rec.ref, rec.err = protocol.ParseRef(cb.Ref)
				} else if err == nil {
					rec.err = fmt.Errorf("http %d: %s", code, raw)
				}
				mu.Lock()
				records = append(records, rec)
				mu.Unlock()
			}()
		}
	}
	tick.Stop()
	wg.Wait()
	elapsed := time.Since(start)

	var failed []string
	lastResort := 0
	lat := make([]time.Duration, 0, len(records))
	for _, r := range records {
		if r.err != nil {
			failed = append(failed, fmt.Sprintf("device %d on node %d: %v", r.dev, r.node, r.err))
			continue
		}
		if r.lastResort {
			lastResort++
		}
		lat = append(lat, r.latency)
	}
	oneTime, twice, extra := doubleHandOuts(records)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	fallbacks := 0.0
	for _, n := range nodes {
		fallbacks += nodetest.Scrape(t, n.Handler(), "kpnode_claim_owner_fallbacks_total")
	}
	rate := 0.0
	if oneTime > 0 {
		rate = float64(extra) / float64(oneTime)
	}
	t.Logf("%d claims in %v (%d devices × %d/s, %d requesters on 3 nodes): %d one-time, %d last-resort, %d failed; "+
		"%d refs handed out twice or more, %d extra hand-outs: double hand-out rate %.2f%%; owner fallbacks %.0f; latency p50 %v p99 %v",
		len(records), elapsed.Round(time.Millisecond), devices, perSecond, requesters, oneTime, lastResort, len(failed),
		twice, extra, 100*rate, fallbacks, pct(lat, 50), pct(lat, 99))
	if len(failed) > 0 {
		t.Fatalf("%d claims failed under the limits, first: %s", len(failed), failed[0])
	}
	if lastResort > 0 {
		t.Fatalf("%d claims got the last-resort bundle, but each pool had a one-time bundle for every claim", lastResort)
	}
	if rate >= 0.01 {
		t.Fatalf("double hand-out rate %.2f%% (%d extra of %d one-time claims), want under 1%%", 100*rate, extra, oneTime)
	}
}

// pct is the p-th percentile of sorted durations (0 if none).
func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)].Round(10 * time.Microsecond)
}

// Issue 9, "What it must show" (3): a consume notice posted on one node
// removes the bundles on every node within 2 s; re-posting a consumed
// bundle is then 409 on every node, including a node that was offline
// meanwhile, once it has rejoined and synced (and it no longer holds the
// bundle); a forged consume notice is 400 and changes nothing.
func TestConsumeRemovesEverywhere(t *testing.T) {
	c := startCluster(t, 3, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := newPool(t, nil, 4, true)
	p.submit(t, ctx, c.Nodes[0])
	p.waitHeld(t, ctx, c.Nodes)
	consumed, kept := p.refs[:2], p.refs[2:]

	// A forged notice (bad signature) and one of another device naming
	// these refs: 400 with the rule, nothing deleted.
	forged := protocol.SignConsume(p.dev, uint64(time.Now().UnixMilli()), consumed)
	forged.Signature[3] ^= 0x10
	if code, raw, err := newAPI(t, c.Nodes[1]).consume(ctx, &forged); err != nil || code != http.StatusBadRequest {
		t.Fatalf("forged consume notice: http %d %s (%v), want 400", code, raw, err)
	}
	other := newPool(t, nil, 0, false)
	foreign := protocol.SignConsume(other.dev, uint64(time.Now().UnixMilli()), consumed)
	if code, raw, err := newAPI(t, c.Nodes[1]).consume(ctx, &foreign); err != nil || code != http.StatusBadRequest {
		t.Fatalf("consume notice of another device naming these refs: http %d %s (%v), want 400", code, raw, err)
	}
	for i, n := range c.Nodes {
		if got, _ := n.Bundles(ctx, p.id); len(got) != len(p.all()) {
			t.Fatalf("node %d holds %d bundles after refused notices, want all %d", i, len(got), len(p.all()))
		}
	}

	// Node 2 goes offline, still holding every bundle on disk.
	if err := c.Stop(2); err != nil {
		t.Fatal(err)
	}
	live := c.Nodes[:2]
	notice := protocol.SignConsume(p.dev, uint64(time.Now().UnixMilli()), consumed)
	if code, raw, err := newAPI(t, c.Nodes[1]).consume(ctx, &notice); err != nil || code != http.StatusNoContent {
		t.Fatalf("consume notice: http %d %s (%v), want 204", code, raw, err)
	}
	posted := time.Now()
	for i, n := range live {
		nodetest.WaitFor(t, fmt.Sprintf("node %d to delete the consumed bundles", i), 2*time.Second-time.Since(posted), func() bool {
			return holdsNone(ctx, n, p.id, consumed)
		})
	}
	t.Logf("consumed bundles gone from both live nodes %v after the POST", time.Since(posted).Round(time.Millisecond))
	checkConsumed := func(i int, n *node.Node) {
		t.Helper()
		api := newAPI(t, n)
		for _, ref := range consumed {
			code, raw, err := api.publish(ctx, p.byRef[ref])
			if err != nil || code != http.StatusConflict || errorText(raw) != "keypackage consumed" {
				t.Fatalf("node %d: re-post of consumed ref %s: http %d %s (%v), want 409 keypackage consumed", i, ref, code, raw, err)
			}
		}
		if !holdsAll(ctx, n, p.id, kept) {
			t.Fatalf("node %d lost bundles the notice did not name", i)
		}
		got, err := api.count(ctx, p.id)
		if err != nil || got.OneTime != len(kept) || got.LastResort != 1 {
			t.Fatalf("node %d: count %+v (%v), want one_time %d, last_resort 1", i, got, err, len(kept))
		}
	}
	for i, n := range live {
		checkConsumed(i, n)
	}

	// Node 2 comes back with the consumed bundles in its store. Nodes sync
	// with a peer when they connect: it learns the notice and deletes them,
	// and the live nodes, which may pull from it before it did, do not
	// take them back. A sync of each live node with it afterwards changes
	// nothing either.
	n2, err := c.Restart(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	stale := !holdsNone(ctx, n2, p.id, consumed)
	nodetest.WaitFor(t, "the restarted node to drop the consumed bundles by sync", 20*time.Second, func() bool {
		return holdsNone(ctx, n2, p.id, consumed)
	})
	t.Logf("restarted node (holding the consumed bundles at start: %v) dropped them %v after its restart", stale, time.Since(restarted).Round(time.Millisecond))
	nodetest.WaitFor(t, "the restarted node to rejoin", 20*time.Second, func() bool {
		return Ready(n2, c.heldElsewhere(2)) && len(n2.ConnectedPeers()) >= 2
	})
	shard := protocol.Shard(p.id, protocol.DefaultShardCount)
	for i, n := range live {
		if _, err := n.SyncNow(ctx, n2.PeerID(), shard); err != nil {
			t.Fatalf("node %d: sync with the restarted node: %v", i, err)
		}
	}
	for i, n := range c.Nodes {
		if !holdsNone(ctx, n, p.id, consumed) {
			t.Fatalf("node %d holds a consumed bundle again", i)
		}
		checkConsumed(i, n)
	}
}

// holdsNone reports whether n holds none of dev's refs.
func holdsNone(ctx context.Context, n *node.Node, dev protocol.Key, refs []protocol.Ref) bool {
	got, err := n.Bundles(ctx, dev)
	if err != nil {
		return false
	}
	for _, b := range got {
		for _, r := range refs {
			if b.Ref == r {
				return false
			}
		}
	}
	return true
}

// holdsAll reports whether n holds every one of dev's refs.
func holdsAll(ctx context.Context, n *node.Node, dev protocol.Key, refs []protocol.Ref) bool {
	got, err := n.Bundles(ctx, dev)
	if err != nil {
		return false
	}
	held := map[protocol.Ref]bool{}
	for _, b := range got {
		held[b.Ref] = true
	}
	for _, r := range refs {
		if !held[r] {
			return false
		}
	}
	return true
}
