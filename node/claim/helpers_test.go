package claim

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/fetch/fetchtest"
	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

const (
	testProto  = "/kpnode/test/fetch/1.0.0"
	testShards = 4
)

func testPolicy() protocol.Policy {
	p := protocol.DefaultPolicy()
	p.MLS = protocol.MLSOff
	return p
}

// clock is a test clock that moves 1 ms each time it is read, so two
// claim notices of one node never share a timestamp (and a hash).
type clock struct{ ms atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ms.Store(time.Now().UnixMilli())
	return c
}

func (c *clock) Now() time.Time          { return time.UnixMilli(c.ms.Add(1)) }
func (c *clock) Advance(d time.Duration) { c.ms.Add(d.Milliseconds()) }

// nodeIdentity returns an Ed25519 identity key and its peer ID.
func nodeIdentity(t testing.TB, seed byte) (ed25519.PrivateKey, crypto.PrivKey, peer.ID) {
	t.Helper()
	key := nodetest.SeedKey(seed)
	sk, err := crypto.UnmarshalEd25519PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(sk)
	if err != nil {
		t.Fatal(err)
	}
	return key, sk, id
}

// ingester is the node's ingest path for claim notices: validate, then
// the store.
type ingester struct {
	store  *storage.Store
	policy protocol.Policy
	now    func() time.Time
}

func (i ingester) IngestClaim(ctx context.Context, n *protocol.ClaimNotice, _ ingest.Source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	info, err := i.policy.ValidateClaim(n, i.now())
	if err != nil {
		return 0, info, err
	}
	o, err := i.store.PutClaim(ctx, n, info)
	return o, info, err
}

// view is a fixed view of the holders of every shard.
type view struct {
	mu      sync.Mutex
	holders []peer.ID
}

func (v *view) ShardHolders(int) []peer.ID {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]peer.ID(nil), v.holders...)
}

// finder names fixed holders of every shard.
type finder struct{ holders []peer.ID }

func (f finder) Holders(ctx context.Context, _ int) <-chan peer.AddrInfo {
	ch := make(chan peer.AddrInfo, len(f.holders))
	for _, h := range f.holders {
		ch <- peer.AddrInfo{ID: h}
	}
	close(ch)
	return ch
}

// gossip delivers every published claim notice to the other nodes'
// ingest paths at once (when on), and counts what was published.
type gossip struct {
	on        bool
	published atomic.Int64
	peers     func() []*testNode
	self      peer.ID
}

func (g *gossip) PublishClaim(ctx context.Context, n *protocol.ClaimNotice) error {
	g.published.Add(1)
	if !g.on || g.peers == nil {
		return nil
	}
	for _, o := range g.peers() {
		if o.id != g.self && o.shards.HasKey(deviceOf(n)) {
			_, _, _ = o.ing.IngestClaim(ctx, n, ingest.SourceGossip)
		}
	}
	return nil
}

func deviceOf(n *protocol.ClaimNotice) protocol.Key {
	_, d, _, _ := protocol.DecodeClaimPayload(n.Payload)
	return d
}

// testNode is one node: a real Badger store, the claim service, a fetch
// server answering over net.Pipe, and a fetch client whose streams reach
// the other nodes of its cluster.
type testNode struct {
	id     peer.ID
	key    ed25519.PrivateKey
	shards protocol.ShardSet
	store  *storage.Store
	ing    ingester
	svc    *Service
	srv    *fetch.Server
	pipes  *fetchtest.Pipes
	view   *view
	gossip *gossip
	reg    *prometheus.Registry
}

// cluster is a set of nodes on one in-process network.
type cluster struct {
	t     testing.TB
	clock *clock
	nodes []*testNode
	// lastResort holds the refs the nodes' fetch clients take for
	// last-resort bundles (with MLS off, validation cannot tell).
	lastResort sync.Map
}

// lastResortValidator is the policy's validator that also marks the
// cluster's last-resort refs, as MLS validation reads the extension.
type lastResortValidator struct {
	fetch.PolicyValidator
	refs *sync.Map
}

func (v lastResortValidator) ValidateBundle(b *protocol.Bundle) (protocol.BundleInfo, error) {
	info, err := v.PolicyValidator.ValidateBundle(b)
	if _, ok := v.refs.Load(info.Ref); ok && err == nil {
		info.LastResort = true
	}
	return info, err
}

func newCluster(t testing.TB) *cluster {
	return &cluster{t: t, clock: newClock()}
}

// add starts a node; light nodes hold no shard. mutate may change its
// config before the service is built.
func (c *cluster) add(seed byte, light bool, mutate func(*Config)) *testNode {
	t := c.t
	t.Helper()
	key, _, id := nodeIdentity(t, seed)
	shards := protocol.AllShards(testShards)
	if light {
		shards = protocol.NoShards(testShards)
	}
	n := &testNode{id: id, key: key, shards: shards, pipes: fetchtest.New(id), view: &view{}, reg: prometheus.NewRegistry()}
	n.store = nodetest.OpenStore(t, storage.Options{ShardCount: testShards})
	n.ing = ingester{store: n.store, policy: testPolicy(), now: c.clock.Now}
	n.gossip = &gossip{self: id, peers: func() []*testNode { return c.nodes }}
	cli, err := fetch.NewClient(fetch.ClientConfig{Protocol: testProto, Opener: n.pipes,
		Validator: lastResortValidator{fetch.PolicyValidator{Policy: testPolicy(), Now: c.clock.Now}, &c.lastResort}, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var holders []peer.ID
	for _, o := range c.nodes {
		if !o.shards.Empty() {
			holders = append(holders, o.id)
		}
	}
	cfg := Config{Store: n.store, Ingester: n.ing, View: n.view, Client: cli, Publisher: n.gossip,
		Finder: finder{holders: holders}, Self: id, Key: key, Shards: shards,
		RequesterRate: 1000, RequesterBurst: 1000, DeviceRate: 1000, DeviceBurst: 1000,
		OwnerTimeout: 5 * time.Second, Now: c.clock.Now, Logger: nodetest.QuietLogger(), Registerer: n.reg}
	if mutate != nil {
		mutate(&cfg)
	}
	if n.svc, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	n.srv, err = fetch.NewServer(fetch.ServerConfig{Protocol: testProto, Store: n.store, Holds: shards.HasKey,
		Claimer: n.svc, Logger: nodetest.QuietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.srv.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.srv.Close(); n.pipes.Wait() })
	// Every node reaches every other, both ways.
	for _, o := range c.nodes {
		n.pipes.Handle(o.id, o.handler())
		o.pipes.Handle(n.id, n.handler())
	}
	c.nodes = append(c.nodes, n)
	return n
}

func (n *testNode) handler() fetchtest.Handler {
	return func(s network.Stream, from peer.ID) { n.srv.Handle(s, from) }
}

// holders sets every node's view of the holders to the cluster's holders.
func (c *cluster) agree() []peer.ID {
	var hs []peer.ID
	for _, n := range c.nodes {
		if !n.shards.Empty() {
			hs = append(hs, n.id)
		}
	}
	for _, n := range c.nodes {
		n.view.mu.Lock()
		n.view.holders = append([]peer.ID(nil), hs...)
		n.view.mu.Unlock()
	}
	return hs
}

// pool is a device with one-time bundles and one last-resort bundle.
type pool struct {
	dev        protocol.Key
	oneTime    []*storage.Bundle
	lastResort *storage.Bundle
}

// newPool signs n one-time bundles and a last-resort one for device seed.
func newPool(t testing.TB, c *clock, seed byte, n int) *pool {
	t.Helper()
	key := nodetest.SeedKey(seed)
	p := &pool{}
	copy(p.dev[:], key.Public().(ed25519.PublicKey))
	sign := func(i int, lastResort bool) *storage.Bundle {
		b := protocol.SignBundle(key, uint64(c.Now().UnixMilli()), fmt.Appendf(nil, "kp-%d-%d-%v", seed, i, lastResort))
		info, err := testPolicy().ValidateBundle(&b, c.Now())
		if err != nil {
			t.Fatal(err)
		}
		info.LastResort = lastResort
		return &storage.Bundle{Bundle: b, BundleInfo: info}
	}
	for i := range n {
		p.oneTime = append(p.oneTime, sign(i, false))
	}
	p.lastResort = sign(n, true)
	return p
}

// storeIn puts the pool's bundles into the nodes' stores.
func (p *pool) storeIn(t testing.TB, nodes ...*testNode) {
	t.Helper()
	for _, n := range nodes {
		for _, b := range append(append([]*storage.Bundle(nil), p.oneTime...), p.lastResort) {
			cp := *b
			if _, err := n.store.PutBundle(context.Background(), &cp); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func (p *pool) isOneTime(r protocol.Ref) bool {
	for _, b := range p.oneTime {
		if b.Ref == r {
			return true
		}
	}
	return false
}

func counter(t testing.TB, n *testNode, name string, labels ...string) float64 {
	t.Helper()
	return nodetest.Counter(t, n.reg, name, labels...)
}
