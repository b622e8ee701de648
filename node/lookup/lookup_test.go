package lookup

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Two holders disagree: the one that answers first has an older bundle,
// the other a newer one, and the lookup (whose finder keeps its query open,
// as the DHT does) serves the newer within the grace, well before its
// timeout. Accounts alike: the greater lamport wins.
func TestLookupBetterRecordWinsWithinTheGrace(t *testing.T) {
	w := newWorld(t, nil)
	release := make(chan struct{})
	fast := w.holder("fast")
	slow := w.delayed("slow", release)
	w.find.set(true, "fast", "slow")
	dev := nodetest.SeedKey(1)
	now := time.Now()
	old, newer := bundleAt(dev, now.Add(-time.Minute), "old"), bundleAt(dev, now, "new")
	fast.putBundle(old)
	slow.putBundle(newer)
	acct := nodetest.SeedKey(2)
	a1 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil))
	a2 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil))
	fast.putAccount(a1)
	slow.putAccount(a2)

	// The lagging holder answers only once the fast one has been asked.
	go func() {
		nodetest.WaitFor(t, "the fast holder asked", 10*time.Second, func() bool { return w.pipes.Opened() >= 2 })
		close(release)
	}()
	start := time.Now()
	got, err := w.lookup.Bundle(t.Context(), old.DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if string(got.Payload) != string(newer.Payload) {
		t.Fatalf("served the bundle of %d, want the newer one", got.TimestampMS)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("lookup took %v: it should end a grace (50ms) after the first answer, not at the 5s timeout", d)
	}
	acc, err := w.lookup.Account(t.Context(), a1.AccountPub)
	if err != nil || acc.Lamport != 2 {
		t.Fatalf("account: %v lamport %d, want lamport 2", err, acc.Lamport)
	}
	// The floor is now the newer version.
	f, ok, err := w.floors.Floor(t.Context(), storage.FloorBundle, old.DeviceID, time.Now().UnixMilli())
	if err != nil || !ok || f.TimestampMS != uint64(now.UnixMilli()) {
		t.Fatalf("floor %+v %v %v, want the newer bundle's", f, ok, err)
	}
}

// One fast lying holder cannot roll a record back below its floor: after a
// node has served version 2 (and restarted: empty cache, same floors), a
// holder that alone answers version 1 is refused (an outage, not a
// rollback), and with an honest holder also present version 2 is served.
func TestLookupLyingHolderCannotRollBackTheFloor(t *testing.T) {
	w := newWorld(t, nil)
	honest := w.holder("honest")
	w.find.set(false, "honest")
	acct := nodetest.SeedKey(3)
	a1 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil))
	a2 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil))
	honest.putAccount(a2)
	if got, err := w.lookup.Account(t.Context(), a2.AccountPub); err != nil || got.Lamport != 2 {
		t.Fatalf("first lookup: %v %v", got, err)
	}

	liar := w.holder("liar")
	liar.putAccount(a1) // validly signed, older
	restarted := w.newLookup(nil)
	w.find.set(false, "liar")
	_, err := restarted.Account(t.Context(), a1.AccountPub)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("only the liar answering: %v, want ErrUnavailable (never the older version)", err)
	}
	if !strings.Contains(err.Error(), "1 below the floor") {
		t.Fatalf("error %q does not say the answer was below the floor", err)
	}
	w.find.set(false, "liar", "honest")
	if got, err := restarted.Account(t.Context(), a1.AccountPub); err != nil || got.Lamport != 2 {
		t.Fatalf("liar and honest holder: %v, %v; want lamport 2", got, err)
	}

	// Bundles alike.
	dev := nodetest.SeedKey(4)
	now := time.Now()
	b1, b2 := bundleAt(dev, now.Add(-time.Minute), "v1"), bundleAt(dev, now, "v2")
	honest.putBundle(b2)
	liar.putBundle(b1)
	w.find.set(false, "honest")
	if got, err := restarted.Bundle(t.Context(), b1.DeviceID); err != nil || string(got.Payload) != string(b2.Payload) {
		t.Fatalf("bundle from the honest holder: %v", err)
	}
	again := w.newLookup(nil)
	w.find.set(false, "liar")
	if got, err := again.Bundle(t.Context(), b1.DeviceID); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("only the liar answering a bundle: %v, %v; want ErrUnavailable", got, err)
	}
}

// With every holder down (unreachable or stalling) or none found, a lookup
// is ErrUnavailable within its timeout, and an outage is not remembered as
// a miss: the next lookup asks again. A single NOT_FOUND among holders out
// of reach is an outage too.
func TestLookupAllHoldersDownIsUnavailable(t *testing.T) {
	const timeout = 50 * time.Millisecond
	w := newWorld(t, func(c *Config) { c.Timeout, c.Grace = timeout, timeout/2 })
	var k protocol.Key
	k[0] = 9

	w.find.set(false)
	if _, err := w.lookup.Account(t.Context(), k); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("no holder found: %v, want ErrUnavailable", err)
	}
	w.stalling("stalls")
	w.find.set(false, "unreachable", "stalls")
	start := time.Now()
	if _, err := w.lookup.Account(t.Context(), k); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("holders down: %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d < timeout || d > 20*timeout {
		t.Fatalf("holders down: answered after %v, want about the %v timeout", d, timeout)
	}
	queries := w.find.queries.Load()
	if _, err := w.lookup.Account(t.Context(), k); !errors.Is(err, ErrUnavailable) || w.find.queries.Load() != queries+1 {
		t.Fatalf("second lookup: %v after %d queries; an outage must not be cached", err, w.find.queries.Load()-queries)
	}
	w.holder("empty")
	w.find.set(false, "empty", "unreachable", "stalls")
	if _, err := w.lookup.Bundle(t.Context(), k); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("one NOT_FOUND among two holders out of reach: %v, want ErrUnavailable", err)
	}
	if w.count("account", "unavailable") != 3 || w.count("bundle", "unavailable") != 1 {
		t.Fatalf("unavailable counts: account %v bundle %v", w.count("account", "unavailable"), w.count("bundle", "unavailable"))
	}
}

// The cache: a hit asks nobody; an entry older than CacheRefresh is served
// at once and refreshed in the background (a newer record then replaces
// it); past CacheTTL a lookup asks the network first. A miss is remembered
// for NegativeTTL, then asked again.
func TestLookupCacheHitRefreshAndNegativeCache(t *testing.T) {
	w := newWorld(t, nil)
	h := w.holder("h")
	w.find.set(false, "h")
	dev := nodetest.SeedKey(5)
	now := time.Now()
	b1, b2 := bundleAt(dev, now.Add(-time.Minute), "v1"), bundleAt(dev, now, "v2")
	h.putBundle(b1)
	ctx := t.Context()
	if got, err := w.lookup.Bundle(ctx, b1.DeviceID); err != nil || string(got.Payload) != string(b1.Payload) {
		t.Fatalf("first lookup: %v", err)
	}

	// Hit: no stream opened.
	opened := w.pipes.Opened()
	if got, err := w.lookup.Bundle(ctx, b1.DeviceID); err != nil || string(got.Payload) != string(b1.Payload) || w.pipes.Opened() != opened {
		t.Fatalf("hit: %v, %d streams opened", err, w.pipes.Opened()-opened)
	}
	if w.count("bundle", "cache_hit") != 1 {
		t.Fatalf("cache_hit %v", w.count("bundle", "cache_hit"))
	}

	// Old hit: served the cached v1 at once, refreshed to v2 behind.
	h.putBundle(b2)
	w.clock.Advance(2 * DefaultCacheRefresh)
	if got, err := w.lookup.Bundle(ctx, b1.DeviceID); err != nil || string(got.Payload) != string(b1.Payload) {
		t.Fatalf("old hit: %v, want the cached v1 at once", err)
	}
	nodetest.WaitFor(t, "the background refresh", 10*time.Second, func() bool { return w.count("bundle", "found") == 2 })
	if got, err := w.lookup.Bundle(ctx, b1.DeviceID); err != nil || string(got.Payload) != string(b2.Payload) {
		t.Fatalf("after the refresh: %v, want v2", err)
	}

	// Past the TTL the network is asked first.
	queries := w.find.queries.Load()
	w.clock.Advance(2 * DefaultCacheTTL)
	if _, err := w.lookup.Bundle(ctx, b1.DeviceID); err != nil || w.find.queries.Load() != queries+1 {
		t.Fatalf("expired entry: %v, %d queries", err, w.find.queries.Load()-queries)
	}

	// A miss (the holder has no record) is remembered, then forgotten.
	var unknown protocol.Key
	unknown[0] = 7
	if _, err := w.lookup.Account(ctx, unknown); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("miss: %v, want storage.ErrNotFound", err)
	}
	queries = w.find.queries.Load()
	if _, err := w.lookup.Account(ctx, unknown); !errors.Is(err, storage.ErrNotFound) || w.find.queries.Load() != queries {
		t.Fatalf("negative hit: %v, %d queries", err, w.find.queries.Load()-queries)
	}
	if w.count("account", "negative_hit") != 1 || w.count("account", "miss") != 1 {
		t.Fatalf("negative_hit %v miss %v", w.count("account", "negative_hit"), w.count("account", "miss"))
	}
	w.clock.Advance(DefaultNegativeTTL + time.Second)
	if _, err := w.lookup.Account(ctx, unknown); !errors.Is(err, storage.ErrNotFound) || w.find.queries.Load() != queries+1 {
		t.Fatalf("after the negative TTL: %v, %d queries", err, w.find.queries.Load()-queries)
	}
}

// A cache hit keeps being served while the network is out, and a holder
// serving an older record than the cached one does not replace it.
func TestLookupCacheSurvivesOutageAndLaggingHolder(t *testing.T) {
	w := newWorld(t, func(c *Config) { c.Timeout, c.Grace = 50*time.Millisecond, 10*time.Millisecond })
	h := w.holder("h")
	w.find.set(false, "h")
	acct := nodetest.SeedKey(6)
	a2 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil))
	h.putAccount(a2)
	ctx := t.Context()
	if _, err := w.lookup.Account(ctx, a2.AccountPub); err != nil {
		t.Fatal(err)
	}
	w.find.set(false, "unreachable")
	w.clock.Advance(2 * DefaultCacheRefresh)
	if got, err := w.lookup.Account(ctx, a2.AccountPub); err != nil || got.Lamport != 2 {
		t.Fatalf("hit during an outage: %v", err)
	}
	nodetest.WaitFor(t, "the failed refresh", 10*time.Second, func() bool { return w.count("account", "unavailable") == 1 })
	if got, err := w.lookup.Account(ctx, a2.AccountPub); err != nil || got.Lamport != 2 {
		t.Fatalf("hit after a failed refresh: %v", err)
	}
}

// Close waits for background refreshes and ends queries in flight; a
// lookup after Close is ErrUnavailable unless the cache answers.
func TestLookupCloseEndsQueries(t *testing.T) {
	w := newWorld(t, nil)
	w.stalling("stalls")
	w.find.set(true, "stalls")
	var k protocol.Key
	k[0] = 11
	errc := make(chan error, 1)
	go func() { _, err := w.lookup.Bundle(context.Background(), k); errc <- err }()
	nodetest.WaitFor(t, "the stalling holder asked", 10*time.Second, func() bool { return w.pipes.Opened() == 1 })
	start := time.Now()
	if err := w.lookup.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrUnavailable) {
		t.Fatalf("query in flight at Close: %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Close took %v", d)
	}
	if _, err := w.lookup.Bundle(t.Context(), k); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("after Close: %v", err)
	}
}

// A holder that reports itself (the node) is never asked, and a holder
// that does not hold the shard is no answer.
func TestLookupSkipsSelfAndNotHolders(t *testing.T) {
	w := newWorld(t, func(c *Config) { c.Timeout, c.Grace = 100*time.Millisecond, 10*time.Millisecond })
	w.pipes.Handle(self, func(s network.Stream, _ peer.ID) { t.Error("the node asked itself"); s.Close() })
	srv, err := fetch.NewServer(fetch.ServerConfig{Protocol: testProto, Store: newMemStore(), Logger: nodetest.QuietLogger()}) // holds no shard
	if err != nil {
		t.Fatal(err)
	}
	_ = srv.Start(t.Context())
	t.Cleanup(func() { srv.Close() })
	w.pipes.Handle("stale", func(s network.Stream, from peer.ID) { srv.Handle(s, from) })
	w.find.set(false, self, "stale")
	var k protocol.Key
	k[0] = 12
	_, err = w.lookup.Bundle(t.Context(), k)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "1 holders asked, 1 answered, 0 failed") {
		t.Fatalf("self and a stale provider: %v, want ErrUnavailable with one holder asked and no failure", err)
	}
}

// The floor table: raised only by a better version, extended by the same
// one, void after its time, pruned (storage's floors under CmpAccountFloor).
func TestFloorRaiseAndPrune(t *testing.T) {
	w := newWorld(t, nil)
	ctx := t.Context()
	var k protocol.Key
	k[0] = 1
	now := time.Now().UnixMilli()
	f := func(lamport uint64, until int64) storage.Floor {
		return storage.Floor{Lamport: lamport, UntilMS: until}
	}
	for _, step := range []struct {
		f     storage.Floor
		wrote bool
		want  uint64
	}{
		{f(2, now+1000), true, 2},
		{f(1, now+5000), false, 2}, // lower: refused
		{f(2, now+500), false, 2},  // same, not longer
		{f(2, now+5000), true, 2},  // same, longer
		{f(3, now+10), true, 3},    // higher
	} {
		wrote, err := w.floors.RaiseFloor(ctx, storage.FloorAccount, k, step.f, now, CmpAccountFloor)
		if err != nil || wrote != step.wrote {
			t.Fatalf("raise %+v: wrote %v err %v, want %v", step.f, wrote, err, step.wrote)
		}
		got, ok, err := w.floors.Floor(ctx, storage.FloorAccount, k, now)
		if err != nil || !ok || got.Lamport != step.want {
			t.Fatalf("floor %+v %v %v, want lamport %d", got, ok, err, step.want)
		}
	}
	// Void after UntilMS: a lower version may then be written, and pruning
	// deletes what is void.
	if _, ok, _ := w.floors.Floor(ctx, storage.FloorAccount, k, now+10); ok {
		t.Fatal("a floor applies after its UntilMS")
	}
	if k, err := w.floors.PruneFloors(ctx, now+10); err != nil || k != 1 {
		t.Fatalf("prune: %d %v", k, err)
	}
}

// kpnode_lookups_total keeps its name and labels.
func TestLookupMetricName(t *testing.T) {
	w := newWorld(t, nil)
	w.find.set(false)
	_, _ = w.lookup.Bundle(t.Context(), protocol.Key{1})
	mfs, err := w.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "kpnode_lookups_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["kind"] == "bundle" && labels["result"] == "unavailable" && len(labels) == 2 {
				return
			}
		}
	}
	t.Fatal(`kpnode_lookups_total{kind="bundle",result="unavailable"} not exported`)
}
