package lookup

import (
	"context"
	"crypto/ed25519"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/fetch/fetchtest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

const (
	testProto  = "/kpnode/test/fetch/1.0.0"
	shardCount = 8
)

var self = peer.ID("light")

func testPolicy() protocol.Policy {
	p := protocol.DefaultPolicy()
	p.MLS = protocol.MLSOff
	return p
}

// clock is a settable clock starting at the wall time.
type clock struct{ off atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *clock) Advance(d time.Duration) { c.off.Add(int64(d)) }

// memStore is a holder's store: what a fetch.Server reads, in memory.
type memStore struct {
	mu       sync.Mutex
	bundles  map[protocol.Key]*storage.Bundle
	accounts map[protocol.Key]*storage.Account
	consumes map[protocol.Key][]*protocol.ConsumeNotice // oldest first
}

func newMemStore() *memStore {
	return &memStore{bundles: map[protocol.Key]*storage.Bundle{}, accounts: map[protocol.Key]*storage.Account{},
		consumes: map[protocol.Key][]*protocol.ConsumeNotice{}}
}

// consume records the device's signed consume notice of b (the holder's
// latest is whatever putBundle set).
func (m *memStore) consume(key ed25519.PrivateKey, ts time.Time, b protocol.Bundle) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := protocol.SignConsume(key, uint64(ts.UnixMilli()), []protocol.Ref{refOf(b)})
	m.consumes[n.DeviceID] = append(m.consumes[n.DeviceID], &n)
}

func (m *memStore) ConsumeNotices(_ context.Context, k protocol.Key, limit int) ([]*protocol.ConsumeNotice, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*protocol.ConsumeNotice
	for i := len(m.consumes[k]) - 1; i >= 0 && len(out) < limit; i-- {
		out = append(out, m.consumes[k][i])
	}
	return out, nil
}

// refOf returns a bundle's ref as validation derives it.
func refOf(b protocol.Bundle) protocol.Ref {
	info, err := testPolicy().ValidateBundle(&b, time.Now())
	if err != nil {
		panic(err)
	}
	return info.Ref
}

func (m *memStore) putBundle(b protocol.Bundle) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.bundles[b.DeviceID] = &storage.Bundle{Bundle: b}
}

func (m *memStore) delete(k protocol.Key) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.bundles, k)
}

func (m *memStore) putAccount(a protocol.AccountBundle) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.accounts[a.AccountPub] = &storage.Account{AccountBundle: a, UpdatedAtMS: time.Now().UnixMilli()}
}

func (m *memStore) LatestBundle(_ context.Context, k protocol.Key) (*storage.Bundle, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if b, ok := m.bundles[k]; ok {
		return b, nil
	}
	return nil, storage.ErrNotFound
}

func (m *memStore) BundlesUpTo(ctx context.Context, k protocol.Key, _ int) ([]*storage.Bundle, bool, error) {
	b, err := m.LatestBundle(ctx, k)
	if err != nil {
		return nil, false, nil
	}
	return []*storage.Bundle{b}, false, nil
}

func (m *memStore) Account(_ context.Context, k protocol.Key) (*storage.Account, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if a, ok := m.accounts[k]; ok {
		return a, nil
	}
	return nil, storage.ErrNotFound
}

// finder names holders; with open set, its query runs until ctx ends (as
// a DHT query does), else it ends once it has named them.
type finder struct {
	mu      sync.Mutex
	holders []peer.ID
	open    bool
	queries atomic.Int64
}

func (f *finder) set(open bool, holders ...peer.ID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.holders, f.open = holders, open
}

func (f *finder) Holders(ctx context.Context, _ int) <-chan peer.AddrInfo {
	f.queries.Add(1)
	f.mu.Lock()
	holders, open := append([]peer.ID(nil), f.holders...), f.open
	f.mu.Unlock()
	ch := make(chan peer.AddrInfo, len(holders))
	for _, h := range holders {
		ch <- peer.AddrInfo{ID: h}
	}
	if !open {
		close(ch)
		return ch
	}
	context.AfterFunc(ctx, func() { close(ch) })
	return ch
}

// world is a light node's lookup and the holders it may ask: real fetch
// servers (or hostile handlers) reached by the real fetch client over
// net.Pipe, the lookup's floors in a real Badger store.
type world struct {
	t      testing.TB
	lookup *Lookup
	floors *storage.Store
	clock  *clock
	find   *finder
	pipes  *fetchtest.Pipes
	reg    *prometheus.Registry
	stores map[peer.ID]*memStore
}

func newWorld(t testing.TB, mutate func(*Config)) *world {
	t.Helper()
	floors := nodetest.OpenStore(t, storage.Options{})
	w := &world{t: t, floors: floors, clock: &clock{}, find: &finder{}, pipes: fetchtest.New(self),
		reg: prometheus.NewRegistry(), stores: map[peer.ID]*memStore{}}
	t.Cleanup(w.pipes.Wait)
	w.lookup = w.newLookup(mutate)
	return w
}

// newLookup builds and starts a lookup over the world's holders and floors
// (a second one models a restarted node: same floors, empty cache).
func (w *world) newLookup(mutate func(*Config)) *Lookup {
	w.t.Helper()
	// The consume notices answers carry are ingested as a node does:
	// validated, then stored (tombstones in the floors' store).
	consumed := func(ctx context.Context, _ peer.ID, ns []*protocol.ConsumeNotice) {
		for _, n := range ns {
			info, err := testPolicy().ValidateConsume(n, w.clock.Now())
			if err != nil {
				continue
			}
			_, _ = w.floors.PutConsume(ctx, n, info)
		}
	}
	client, err := fetch.NewClient(fetch.ClientConfig{Protocol: testProto, Opener: w.pipes,
		Validator: fetch.PolicyValidator{Policy: testPolicy(), Now: w.clock.Now}, Consumed: consumed})
	if err != nil {
		w.t.Fatal(err)
	}
	cfg := Config{Holders: w.find, Fetcher: client, Floors: w.floors, Consumed: w.floors, Self: self, ShardCount: shardCount,
		Retention: testPolicy().Retention, Timeout: 5 * time.Second, Grace: 50 * time.Millisecond,
		Now: w.clock.Now, Logger: nodetest.QuietLogger()}
	if w.lookup == nil {
		cfg.Registerer = w.reg
	}
	if mutate != nil {
		mutate(&cfg)
	}
	l, err := New(cfg)
	if err != nil {
		w.t.Fatal(err)
	}
	if err := l.Start(w.t.Context()); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { l.Close() })
	return l
}

// server starts a real fetch server over st.
func (w *world) server(st *memStore) *fetch.Server {
	w.t.Helper()
	srv, err := fetch.NewServer(fetch.ServerConfig{Protocol: testProto, Store: st,
		Holds: func(protocol.Key) bool { return true }, Logger: nodetest.QuietLogger()})
	if err != nil {
		w.t.Fatal(err)
	}
	if err := srv.Start(w.t.Context()); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { srv.Close() })
	return srv
}

// holder makes id an honest holder: a real fetch server over a store of
// its own, which it returns.
func (w *world) holder(id peer.ID) *memStore {
	w.t.Helper()
	st := newMemStore()
	srv := w.server(st)
	w.pipes.Handle(id, func(s network.Stream, from peer.ID) { srv.Handle(s, from) })
	w.stores[id] = st
	return st
}

// delayed makes id a lagging holder: a real fetch server that takes each
// stream only once release is closed.
func (w *world) delayed(id peer.ID, release <-chan struct{}) *memStore {
	w.t.Helper()
	st := newMemStore()
	srv := w.server(st)
	w.pipes.Handle(id, func(s network.Stream, from peer.ID) {
		select {
		case <-release:
		case <-w.t.Context().Done():
		}
		srv.Handle(s, from)
	})
	w.stores[id] = st
	return st
}

// stalling makes id a holder that takes the request and never answers.
func (w *world) stalling(id peer.ID) {
	w.pipes.Handle(id, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		_, _ = io.Copy(io.Discard, s)
	})
}

func (w *world) count(kind, result string) float64 {
	c, err := w.lookup.lookups.GetMetricWithLabelValues(kind, result)
	if err != nil {
		w.t.Fatal(err)
	}
	return nodetest.Value(c)
}

func bundleAt(key ed25519.PrivateKey, ts time.Time, kp string) protocol.Bundle {
	return protocol.SignBundle(key, uint64(ts.UnixMilli()), []byte(kp))
}
