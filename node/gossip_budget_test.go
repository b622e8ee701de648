package node

import (
	"io"
	"log/slog"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"
)

func rpcOf(sizes ...int) *pubsub.RPC {
	rpc := &pubsub.RPC{}
	for _, s := range sizes {
		rpc.Publish = append(rpc.Publish, &pubsubpb.Message{Data: make([]byte, s)})
	}
	return rpc
}

// The per-peer inbound byte budget lets honest bursts through, drops (but
// does not ban) what exceeds it, charges tiny messages a minimum, and refills.
func TestGossipInboundBudget(t *testing.T) {
	reg := prometheus.NewRegistry()
	guard := newPeerGuard(slog.New(slog.NewTextHandler(io.Discard, nil)), reg, time.Now)
	now := time.Unix(1_000_000, 0)
	b := newInboundBudget(guard, &metrics{gossipRPCsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "x"}, []string{"reason"})},
		func() time.Time { return now })
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
	for i := 0; i < gossipPeerRate/(64<<10); i++ {
		if err := b.inspect(honest, rpcOf(64<<10)); err != nil {
			t.Fatalf("refilled budget refused message %d: %v", i, err)
		}
	}
	if guard.banned(honest) {
		t.Fatal("an honest peer was cut off")
	}

	// Tiny messages pay the minimum charge: 32 Ki one-byte messages use the
	// whole burst.
	for i := 0; i < gossipPeerBurst/gossipMinCharge; i++ {
		if err := b.inspect(hostile, rpcOf(1)); err != nil {
			t.Fatalf("message %d refused early", i)
		}
	}
	if err := b.inspect(hostile, rpcOf(1)); err == nil || guard.banned(hostile) {
		t.Fatalf("peer over its budget: err %v (want a drop), banned %v (want no ban)", err, guard.banned(hostile))
	}
	// The bucket refills: the same peer is served again a moment later.
	now = now.Add(time.Second)
	if err := b.inspect(hostile, rpcOf(1)); err != nil {
		t.Fatalf("refilled bucket refused: %v", err)
	}
}
