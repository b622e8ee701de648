package gossip

import (
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/node/ingest"
)

// metrics are the gossip layer's Prometheus metrics.
type metrics struct {
	verdicts    *prometheus.CounterVec
	dropped     *prometheus.CounterVec
	rpcsRefused *prometheus.CounterVec
	notices     *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		verdicts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_gossip_validations_total",
			Help: "Gossip validator verdicts (accept, reject, ignore)."}, []string{"verdict"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_gossip_dropped_total",
			Help: "Gossip messages or RPCs dropped by a full queue (where: outbound, validation, subscription)."}, []string{"where"}),
		rpcsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_gossip_rpcs_refused_total",
			Help: "Inbound gossipsub RPCs refused before decoding, by reason (too_large, malformed); the sender is cut off."}, []string{"reason"}),
		notices: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_gossip_notices_refused_total",
			Help: "Claim and consume notices refused by the gossip notice budgets, by reason (peer_budget: Ignored, the forwarding peer over its notice budget; origin_flood: Rejected, a claim notice's origin forwarding its own notices far over its claim rate; peer_device: Ignored, the forwarding peer over its claim budget for the notice's device; consume_bytes: Ignored, the forwarding peer over its consume notice byte budget)."}, []string{"reason"}),
	}
	for _, c := range []prometheus.Collector{m.verdicts, m.dropped, m.rpcsRefused, m.notices} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// verdict counts a validator's verdict under its name (accept, reject,
// ignore).
func (m *metrics) verdict(v ingest.Verdict) { m.verdicts.WithLabelValues(v.String()).Inc() }

// rpcRefused counts an inbound RPC refused before decoding, by reason.
func (m *metrics) rpcRefused(reason string) { m.rpcsRefused.WithLabelValues(reason).Inc() }

// noticeRefused counts a notice refused by a notice budget, by reason.
func (m *metrics) noticeRefused(reason string) {
	if m != nil {
		m.notices.WithLabelValues(reason).Inc()
	}
}

// dropTracer counts the drops gossipsub otherwise makes silently.
type dropTracer struct{ m *metrics }

func (t dropTracer) DropRPC(*pubsub.RPC, peer.ID) {
	t.m.dropped.WithLabelValues("outbound").Inc()
}
func (t dropTracer) UndeliverableMessage(*pubsub.Message) {
	t.m.dropped.WithLabelValues("subscription").Inc()
}
func (t dropTracer) RejectMessage(_ *pubsub.Message, reason string) {
	switch reason {
	case pubsub.RejectValidationQueueFull, pubsub.RejectValidationThrottled:
		t.m.dropped.WithLabelValues("validation").Inc()
	}
}
func (dropTracer) OnNewOutboundStream(peer.ID, p2pprotocol.ID)          {}
func (dropTracer) OnClosedOutboundStream(peer.ID)                       {}
func (dropTracer) SendRPCCompleted(*pubsub.RPC, peer.ID, time.Duration) {}
func (dropTracer) Join(string)                                          {}
func (dropTracer) Leave(string)                                         {}
func (dropTracer) Graft(peer.ID, string)                                {}
func (dropTracer) Prune(peer.ID, string)                                {}
func (dropTracer) ValidateMessage(*pubsub.Message)                      {}
func (dropTracer) DeliverMessage(*pubsub.Message)                       {}
func (dropTracer) DuplicateMessage(*pubsub.Message)                     {}
func (dropTracer) ThrottlePeer(peer.ID)                                 {}
func (dropTracer) RecvRPC(*pubsub.RPC)                                  {}
func (dropTracer) SendRPC(*pubsub.RPC, peer.ID)                         {}
