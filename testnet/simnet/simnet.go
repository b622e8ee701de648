// Package simnet runs networks of kpnode nodes on go-libp2p's simulated
// network (github.com/marcopolo/simnet, QUIC over simulated UDP links) for
// tests and simulations in virtual time.
//
// Call New and everything after it inside a testing/synctest bubble
// (synctest.Test): time then only moves when every goroutine of the bubble
// is blocked, so a scenario of minutes of network time runs in the wall
// time its CPU work takes, and timeouts, retries and periodic syncs happen
// exactly as configured. Each node is a real node.Node (real gossip, fetch,
// sync, DHT, validation) with an injected libp2p host, an in-memory store
// and no HTTP listener (call its methods, or its Handler with httptest).
//
// Links have a configurable one-way latency, bandwidth and loss; Partition
// splits the network into groups that cannot reach each other, Heal joins
// them again. Node identities, shard placement, the initial topology and
// the bundles of NewBundle derive from Options.Seed. What is deterministic
// for a seed is documented on Network.Log.
package simnet

import (
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pquic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/quicreuse"
	msim "github.com/marcopolo/simnet"
	"github.com/quic-go/quic-go"
	"go.uber.org/fx"
	"golang.org/x/sync/errgroup"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// Options configure a simulated network. Zero values take the defaults
// noted on each field.
type Options struct {
	// Full and Light are the numbers of full nodes (indexes 0..Full-1) and
	// light nodes (Full..Full+Light-1). Full must be at least 1.
	Full, Light int
	// ShardCount is the network's S. Default 8.
	ShardCount int
	// Replication is how many full nodes at least hold each shard. Shard s
	// goes to full nodes s, s+S, s+2S, … (mod Full), so a shard's holders
	// spread over the index range and every full node holds about as many
	// shards as the others. Every full node holds at least one shard, so
	// when S·R < Full shards have about Full/S holders. Default min(2,
	// Full); at most Full.
	Replication int
	// Latency is the one-way delay of every packet. Default 10 ms.
	Latency time.Duration
	// Bandwidth is each node's uplink and downlink in bits per second.
	// Default 100 Mbit/s.
	Bandwidth int
	// Loss is the probability that a packet is dropped, in [0, 1).
	Loss float64
	// Seed seeds node identities, the topology, loss and NewBundle's
	// device keys (shard placement follows from the counts alone).
	Seed int64
	// Degree is how many peers each node dials at Start (a random, seeded
	// choice among the others, after one link to an earlier node that keeps
	// the topology connected). Default 4.
	Degree int
	// Network names the registry network. Default "simnet".
	Network string
	// MLS is the validation mode. Default strict.
	MLS protocol.MLSMode
	// Logger receives the nodes' logs (with attribute node=i). Default:
	// discarded.
	Logger *slog.Logger
	// NodeConfig, if set, adjusts node i's config after the harness set it
	// up. It may change anything but Host and Gater: the shards the harness
	// placed (Light too, with Shards to match), or InMemory off with a
	// DataDir for a store that survives Restart. An OnBundleStored it sets
	// is called after the harness's own.
	NodeConfig func(i int, c *node.Config)
}

// Defaults of Options.
const (
	DefaultShardCount = 8
	DefaultLatency    = 10 * time.Millisecond
	DefaultBandwidth  = 100_000_000
	DefaultDegree     = 4
	DefaultNetwork    = "simnet"
)

func (o *Options) setDefaults() {
	if o.ShardCount == 0 {
		o.ShardCount = DefaultShardCount
	}
	if o.Replication == 0 {
		o.Replication = min(2, o.Full)
	}
	if o.Latency == 0 {
		o.Latency = DefaultLatency
	}
	if o.Bandwidth == 0 {
		o.Bandwidth = DefaultBandwidth
	}
	if o.Degree == 0 {
		o.Degree = DefaultDegree
	}
	if o.Network == "" {
		o.Network = DefaultNetwork
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports whether o (after defaults) describes a network.
func (o Options) Validate() error {
	switch {
	case o.Full < 1 || o.Light < 0:
		return fmt.Errorf("simnet: want at least 1 full node and no negative count, got %d full, %d light", o.Full, o.Light)
	case o.ShardCount < 1 || o.ShardCount > 256:
		return fmt.Errorf("simnet: %w", protocol.ErrShardCount)
	case o.Replication < 1 || o.Replication > o.Full:
		return fmt.Errorf("simnet: replication must be in [1, %d], got %d", o.Full, o.Replication)
	case o.Latency < 0 || o.Bandwidth < 1 || o.Degree < 1:
		return errors.New("simnet: latency must not be negative, bandwidth and degree must be positive")
	case o.Loss < 0 || o.Loss >= 1:
		return fmt.Errorf("simnet: loss must be in [0, 1), got %v", o.Loss)
	}
	return nil
}

// Node is one node of the network: the real node.Node (embedded: call
// SubmitBundle, LatestBundle, Handler, … on it) and its simulated host.
type Node struct {
	*node.Node
	// Index is the node's place in Network.Nodes.
	Index int
	// Light reports a light node (no shards).
	Light bool
	// Host is the node's libp2p host (owned and closed by the Network).
	Host host.Host
	// Addr is the host's address, for Connect.
	Addr peer.AddrInfo

	sk      crypto.PrivKey
	cfg     node.Config // as built, without Host and Gater
	conn    *linkConn
	stopped bool
}

// Traffic is what a node's link carried, counted on the simulated link
// (QUIC packets with their headers; no loopback).
type Traffic struct {
	BytesSent, BytesRcvd     int64
	PacketsSent, PacketsRcvd int64
	// PacketsDropped were written by the node and lost (Loss, Partition).
	PacketsDropped int64
}

// Network is a running simulated network.
type Network struct {
	// Nodes are the full nodes, then the light nodes.
	Nodes []*Node

	opts    Options
	sim     *msim.Simnet
	edges   [][2]int // seeded topology: Start dials a → b
	rng     *rand.Rand
	rngMu   sync.Mutex
	groupMu sync.RWMutex    // guards group and ipNode
	group   map[int]int     // endpoint → partition group; nil: no partition
	ipNode  map[[4]byte]int // endpoint of an address
	ids     io.Reader       // seeded identities, nodes first, then NewHost's
	hosts   []host.Host
	ends    int // endpoints so far: nodes 0..len(Nodes)-1, then NewHost's

	events eventLog

	mu      sync.Mutex
	started bool
	closed  bool
}

// New builds the network: the simulated links, a libp2p host and a
// node.Node per node. Call it inside a synctest bubble, then Start.
func New(opts Options) (*Network, error) {
	opts.setDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	nw := &Network{
		opts:   opts,
		sim:    &msim.Simnet{LatencyFunc: msim.StaticLatency(opts.Latency), Logger: opts.Logger.With("component", "simnet")},
		rng:    rand.New(rand.NewChaCha8(seedBytes(opts.Seed, "bundles"))),
		ipNode: map[[4]byte]int{},
	}
	nw.events.start = time.Now()
	shards := placeShards(opts)
	nw.ids = rand.NewChaCha8(seedBytes(opts.Seed, "identities"))
	total := opts.Full + opts.Light
	for i := range total {
		n, err := nw.newNode(i, shards[i])
		if err != nil {
			nw.Close()
			return nil, fmt.Errorf("simnet: node %d: %w", i, err)
		}
		nw.Nodes = append(nw.Nodes, n)
	}
	nw.edges = topology(total, opts.Degree, rand.New(rand.NewChaCha8(seedBytes(opts.Seed, "topology"))))
	return nw, nil
}

// seedBytes derives a ChaCha8 seed for one purpose from the network seed.
func seedBytes(seed int64, purpose string) [32]byte {
	var b [32]byte
	binary.LittleEndian.PutUint64(b[:8], uint64(seed))
	copy(b[8:], purpose)
	return b
}

// placeShards returns each node's shards (nil for a light node): slot k
// of K = max(S·R, Full) rounded up to a multiple of S puts shard k mod S on
// full node k mod Full (the next node not holding it yet, on a collision).
// A shard's holders are thus S apart in index order, spread over the whole
// network, and every full node holds about K/Full shards.
func placeShards(o Options) [][]int {
	out := make([][]int, o.Full+o.Light)
	k := max(o.ShardCount*o.Replication, o.Full)
	k = (k + o.ShardCount - 1) / o.ShardCount * o.ShardCount
	holds := make([]map[int]bool, o.Full)
	for i := range holds {
		holds[i] = map[int]bool{}
	}
	for slot := range k {
		s := slot % o.ShardCount
		i := slot % o.Full
		for n := 0; holds[i][s] && n < o.Full; n++ {
			i = (i + 1) % o.Full
		}
		if !holds[i][s] {
			holds[i][s] = true
			out[i] = append(out[i], s)
		}
	}
	for i := range o.Full {
		slices.Sort(out[i])
	}
	return out
}

// topology returns the seeded edges: node i dials one earlier node (so the
// graph is connected) and more random peers until it has degree links of
// its own.
func topology(n, degree int, rng *rand.Rand) [][2]int {
	var edges [][2]int
	has := map[[2]int]bool{}
	add := func(a, b int) bool {
		if a == b || has[[2]int{a, b}] || has[[2]int{b, a}] {
			return false
		}
		has[[2]int{a, b}] = true
		edges = append(edges, [2]int{a, b})
		return true
	}
	for i := 1; i < n; i++ {
		add(i, rng.IntN(i))
	}
	for i := range n {
		want := min(degree, n-1)
		for tries := 0; tries < 4*degree; tries++ {
			mine := 0
			for _, e := range edges {
				if e[0] == i {
					mine++
				}
			}
			if mine >= want {
				break
			}
			add(i, rng.IntN(n))
		}
	}
	return edges
}

func (nw *Network) newNode(i int, shards []int) (*Node, error) {
	o := nw.opts
	sk, _, err := crypto.GenerateEd25519Key(nw.ids)
	if err != nil {
		return nil, err
	}
	light := i >= o.Full
	cfg := node.DefaultConfig()
	cfg.DataDir = ""
	cfg.APIAddr = ""
	cfg.Listen = nil
	cfg.InMemory = true
	cfg.NoSync = true
	cfg.Network = o.Network
	cfg.Light = light
	cfg.Logger = o.Logger.With("node", i)
	if o.MLS != "" {
		cfg.Policy.MLS = o.MLS
	}
	if light {
		cfg.Shards = protocol.NoShards(o.ShardCount)
	} else {
		list := make([]string, len(shards))
		for k, s := range shards {
			list[k] = strconv.Itoa(s)
		}
		if cfg.Shards, err = protocol.ParseShardSet(strings.Join(list, ","), o.ShardCount); err != nil {
			return nil, err
		}
	}
	if o.NodeConfig != nil {
		o.NodeConfig(i, &cfg)
	}
	theirs := cfg.OnBundleStored
	cfg.OnBundleStored = func(device protocol.Key, ref protocol.Ref) {
		nw.events.add(i, KindBundleStored, device.String())
		if theirs != nil {
			theirs(device, ref)
		}
	}

	n := &Node{Index: i, Light: cfg.Light, sk: sk, cfg: cfg}
	nw.ends++
	if err := nw.build(n); err != nil {
		return nil, err
	}
	return n, nil
}

// build makes n's host (on endpoint n.Index, with n.sk) and node (from
// n.cfg), not started.
func (nw *Network) build(n *Node) error {
	cfg := n.cfg
	gater := node.NewGater()
	hostOpts, err := node.HostOptions(cfg, gater)
	if err != nil {
		return err
	}
	h, conn, err := nw.newHost(n.Index, n.sk, hostOpts...)
	if err != nil {
		return err
	}
	cfg.Host = h
	cfg.Gater = gater
	nn, err := node.New(cfg)
	if err != nil {
		h.Close()
		return err
	}
	n.Node, n.Host, n.conn = nn, h, conn
	n.Addr = peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}
	return nil
}

// newHost builds a libp2p host with identity sk on endpoint end of the
// simulated network: QUIC only, on its own public IPv4 address.
func (nw *Network) newHost(end int, sk crypto.PrivKey, opts ...libp2p.Option) (host.Host, *linkConn, error) {
	ip := msim.IntToPublicIPv4(end).To4()
	nw.groupMu.Lock()
	nw.ipNode[[4]byte(ip)] = end
	nw.groupMu.Unlock()
	var conn *linkConn
	h, err := libp2p.New(append(opts,
		libp2p.Identity(sk),
		libp2p.ListenAddrStrings(fmt.Sprintf("/ip4/%s/udp/8000/quic-v1", ip)),
		libp2p.NoTransports,
		libp2p.Transport(libp2pquic.NewTransport),
		nw.quicReuse(end, &conn),
		// Identify's address discovery and the metrics are off, as in
		// go-libp2p's own simulations: the first stalls synctest, the
		// second registers on a process-global registry.
		libp2p.DisableIdentifyAddressDiscovery(),
		libp2p.DisableMetrics(),
		libp2p.DisableRelay(),
	)...)
	if err != nil {
		return nil, nil, err
	}
	return h, conn, nil
}

// NewHost returns a bare libp2p host (no kpnode: a raw peer for a test to
// drive, say a hostile one) on the simulated network, with the next seeded
// identity and endpoint index len(Nodes)+k for the k-th host (Partition
// takes these indexes too). Add options (libp2p.Option) as for
// libp2p.New; transports, identity and listen address are the harness's.
// The Network closes it.
func (nw *Network) NewHost(opts ...libp2p.Option) (host.Host, error) {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	if nw.closed {
		return nil, errors.New("simnet: closed")
	}
	sk, _, err := crypto.GenerateEd25519Key(nw.ids)
	if err != nil {
		return nil, err
	}
	end := nw.ends
	nw.ends++
	h, _, err := nw.newHost(end, sk, opts...)
	if err != nil {
		return nil, fmt.Errorf("simnet: host: %w", err)
	}
	nw.hosts = append(nw.hosts, h)
	return h, nil
}

// quicReuse is go-libp2p's x/simlibp2p QUICSimnet with the endpoint's UDP
// socket wrapped in a linkConn (loss, partitions, traffic counts), which it
// stores in *conn.
func (nw *Network) quicReuse(end int, conn **linkConn) libp2p.Option {
	link := msim.NodeBiDiLinkSettings{
		Downlink: msim.LinkSettings{BitsPerSecond: nw.opts.Bandwidth},
		Uplink:   msim.LinkSettings{BitsPerSecond: nw.opts.Bandwidth},
	}
	sel := &sourceIP{}
	opts := []quicreuse.Option{
		quicreuse.OverrideSourceIPSelector(func() (quicreuse.SourceIPSelector, error) { return sel, nil }),
		quicreuse.OverrideListenUDP(func(_ string, address *net.UDPAddr) (net.PacketConn, error) {
			sel.set(address.IP)
			c := &linkConn{SimConn: nw.sim.NewEndpoint(address, link), nw: nw, self: end,
				rng: rand.New(rand.NewPCG(uint64(nw.opts.Seed), uint64(end)))}
			*conn = c
			return c, nil
		}),
	}
	return libp2p.QUICReuse(func(l fx.Lifecycle, statelessResetKey quic.StatelessResetKey, tokenKey quic.TokenGeneratorKey, opts ...quicreuse.Option) (*quicreuse.ConnManager, error) {
		cm, err := quicreuse.NewConnManager(statelessResetKey, tokenKey, opts...)
		if err != nil {
			return nil, err
		}
		// A conn manager passed in is not closed by the host (as in
		// simlibp2p).
		l.Append(fx.StopHook(cm.Close))
		return cm, nil
	}, opts...)
}

type sourceIP struct {
	mu sync.Mutex
	ip net.IP
}

func (s *sourceIP) set(ip net.IP) { s.mu.Lock(); s.ip = ip; s.mu.Unlock() }

func (s *sourceIP) PreferredSourceIPForDestination(*net.UDPAddr) (net.IP, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ip, nil
}

// linkConn is a node's simulated UDP socket: it drops what Loss and the
// current partition say and counts what it sends.
type linkConn struct {
	*msim.SimConn
	nw   *Network
	self int

	mu      sync.Mutex
	rng     *rand.Rand
	dropped int64
}

func (c *linkConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	if c.drop(addr) {
		c.mu.Lock()
		c.dropped++
		c.mu.Unlock()
		return len(p), nil
	}
	return c.SimConn.WriteTo(p, addr)
}

func (c *linkConn) drop(addr net.Addr) bool {
	if to, ok := c.nw.nodeOf(addr); ok && !c.nw.reachable(c.self, to) {
		return true
	}
	if c.nw.opts.Loss == 0 {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rng.Float64() < c.nw.opts.Loss
}

func (nw *Network) nodeOf(addr net.Addr) (int, bool) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, false
	}
	ip := ua.IP.To4()
	if ip == nil {
		return 0, false
	}
	nw.groupMu.RLock()
	defer nw.groupMu.RUnlock()
	i, ok := nw.ipNode[[4]byte(ip)]
	return i, ok
}

func (nw *Network) reachable(a, b int) bool {
	nw.groupMu.RLock()
	defer nw.groupMu.RUnlock()
	return nw.group == nil || nw.groupOf(a) == nw.groupOf(b)
}

// groupOf is a's partition group; endpoints listed in no group share -1.
func (nw *Network) groupOf(a int) int {
	if g, ok := nw.group[a]; ok {
		return g
	}
	return -1
}

// Start starts the simulated links and every node, then dials the seeded
// topology (each node its Degree peers). It returns once every dial has
// finished, not when gossip meshes and DHT tables have formed: use
// WaitReady.
func (nw *Network) Start(ctx context.Context) error {
	nw.mu.Lock()
	if nw.started || nw.closed {
		nw.mu.Unlock()
		return errors.New("simnet: already started or closed")
	}
	nw.started = true
	nw.mu.Unlock()
	nw.sim.Start()
	for _, n := range nw.Nodes {
		if err := n.Start(ctx); err != nil {
			return fmt.Errorf("simnet: start node %d: %w", n.Index, err)
		}
	}
	return nw.dial(ctx, nw.edges)
}

// dial connects the edges' ends, 64 at a time; a failed dial is logged,
// not fatal (loss or a partition may refuse it).
func (nw *Network) dial(ctx context.Context, edges [][2]int) error {
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(64)
	for _, e := range edges {
		a, b := nw.Nodes[e[0]], nw.Nodes[e[1]]
		g.Go(func() error {
			dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if err := a.Host.Connect(dctx, b.Addr); err != nil {
				nw.opts.Logger.Debug("simnet dial failed", "from", a.Index, "to", b.Index, "err", err)
			}
			return nil
		})
	}
	return g.Wait()
}

// Connect dials node b from node a.
func (nw *Network) Connect(ctx context.Context, a, b int) error {
	return nw.Nodes[a].Host.Connect(ctx, nw.Nodes[b].Addr)
}

// Stop closes node i and its host, as a machine that goes away: its peers
// see its connections end. Restart brings it back.
func (nw *Network) Stop(i int) error {
	n := nw.Nodes[i]
	if n.stopped {
		return nil
	}
	n.stopped = true
	return errors.Join(n.Close(), n.Host.Close())
}

// Restart brings node i back after Stop: the same identity and address, a
// new host, and a new node.Node from its config adjusted by configure (may
// be nil; the change is kept for later restarts). An in-memory store comes
// back empty; a node whose NodeConfig turned InMemory off and gave it a
// DataDir keeps its store. It dials no one: set Bootstrap in configure or
// call Connect. Traffic counts start again from zero.
func (nw *Network) Restart(ctx context.Context, i int, configure func(*node.Config)) error {
	n := nw.Nodes[i]
	if err := nw.Stop(i); err != nil {
		return fmt.Errorf("simnet: stop node %d: %w", i, err)
	}
	if configure != nil {
		configure(&n.cfg)
	}
	if err := nw.build(n); err != nil {
		return fmt.Errorf("simnet: restart node %d: %w", i, err)
	}
	n.stopped = false
	if err := n.Start(ctx); err != nil {
		return fmt.Errorf("simnet: restart node %d: %w", i, err)
	}
	return nil
}

// Partition splits the network: packets between nodes (or NewHost's hosts,
// by their endpoint index) of different groups are dropped, both ways, so
// their connections time out as on a real network. Nodes listed in no
// group form one more group together. Partition replaces any partition in
// place.
func (nw *Network) Partition(groups ...[]int) {
	g := map[int]int{}
	for k, members := range groups {
		for _, i := range members {
			g[i] = k
		}
	}
	nw.groupMu.Lock()
	nw.group = g
	nw.groupMu.Unlock()
}

// Heal removes the partition and dials the seeded topology's links again
// (connections that timed out during the partition are not redialled by
// the nodes themselves while they have other peers). It returns when the
// dials have finished.
func (nw *Network) Heal(ctx context.Context) error {
	nw.groupMu.Lock()
	nw.group = nil
	nw.groupMu.Unlock()
	return nw.dial(ctx, nw.edges)
}

// Traffic returns what node i's link has carried so far.
func (nw *Network) Traffic(i int) Traffic {
	c := nw.Nodes[i].conn
	if c == nil {
		return Traffic{}
	}
	st := c.Stats()
	c.mu.Lock()
	dropped := c.dropped
	c.mu.Unlock()
	return Traffic{BytesSent: int64(st.BytesSent), BytesRcvd: int64(st.BytesRcvd),
		PacketsSent: int64(st.PacketsSent), PacketsRcvd: int64(st.PacketsRcvd), PacketsDropped: dropped}
}

// Ready reports whether node i can take part: a peer in the gossip topics
// of every shard some other node holds, a non-empty DHT routing table and,
// for a full node, its shards announced in the DHT.
func (nw *Network) Ready(i int) bool {
	n := nw.Nodes[i]
	if n.DHTPeers() == 0 || !n.Provided() {
		return false
	}
	for j, m := range nw.Nodes {
		if j == i {
			continue
		}
		for _, s := range m.Shards().List() {
			if n.TopicPeers(s) == 0 {
				return false
			}
		}
	}
	return true
}

// WaitReady polls (every 100 ms of network time) until every node is
// Ready or ctx ends. A network of one node is ready at once.
func (nw *Network) WaitReady(ctx context.Context) error {
	if len(nw.Nodes) < 2 {
		return nil
	}
	return nw.WaitFor(ctx, func() bool {
		for i := range nw.Nodes {
			if !nw.Ready(i) {
				return false
			}
		}
		return true
	})
}

// WaitFor polls cond every 100 ms of network time until it holds or ctx
// ends (in a synctest bubble, waiting costs no wall time).
func (nw *Network) WaitFor(ctx context.Context, cond func() bool) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("simnet: %w", ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// NewBundle returns a valid bundle (a real MLS KeyPackage signed by a
// device key drawn from the network's seeded generator) whose device is in
// shard, stamped with the current (virtual) time. shard < 0: any shard.
// Successive calls give the same device keys for the same seed; the
// KeyPackage's own keys are random.
func (nw *Network) NewBundle(shard int) (protocol.Bundle, error) {
	nw.rngMu.Lock()
	var dev ed25519.PrivateKey
	for {
		var seed [ed25519.SeedSize]byte
		for k := 0; k < len(seed); k += 8 {
			binary.LittleEndian.PutUint64(seed[k:], nw.rng.Uint64())
		}
		dev = ed25519.NewKeyFromSeed(seed[:])
		var k protocol.Key
		copy(k[:], dev.Public().(ed25519.PublicKey))
		if shard < 0 || protocol.Shard(k, nw.opts.ShardCount) == shard {
			break
		}
	}
	nw.rngMu.Unlock()
	kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: dev, LastResort: true})
	if err != nil {
		return protocol.Bundle{}, fmt.Errorf("simnet: key package: %w", err)
	}
	return protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp), nil
}

// Holders returns the indexes of the nodes whose store holds a bundle of
// device (light nodes' caches are not stores and never count).
func (nw *Network) Holders(ctx context.Context, device protocol.Key) []int {
	var out []int
	for i, n := range nw.Nodes {
		if n.Light {
			continue
		}
		if got, err := n.Bundles(ctx, device); err == nil && len(got) > 0 {
			out = append(out, i)
		}
	}
	return out
}

// HoldersOfShard returns the full nodes that hold shard.
func (nw *Network) HoldersOfShard(shard int) []int {
	var out []int
	for i, n := range nw.Nodes {
		if !n.Light && n.Shards().Has(shard) {
			out = append(out, i)
		}
	}
	return out
}

// Metric returns the value of one series of node i's /metrics, as
// written there (say `kpnode_sync_bytes_total{direction="in"}`), or 0 when
// absent.
func (nw *Network) Metric(i int, series string) float64 {
	rec := httptest.NewRecorder()
	nw.Nodes[i].Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for line := range strings.Lines(rec.Body.String()) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// Close stops every node, closes their hosts and the simulated links. All
// their goroutines have returned when it returns (as synctest requires).
func (nw *Network) Close() error {
	nw.mu.Lock()
	if nw.closed {
		nw.mu.Unlock()
		return nil
	}
	nw.closed = true
	nw.mu.Unlock()
	var errs []error
	for i := len(nw.Nodes) - 1; i >= 0; i-- {
		if err := nw.Stop(i); err != nil {
			errs = append(errs, fmt.Errorf("node %d: %w", i, err))
		}
	}
	for i, h := range nw.hosts {
		if err := h.Close(); err != nil {
			errs = append(errs, fmt.Errorf("extra host %d: %w", i, err))
		}
	}
	nw.sim.Close()
	return errors.Join(errs...)
}
