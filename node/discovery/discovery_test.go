package discovery

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/lookup"
	"github.com/kpnode/kpnode/protocol"
)

// The service is the lookup's holder finder.
var _ lookup.HolderFinder = (*Service)(nil)

const (
	testNetwork = "test/discovery"
	testShards  = 4
)

func shards(t *testing.T, spec string) protocol.ShardSet {
	t.Helper()
	if spec == "" {
		return protocol.NoShards(testShards)
	}
	s, err := protocol.ParseShardSet(spec, testShards)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

type testService struct {
	*Service
	reg *prometheus.Registry
}

// newTestService starts a discovery service on h; the test's cleanup
// closes it.
func newTestService(t *testing.T, h host.Host, held string, light bool) *testService {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := New(Config{NetworkID: testNetwork, Shards: shards(t, held), Light: light, Registerer: reg}, h)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &testService{Service: s, reg: reg}
}

// holders drains a Holders query of shard.
func holders(t *testing.T, s *testService, shard int) map[peer.ID]bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	found := map[peer.ID]bool{}
	for ai := range s.Holders(ctx, shard) {
		found[ai.ID] = true
	}
	if ctx.Err() != nil {
		t.Fatalf("holders query of shard %d did not end by itself", shard)
	}
	return found
}

// Three full nodes and a light node on go-libp2p's in-memory network: each
// full node provides exactly the shards it holds, and a query from the
// light node or a full node names exactly their holders for every shard
// (none for a shard nobody holds). The light node runs the DHT in client
// mode: it is never a holder and never enters a full node's routing table.
func TestHoldersAreTheFullNodesOfTheShard(t *testing.T) {
	mn, hs := nodetest.Mocknet(t, 4)
	ha, hb, hc, hl := hs[0], hs[1], hs[2], hs[3]
	a := newTestService(t, ha, "0,1", false)
	b := newTestService(t, hb, "2", false)
	c := newTestService(t, hc, "1", false)
	l := newTestService(t, hl, "", true)
	full := []*testService{a, b, c}
	if err := mn.ConnectAllButSelf(); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "every full node to provide its shards", 20*time.Second, func() bool {
		return a.Provided() && b.Provided() && c.Provided()
	})
	if !l.Provided() {
		t.Error("a light node has nothing to provide but is not Provided")
	}
	for _, s := range full {
		if got, want := nodetest.Counter(t, s.reg, "kpnode_dht_provides_total"), float64(len(s.cfg.Shards.List())); got < want {
			t.Errorf("kpnode_dht_provides_total = %v, want at least %v", got, want)
		}
	}

	want := map[int][]peer.ID{
		0: {ha.ID()},
		1: {ha.ID(), hc.ID()},
		2: {hb.ID()},
		3: nil,
	}
	for _, asker := range []*testService{l, b} {
		for shard := range testShards {
			got := slices.Collect(maps.Keys(holders(t, asker, shard)))
			slices.Sort(got)
			exp := slices.Clone(want[shard])
			slices.Sort(exp)
			if !slices.Equal(got, exp) {
				t.Errorf("holders of shard %d asked from %s: %v, want %v", shard, asker.host.ID(), got, exp)
			}
		}
	}

	// The light node's queries reached every full node, yet it sits in no
	// routing table: each full node's holds the two others.
	if got := l.RoutingTableSize(); got != len(full) {
		t.Errorf("light node's routing table: %d peers, want %d", got, len(full))
	}
	for _, s := range full {
		if got := s.RoutingTableSize(); got != len(full)-1 {
			t.Errorf("%s's routing table: %d peers, want %d (the light node is a DHT client)", s.host.ID(), got, len(full)-1)
		}
	}
	if err := l.Bootstrap(t.Context()); err != nil {
		t.Errorf("Bootstrap: %v", err)
	}
}

// After a round that provided every shard the loop provides them all
// again every ReprovideInterval.
func TestProvideLoopReprovides(t *testing.T) {
	mn, hs := nodetest.Mocknet(t, 2)
	ha, hb := hs[0], hs[1]
	reg := prometheus.NewRegistry()
	a, err := New(Config{NetworkID: testNetwork, Shards: shards(t, "0,3"), ReprovideInterval: 20 * time.Millisecond, Registerer: reg}, ha)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	newTestService(t, hb, "1", false)
	if err := mn.ConnectAllButSelf(); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "three provide rounds of both shards", 20*time.Second, func() bool {
		return nodetest.Counter(t, reg, "kpnode_dht_provides_total") >= 6
	})
	if !a.Provided() {
		t.Error("not Provided after three rounds")
	}
}

// Close ends the provide loop (no goroutine of the package is left, even
// while the loop waits out a backoff with no peer to provide to), is
// idempotent, and a closed service cannot start again.
func TestCloseEndsTheProvideLoop(t *testing.T) {
	_, hs := nodetest.Mocknet(t, 1)
	h := hs[0]
	s := newTestService(t, h, "0,2", false)
	nodetest.WaitFor(t, "the provide loop to run", 5*time.Second, func() bool { return len(nodetest.Goroutines("node/discovery")) == 1 })
	if s.Provided() {
		t.Error("Provided with no peer to provide to")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if left := nodetest.Goroutines("node/discovery"); len(left) != 0 {
		t.Fatalf("%d goroutines run the package's code after Close:\n\n%s", len(left), strings.Join(left, "\n\n"))
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Start(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close: %v, want ErrClosed", err)
	}
}

// Before Start there is no DHT: no holders, an empty routing table,
// Bootstrap refused; Close is still safe.
func TestBeforeStart(t *testing.T) {
	_, hs := nodetest.Mocknet(t, 1)
	h := hs[0]
	s, err := New(Config{NetworkID: testNetwork, Shards: shards(t, "1")}, h)
	if err != nil {
		t.Fatal(err)
	}
	for range s.Holders(t.Context(), 1) {
		t.Error("a holder before Start")
	}
	if s.RoutingTableSize() != 0 || s.Provided() {
		t.Error("routing table or provided before Start")
	}
	if err := s.Bootstrap(t.Context()); !errors.Is(err, ErrNotStarted) {
		t.Errorf("Bootstrap before Start: %v, want ErrNotStarted", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// The config takes its defaults and refuses what cannot work; the metric
// keeps its name and cannot be registered twice on one registry.
func TestConfigValidate(t *testing.T) {
	_, hs := nodetest.Mocknet(t, 1)
	h := hs[0]
	ok := Config{NetworkID: testNetwork, Shards: shards(t, "0")}
	c := ok
	c.setDefaults()
	if err := c.Validate(); err != nil || c.ReprovideInterval != DefaultReprovideInterval || c.ProvideTimeout != DefaultProvideTimeout ||
		c.Logger == nil || c.Registerer == nil {
		t.Fatalf("defaults: %+v, %v", c, err)
	}
	for name, mutate := range map[string]func(*Config){
		"no network ID":               func(c *Config) { c.NetworkID = "" },
		"no shard count":              func(c *Config) { c.Shards = protocol.ShardSet{} },
		"light holding a shard":       func(c *Config) { c.Light = true },
		"negative reprovide interval": func(c *Config) { c.ReprovideInterval = -time.Second },
		"negative provide timeout":    func(c *Config) { c.ProvideTimeout = -time.Second },
	} {
		c := ok
		mutate(&c)
		if _, err := New(c, h); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := New(ok, nil); err == nil {
		t.Error("no host: accepted")
	}
	reg := prometheus.NewRegistry()
	ok.Registerer = reg
	if _, err := New(ok, h); err != nil {
		t.Fatal(err)
	}
	if nodetest.Counter(t, reg, "kpnode_dht_provides_total") != 0 {
		t.Error("a fresh counter is not zero")
	}
	if _, err := New(ok, h); err == nil {
		t.Error("a second service registered the same metric on one registry")
	}
}

// TestConnectHoldersDialsProvidersNotYetConnected: a node linked to one
// peer only dials the holders of a shard it finds through the DHT, never
// itself or a peer it is already connected to, and at most want of them.
func TestConnectHoldersDialsProvidersNotYetConnected(t *testing.T) {
	mn, hs := nodetest.Mocknet(t, 4)
	// a (shard 0) is connected to b only; b, c and d hold shard 1, and
	// b is connected to c and d.
	a := newTestService(t, hs[0], "0", false)
	b := newTestService(t, hs[1], "1", false)
	c := newTestService(t, hs[2], "1", false)
	d := newTestService(t, hs[3], "1", false)
	for _, pair := range [][2]int{{0, 1}, {1, 2}, {1, 3}} {
		if _, err := mn.ConnectPeers(hs[pair[0]].ID(), hs[pair[1]].ID()); err != nil {
			t.Fatal(err)
		}
	}
	nodetest.WaitFor(t, "shard 1 provided by b, c and d", 10*time.Second, func() bool {
		return b.Provided() && c.Provided() && d.Provided() && len(holders(t, a, 1)) == 3
	})
	connected := func() int {
		k := 0
		for _, h := range hs[2:] {
			if hs[0].Network().Connectedness(h.ID()) == network.Connected {
				k++
			}
		}
		return k
	}
	// The holders query itself may have connected a to c or d (kad-dht
	// dials the peers it asks); ConnectHolders adds only what is missing.
	before := connected()
	if got := a.ConnectHolders(t.Context(), 1, 1); before < 2 && got != 1 {
		t.Fatalf("ConnectHolders(want 1) = %d with %d of c, d connected before, want 1", got, before)
	}
	if got := a.ConnectHolders(t.Context(), 1, 5); connected() != 2 || got > 2 {
		t.Fatalf("after ConnectHolders(want 5) = %d, a is connected to %d of c, d; want both, at most 2 new", got, connected())
	}
	if got := a.ConnectHolders(t.Context(), 1, 5); got != 0 {
		t.Fatalf("a third ConnectHolders dialled %d peers, want 0 (every holder connected)", got)
	}
	if got := a.ConnectHolders(t.Context(), 0, 5); got != 0 {
		t.Fatalf("ConnectHolders of a's own only shard dialled %d, want 0 (never itself)", got)
	}
}
