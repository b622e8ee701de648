package gossip

import (
	"sync"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/internal/nodetest"
)

func rpcOf(sizes ...int) *pubsub.RPC {
	rpc := &pubsub.RPC{}
	for _, s := range sizes {
		rpc.Publish = append(rpc.Publish, &pubsubpb.Message{Data: make([]byte, s)})
	}
	return rpc
}

// fakeGuard records penalties and answers Banned from them.
type fakeGuard struct {
	mu        sync.Mutex
	penalties map[peer.ID][]string
}

func (g *fakeGuard) Penalize(p peer.ID, proto, reason string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.penalties == nil {
		g.penalties = map[peer.ID][]string{}
	}
	g.penalties[p] = append(g.penalties[p], proto+"/"+reason)
}

func (g *fakeGuard) Banned(p peer.ID) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.penalties[p]) > 0
}

func testMetrics(t testing.TB) (*metrics, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	return m, reg
}

// The per-peer inbound byte budget lets honest bursts through, drops (but
// does not ban) what exceeds it, charges tiny messages a minimum, and refills.
func TestGossipInboundBudget(t *testing.T) {
	guard := &fakeGuard{}
	m, reg := testMetrics(t)
	now := time.Unix(1_000_000, 0)
	b := newInboundBudget(DefaultPeerBurst, DefaultPeerRate, DefaultMinCharge, m, func() time.Time { return now })
	honest, hostile := peer.ID("honest"), peer.ID("hostile")

	// Ten bursts of 1,000 real-sized bundles at once: within the budget.
	for i := 0; i < 10_000; i++ {
		if err := b.inspect(honest, rpcOf(2900)); err != nil {
			t.Fatalf("honest message %d refused: %v", i, err)
		}
	}
	// Control-only RPCs cost nothing.
	if err := b.inspect(honest, &pubsub.RPC{}); err != nil {
		t.Fatal(err)
	}
	// A second later the bucket has refilled by the rate.
	now = now.Add(time.Second)
	for i := 0; i < DefaultPeerRate/(64<<10); i++ {
		if err := b.inspect(honest, rpcOf(64<<10)); err != nil {
			t.Fatalf("refilled budget refused message %d: %v", i, err)
		}
	}
	if guard.Banned(honest) {
		t.Fatal("an honest peer was cut off")
	}

	// Tiny messages pay the minimum charge: 32 Ki one-byte messages use the
	// whole burst.
	for i := 0; i < DefaultPeerBurst/DefaultMinCharge; i++ {
		if err := b.inspect(hostile, rpcOf(1)); err != nil {
			t.Fatalf("message %d refused early", i)
		}
	}
	if err := b.inspect(hostile, rpcOf(1)); err == nil || guard.Banned(hostile) {
		t.Fatalf("peer over its budget: err %v (want a drop), banned %v (want no ban)", err, guard.Banned(hostile))
	}
	if got := nodetest.Counter(t, reg, "kpnode_gossip_rpcs_refused_total", "reason", "inbound_bytes"); got != 1 {
		t.Errorf("kpnode_gossip_rpcs_refused_total{reason=inbound_bytes} = %v, want 1", got)
	}
	// The bucket refills: the same peer is served again a moment later.
	now = now.Add(time.Second)
	if err := b.inspect(hostile, rpcOf(1)); err != nil {
		t.Fatalf("refilled bucket refused: %v", err)
	}
	// A clock that steps back refills nothing and takes nothing away.
	now = now.Add(-time.Hour)
	if err := b.inspect(hostile, rpcOf(1)); err != nil {
		t.Fatalf("after the clock stepped back: %v", err)
	}
}
