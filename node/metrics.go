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
	accountsAccepted prometheus.Counter
	accountsRejected *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, store *storage.Store) *metrics {
	m := &metrics{
		bundlesAccepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kpnode_bundles_accepted_total",
			Help: "Valid bundles by what the store did with them (stored, refreshed, duplicate, over_quota).",
		}, []string{"outcome"}),
		bundlesRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kpnode_bundles_rejected_total",
			Help: "Bundles refused by validation, by the rule that failed.",
		}, []string{"reason"}),
		accountsAccepted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kpnode_accounts_accepted_total",
			Help: "Account bundles stored.",
		}),
		accountsRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kpnode_accounts_rejected_total",
			Help: "Account bundles refused, by the rule that failed (stale: lamport not newer).",
		}, []string{"reason"}),
	}
	reg.MustRegister(m.bundlesAccepted, m.bundlesRejected, m.accountsAccepted, m.accountsRejected)
	gauge := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	gauge("kpnode_store_devices", "Devices with at least one stored bundle.", func() float64 { return float64(store.Counts().Devices) })
	gauge("kpnode_store_bundles", "Stored bundles.", func() float64 { return float64(store.Counts().Bundles) })
	gauge("kpnode_store_accounts", "Stored account bundles.", func() float64 { return float64(store.Counts().Accounts) })
	gauge("kpnode_store_lsm_bytes", "Size of the store's LSM tree on disk.", func() float64 { l, _ := store.DiskSize(); return float64(l) })
	gauge("kpnode_store_vlog_bytes", "Size of the store's value log on disk.", func() float64 { _, v := store.DiskSize(); return float64(v) })
	return m
}

func (m *metrics) bundleAccepted(o storage.PutOutcome) {
	m.bundlesAccepted.WithLabelValues(o.String()).Inc()
}

func (m *metrics) bundleRejected(r protocol.Rule) {
	m.bundlesRejected.WithLabelValues(string(r)).Inc()
}

func (m *metrics) accountRejected(r protocol.Rule) {
	m.accountsRejected.WithLabelValues(string(r)).Inc()
}
