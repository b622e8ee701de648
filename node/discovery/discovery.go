// Package discovery runs kpnode's private Kademlia DHT (protocol/README.md,
// "DHT"): server mode on full nodes, which announce a provider record
// for every shard they hold and re-provide them periodically, client mode
// on light nodes, which only query. Holders finds the peers that provide a
// shard (the lookup's HolderFinder). It depends on a libp2p host only.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	mh "github.com/multiformats/go-multihash"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/node/internal/pause"
	"github.com/kpnode/kpnode/protocol"
)

// Defaults of Config. Provider records live 48 h on the peers that store
// them and the DHT does not refresh them itself. kpnode re-provides every
// shard it holds hourly: eight records per node is cheap, and an hour
// bounds how long a network that grew or churned can miss a holder.
const (
	DefaultReprovideInterval = time.Hour
	DefaultProvideTimeout    = 30 * time.Second
)

// Retry backoff of a failed provide round (or one attempted before the
// routing table has a peer): doubling from firstBackoff up to maxBackoff.
const (
	firstBackoff = 100 * time.Millisecond
	maxBackoff   = 30 * time.Second
)

// Errors.
var (
	// ErrNotStarted: the DHT runs from Start on.
	ErrNotStarted = errors.New("discovery: not started")
	// ErrClosed: Start after Close.
	ErrClosed = errors.New("discovery: closed")
)

// ShardCID names a shard in the DHT: CIDv1 raw of
// sha2-256(protocol.ShardProviderKey(network, shard)).
func ShardCID(network string, shard int) cid.Cid {
	sum, err := mh.Sum(protocol.ShardProviderKey(network, shard), mh.SHA2_256, -1)
	if err != nil {
		panic(err) // sha2-256 is always available
	}
	return cid.NewCidV1(cid.Raw, sum)
}

// Config configures a Service. Zero durations take the defaults.
type Config struct {
	// NetworkID is the network name with the constants' tag
	// (protocol.Constants.NetworkID); it names the DHT protocol and keys.
	NetworkID string
	// Shards are the shards this node holds and provides.
	Shards protocol.ShardSet
	// Light runs the DHT in client mode; a light node holds no shard.
	Light bool
	// ReprovideInterval is how often every held shard is provided again
	// after a round that succeeded.
	ReprovideInterval time.Duration
	// ProvideTimeout bounds the provide of one shard.
	ProvideTimeout time.Duration
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Registerer gets kpnode_dht_provides_total. Default: a private registry.
	Registerer prometheus.Registerer
}

func (c *Config) setDefaults() {
	if c.ReprovideInterval == 0 {
		c.ReprovideInterval = DefaultReprovideInterval
	}
	if c.ProvideTimeout == 0 {
		c.ProvideTimeout = DefaultProvideTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
}

// Validate reports whether c is usable (after defaults).
func (c Config) Validate() error {
	switch {
	case c.NetworkID == "":
		return errors.New("discovery: network ID is required")
	case c.Shards.Count() < 1 || c.Shards.Count() > 256:
		return fmt.Errorf("discovery: %w", protocol.ErrShardCount)
	case c.Light && !c.Shards.Empty():
		return errors.New("discovery: a light node holds no shards")
	case c.ReprovideInterval < 0 || c.ProvideTimeout < 0:
		return errors.New("discovery: reprovide interval and provide timeout must be positive")
	}
	return nil
}

// Service owns the DHT and the provide loop. Build it with New; Start
// creates the DHT and starts providing; Close stops both.
type Service struct {
	cfg      Config
	host     host.Host
	log      *slog.Logger
	provides prometheus.Counter

	// kad is the DHT, set by Start.
	kad atomic.Pointer[dht.IpfsDHT]
	// provided is set once every held shard has been provided.
	provided atomic.Bool

	mu      sync.Mutex // guards started, closed, cancel and wg.Add
	started bool
	closed  bool
	cancel  context.CancelFunc
	wg      sync.WaitGroup // the provide loop
}

// New builds the discovery service of h and registers its metric; Start
// brings the DHT up.
func New(cfg Config, h host.Host) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if h == nil {
		return nil, errors.New("discovery: a host is required")
	}
	provides := prometheus.NewCounter(prometheus.CounterOpts{Name: "kpnode_dht_provides_total", Help: "Shard provider records announced."})
	if err := cfg.Registerer.Register(provides); err != nil {
		return nil, fmt.Errorf("discovery: metrics: %w", err)
	}
	return &Service{cfg: cfg, host: h, log: cfg.Logger, provides: provides}, nil
}

// Start creates the DHT (server mode on a full node, client mode on a
// light one) and, on a node that holds shards, runs the provide loop under
// a context derived from ctx until Close.
func (s *Service) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return ErrClosed
	case s.started:
		return errors.New("discovery: already started")
	}
	mode := dht.ModeServer
	if s.cfg.Light {
		mode = dht.ModeClient
	}
	d, err := dht.New(s.host,
		dht.Mode(mode),
		dht.ProtocolPrefix(p2pprotocol.ID(protocol.DHTPrefix(s.cfg.NetworkID))),
	)
	if err != nil {
		return fmt.Errorf("discovery: dht: %w", err)
	}
	s.started = true
	s.kad.Store(d)
	shards := s.cfg.Shards.List()
	if s.cfg.Light || len(shards) == 0 {
		return nil
	}
	ctx, s.cancel = context.WithCancel(ctx)
	s.wg.Add(1)
	go s.provideLoop(ctx, d, shards)
	return nil
}

// Close stops the provide loop, waits for it and closes the DHT. It is
// safe to call more than once, and before Start.
func (s *Service) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
	if d := s.kad.Load(); d != nil {
		if err := d.Close(); err != nil {
			return fmt.Errorf("discovery: dht close: %w", err)
		}
	}
	return nil
}

// provideLoop announces every held shard as soon as the routing table has
// peers, retries failures with backoff, and re-provides periodically.
func (s *Service) provideLoop(ctx context.Context, d *dht.IpfsDHT, shards []int) {
	defer s.wg.Done()
	backoff := firstBackoff
	for {
		ok := d.RoutingTable().Size() > 0 && s.provideAll(ctx, d, shards)
		wait := s.cfg.ReprovideInterval
		if !ok {
			wait = backoff
			backoff = min(2*backoff, maxBackoff)
		} else {
			s.provided.Store(true)
			backoff = firstBackoff
		}
		if !pause.For(ctx, wait) {
			return
		}
	}
}

func (s *Service) provideAll(ctx context.Context, d *dht.IpfsDHT, shards []int) bool {
	all := true
	for _, sh := range shards {
		pctx, cancel := context.WithTimeout(ctx, s.cfg.ProvideTimeout)
		err := d.Provide(pctx, ShardCID(s.cfg.NetworkID, sh), true)
		cancel()
		if err != nil {
			s.log.Debug("provide failed", "shard", sh, "err", err)
			all = false
			continue
		}
		s.provides.Inc()
	}
	if all {
		s.log.Debug("provided shards", "shards", shards)
	}
	return all
}

// Holders streams the peers that provide a shard (lookup.HolderFinder);
// the channel closes when the DHT query ends or ctx does. Before Start it
// is closed at once.
func (s *Service) Holders(ctx context.Context, shard int) <-chan peer.AddrInfo {
	d := s.kad.Load()
	if d == nil {
		ch := make(chan peer.AddrInfo)
		close(ch)
		return ch
	}
	return d.FindProvidersAsync(ctx, ShardCID(s.cfg.NetworkID, shard), 0)
}

// Provided reports whether every held shard has been provided at least
// once (always true for a node that holds none).
func (s *Service) Provided() bool {
	return s.cfg.Light || s.cfg.Shards.Empty() || s.provided.Load()
}

// RoutingTableSize returns the number of peers in the DHT's routing table
// (0 before Start).
func (s *Service) RoutingTableSize() int {
	if d := s.kad.Load(); d != nil {
		return d.RoutingTable().Size()
	}
	return 0
}

// Bootstrap refreshes the routing table (after the node has dialled its
// bootstrap peers).
func (s *Service) Bootstrap(ctx context.Context) error {
	d := s.kad.Load()
	if d == nil {
		return ErrNotStarted
	}
	return d.Bootstrap(ctx)
}

// Bounds of ConnectHolders: providers examined per call, and the time one
// dial may take.
const (
	maxHoldersExamined = 32
	holderDialTimeout  = 5 * time.Second
	// connectHoldersTimeout bounds one ConnectHolders call, DHT query
	// and dials together.
	connectHoldersTimeout = 30 * time.Second
	// holderTag marks, in the connection manager, a peer dialled as a
	// holder of a held shard.
	holderTag      = "kpnode-shard-holder"
	holderTagValue = 20
)

// ConnectHolders dials up to want holders of shard (found through the
// DHT's provider records) that the host is not connected to yet, and
// returns how many it connected. A node calls it when it has too few peers
// in a shard's topics: in a network larger than a node's connections, the
// holders of a shard are otherwise never neighbours, and gossip and sync
// run only between connected peers. It examines at most 32 providers,
// dials one at a time, each for at most 5 s, and takes at most 30 s.
func (s *Service) ConnectHolders(ctx context.Context, shard, want int) int {
	d := s.kad.Load()
	if d == nil || want <= 0 {
		return 0
	}
	ctx, cancel := context.WithTimeout(ctx, connectHoldersTimeout)
	defer cancel()
	self := s.host.ID()
	connected := 0
	for ai := range d.FindProvidersAsync(ctx, ShardCID(s.cfg.NetworkID, shard), maxHoldersExamined) {
		if ai.ID == self || s.host.Network().Connectedness(ai.ID) == network.Connected {
			continue
		}
		dctx, stop := context.WithTimeout(ctx, holderDialTimeout)
		err := s.host.Connect(dctx, ai)
		stop()
		if err != nil {
			s.log.Debug("dht: dial holder", "shard", shard, "peer", ai.ID, "err", err)
			continue
		}
		// Keep it through the connection manager's trims: a holder of a
		// held shard is worth more than a peer met by chance.
		s.host.ConnManager().TagPeer(ai.ID, holderTag, holderTagValue)
		connected++
		if connected == want {
			break
		}
	}
	return connected
}
