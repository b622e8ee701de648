package node

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// metrics are the node's Prometheus metrics, registered on its own registry.
type metrics struct {
	bundlesAccepted  *prometheus.CounterVec
	bundlesRejected  *prometheus.CounterVec
	accountsAccepted *prometheus.CounterVec
	accountsRejected *prometheus.CounterVec
	noticesAccepted  *prometheus.CounterVec
	noticesRejected  *prometheus.CounterVec

	reg             prometheus.Registerer
	peersMismatched prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, store *storage.Store) *metrics {
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
		reg.MustRegister(c)
		return c
	}
	m := &metrics{
		bundlesAccepted: counter("kpnode_bundles_accepted_total",
			"Valid bundles by source (http, gossip, fetch, sync) and what the store did (stored, refreshed, duplicate, over_quota).", "source", "outcome"),
		bundlesRejected: counter("kpnode_bundles_rejected_total",
			"Bundles refused by validation, by source and the rule that failed.", "source", "reason"),
		accountsAccepted: counter("kpnode_accounts_accepted_total",
			"Valid account bundles by source and outcome.", "source", "outcome"),
		accountsRejected: counter("kpnode_accounts_rejected_total",
			"Account bundles refused, by source and rule (stale: lamport not newer).", "source", "reason"),
		noticesAccepted: counter("kpnode_notices_accepted_total",
			"Valid claim and consume notices by kind (claim, consume), source and what the store did.", "kind", "source", "outcome"),
		noticesRejected: counter("kpnode_notices_rejected_total",
			"Claim and consume notices refused by validation, by kind, source and rule.", "kind", "source", "reason"),
	}
	m.reg = reg
	m.peersMismatched = prometheus.NewCounter(prometheus.CounterOpts{Name: "kpnode_peers_mismatched_total",
		Help: "Identified peers of this network name whose kpnode protocols carry other network constants (shard count, MLS mode, lifetime cap)."})
	reg.MustRegister(m.peersMismatched)
	gauge := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	gauge("kpnode_store_devices", "Devices with at least one stored bundle.", func() float64 { return float64(store.Counts().Devices) })
	gauge("kpnode_store_bundles", "Stored bundles.", func() float64 { return float64(store.Counts().Bundles) })
	gauge("kpnode_store_accounts", "Stored account bundles.", func() float64 { return float64(store.Counts().Accounts) })
	gauge("kpnode_store_bytes", "Logical bytes the store holds (payloads plus a fixed overhead per record), counted against --max-store-bytes.", func() float64 { return float64(store.Bytes()) })
	gauge("kpnode_store_max_bytes", "The store budget (--max-store-bytes); 0 when there is none.", func() float64 { return float64(store.MaxBytes()) })
	gauge("kpnode_store_lsm_bytes", "Size of the store's LSM tree on disk.", func() float64 { l, _ := store.DiskSize(); return float64(l) })
	gauge("kpnode_store_vlog_bytes", "Size of the store's value log on disk.", func() float64 { _, v := store.DiskSize(); return float64(v) })
	return m
}

func (m *metrics) bundleAccepted(src source, o storage.PutOutcome) {
	m.bundlesAccepted.WithLabelValues(string(src), o.String()).Inc()
}

func (m *metrics) bundleRejected(src source, r protocol.Rule) {
	m.bundlesRejected.WithLabelValues(string(src), string(r)).Inc()
}

func (m *metrics) accountAccepted(src source, o storage.PutOutcome) {
	m.accountsAccepted.WithLabelValues(string(src), o.String()).Inc()
}

func (m *metrics) accountRejected(src source, r protocol.Rule) {
	m.accountsRejected.WithLabelValues(string(src), string(r)).Inc()
}

func (m *metrics) noticeAccepted(kind string, src source, o storage.PutOutcome) {
	m.noticesAccepted.WithLabelValues(kind, string(src), o.String()).Inc()
}

func (m *metrics) noticeRejected(kind string, src source, r protocol.Rule) {
	m.noticesRejected.WithLabelValues(kind, string(src), string(r)).Inc()
}

// peerMismatched counts peers of this network that speak its protocols with
// other network constants (a configuration split).
func (m *metrics) peerMismatched() { m.peersMismatched.Inc() }
