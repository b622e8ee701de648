// Package node wires kpnode together: the validation policy of protocol,
// the Badger store of storage and the local HTTP API. It is the one place
// that decides what happens to a bundle from the moment it arrives to the
// moment it is stored and served.
package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/kpnode/kpnode/node/claim"
	"github.com/kpnode/kpnode/node/discovery"
	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/gossip"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/lookup"
	kpsync "github.com/kpnode/kpnode/node/sync"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Config configures a Node. Start from DefaultConfig.
type Config struct {
	// DataDir holds the store and the node's state. Created 0700 if missing.
	// Not used (and may be empty) with both Host and InMemory set.
	DataDir string
	// APIAddr is the local HTTP API's listen address (host:port). Port 0
	// picks a free port; Node.APIAddr tells which. Empty: no HTTP listener
	// (Handler still serves the API, for embedding and simulations).
	APIAddr string
	// Host, if set, is the libp2p host the node uses instead of building
	// one from Listen and the identity in DataDir (simulations, embedding).
	// The caller built it and owns it: the node never closes it, and Close
	// leaves it open. Listen is then ignored. Build it with HostOptions so
	// it carries the node's connection and resource limits; give the same
	// Gater as Config.Gater so that bans refuse connections. One host serves
	// one node: after Close it still carries the DHT's and gossipsub's
	// stream handlers (neither removes them), so close it rather than hand
	// it to another node.
	Host host.Host
	// Gater, with Host, is the connection gater the host was built with
	// (HostOptions adds it). The node enforces its bans through it. Nil: an
	// injected host has no ban gater, and bans rely on closing the peer's
	// connections and its gossipsub score alone.
	Gater *Gater
	// InMemory keeps the store in memory (storage.Options.InMemory):
	// nothing is written under DataDir's store and everything is lost on
	// Close. For simulations and tests where Badger is not under test.
	InMemory bool
	// Network names the registry network; it is part of every topic and
	// protocol ID, so nodes of two networks never mix.
	Network string
	// Listen are the libp2p listen multiaddrs.
	Listen []string
	// Bootstrap are multiaddrs (with /p2p/) of peers to dial on start.
	Bootstrap []string
	// Shards are the shards this node holds (subscribes to, stores,
	// provides in the DHT). A light node holds none.
	Shards protocol.ShardSet
	// Light runs a light node: no shards, DHT client mode, fetched records
	// cached in memory.
	Light bool
	// LookupTimeout bounds a network lookup for a key of a shard the node
	// does not hold.
	LookupTimeout time.Duration
	// LookupGrace is how long a lookup keeps collecting holders' answers
	// after the first acceptable one, so that one fast (hostile or lagging)
	// holder cannot roll a record back.
	LookupGrace time.Duration
	// CacheSize and CacheTTL bound the cache of fetched records; a hit older
	// than CacheRefresh is refreshed in the background; NegativeTTL is how
	// long a miss is remembered.
	CacheSize    int
	CacheTTL     time.Duration
	CacheRefresh time.Duration
	NegativeTTL  time.Duration
	// SyncInterval is how often each held shard is reconciled with a peer.
	SyncInterval time.Duration
	// StreamTimeout bounds how long a peer may take to send a fetch or sync
	// request and read the answer.
	StreamTimeout time.Duration
	// MaxPerDevice caps the bundles kept per device.
	MaxPerDevice int
	// MaxStoreBytes bounds the records the store holds (storage.Options.MaxBytes:
	// payloads plus a fixed overhead per record); beyond it the oldest
	// bundles are evicted in the documented order, else writes fail with
	// storage.ErrStoreFull. Negative: no budget.
	MaxStoreBytes int64
	// MinFreeDisk is the free space on the data dir's filesystem below which
	// the store refuses writes (storage.ErrStoreFull) instead of letting
	// Badger run out of disk. Negative: no check.
	MinFreeDisk int64
	// OutboxMax caps the publications (of shards the node does not hold)
	// waiting on disk for a holder; when full, a POST is refused with 503
	// rather than acknowledged.
	OutboxMax int
	// Policy is the validation policy (retention, clock skew, MLS mode).
	Policy protocol.Policy
	// ClaimRequesterRate and ClaimRequesterBurst limit the claims of one
	// requester (API client address, fetch peer), ClaimDeviceRate and
	// ClaimDeviceBurst those of one target device: token buckets, claims
	// per second and burst. Zero: the defaults (20/s, burst 40). The device
	// limit may not exceed what peers accept of one node's claim notices of
	// a device on gossip (20/s, burst 60).
	ClaimRequesterRate, ClaimDeviceRate   float64
	ClaimRequesterBurst, ClaimDeviceBurst int
	// PruneInterval is how often expired records are pruned.
	PruneInterval time.Duration
	// NoSync turns off fsync per acknowledged write (tests and benchmarks only).
	NoSync bool
	// Version is reported by /v1/status.
	Version string
	// Logger is the node's logger. Default slog.Default().
	Logger *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time

	// OnBundleStored, if set, is called after a bundle is newly stored (or
	// refreshed) from any source. It must return quickly (benchmarks, tests).
	OnBundleStored func(device protocol.Key, ref protocol.Ref)

	// PeerScoreInspect, if set, receives every gossipsub peer score ten times a
	// second (diagnostics and tests).
	PeerScoreInspect func(map[peer.ID]float64)
}

// Defaults of Config.
const (
	DefaultDataDir = "./kpnode-data"
	DefaultAPIAddr = "127.0.0.1:8080"
)

// DefaultConfig returns the defaults the CLI starts from.
func DefaultConfig() Config {
	return Config{
		DataDir:       DefaultDataDir,
		APIAddr:       DefaultAPIAddr,
		Network:       protocol.DefaultNetwork,
		Listen:        DefaultListen(4001),
		Shards:        protocol.AllShards(protocol.DefaultShardCount),
		LookupTimeout: DefaultLookupTimeout,
		LookupGrace:   DefaultLookupGrace,
		CacheSize:     DefaultCacheSize,
		CacheTTL:      DefaultCacheTTL,
		CacheRefresh:  DefaultCacheRefresh,
		NegativeTTL:   DefaultNegativeTTL,
		StreamTimeout: DefaultStreamTimeout,
		SyncInterval:  DefaultSyncInterval,
		MaxPerDevice:  storage.DefaultMaxPerDevice,
		OutboxMax:     DefaultOutboxMax,
		MaxStoreBytes: storage.DefaultMaxBytes,
		MinFreeDisk:   storage.DefaultMinFreeDisk,
		Policy:        protocol.DefaultPolicy(),
		PruneInterval: storage.DefaultPruneInterval,
		Version:       "dev",

		ClaimRequesterRate:  DefaultClaimRequesterRate,
		ClaimRequesterBurst: DefaultClaimRequesterBurst,
		ClaimDeviceRate:     DefaultClaimDeviceRate,
		ClaimDeviceBurst:    DefaultClaimDeviceBurst,
	}
}

// DefaultListen returns TCP and QUIC on all IPv4 and IPv6 interfaces on
// port, as other libp2p nodes listen.
func DefaultListen(port int) []string {
	return []string{
		fmt.Sprintf("/ip4/0.0.0.0/tcp/%d", port),
		fmt.Sprintf("/ip4/0.0.0.0/udp/%d/quic-v1", port),
		fmt.Sprintf("/ip6/::/tcp/%d", port),
		fmt.Sprintf("/ip6/::/udp/%d/quic-v1", port),
	}
}

// Constants returns the network constants this configuration implies: the
// shard count and the validation settings a Reject depends on. Nodes
// interoperate only when these and the network name are equal.
func (c Config) Constants() protocol.Constants {
	return protocol.Constants{ShardCount: c.Shards.Count(), MLS: c.Policy.MLS, MaxKeyPackageLifetime: c.Policy.MaxKeyPackageLifetime}
}

// Validate reports whether c is usable.
func (c Config) Validate() error {
	if c.DataDir == "" && (c.Host == nil || !c.InMemory) {
		return errors.New("data dir is required (unless both Host and InMemory are set)")
	}
	if err := protocol.ValidateNetworkName(c.Network); err != nil {
		return err
	}
	if len(c.Listen) == 0 && c.Host == nil {
		return errors.New("at least one listen address is required")
	}
	for _, a := range c.Listen {
		if _, err := ma.NewMultiaddr(a); err != nil {
			return fmt.Errorf("listen address %q: %w", a, err)
		}
	}
	for _, a := range c.Bootstrap {
		if _, err := peer.AddrInfoFromString(a); err != nil {
			return fmt.Errorf("bootstrap address %q (want a multiaddr ending in /p2p/<peer id>): %w", a, err)
		}
	}
	if c.Shards.Count() < 1 || c.Shards.Count() > 256 {
		return protocol.ErrShardCount
	}
	if c.Light && !c.Shards.Empty() {
		return errors.New("a light node holds no shards")
	}
	if !c.Light && c.Shards.Empty() {
		return errors.New("a full node must hold at least one shard (or run with --light)")
	}
	if c.StreamTimeout <= 0 || c.SyncInterval < time.Second {
		return errors.New("stream timeout must be positive and sync interval at least 1s")
	}
	if c.LookupGrace <= 0 || c.LookupGrace > c.LookupTimeout {
		return fmt.Errorf("lookup grace must be positive and at most the lookup timeout, got %v", c.LookupGrace)
	}
	if c.LookupTimeout <= 0 || c.CacheTTL <= 0 || c.CacheRefresh <= 0 || c.NegativeTTL <= 0 || c.CacheSize < 1 {
		return errors.New("lookup timeout, cache size and cache TTLs must be positive")
	}
	if c.APIAddr != "" {
		if _, _, err := net.SplitHostPort(c.APIAddr); err != nil {
			return fmt.Errorf("api address %q: %w", c.APIAddr, err)
		}
	}
	if c.OutboxMax < 1 {
		return fmt.Errorf("outbox max must be at least 1, got %d", c.OutboxMax)
	}
	if c.MaxPerDevice < 1 {
		return fmt.Errorf("max per device must be at least 1, got %d", c.MaxPerDevice)
	}
	if c.PruneInterval <= 0 {
		return fmt.Errorf("prune interval must be positive, got %v", c.PruneInterval)
	}
	if c.ClaimRequesterRate < 0 || c.ClaimDeviceRate < 0 || c.ClaimRequesterBurst < 0 || c.ClaimDeviceBurst < 0 {
		return fmt.Errorf("claim limits must not be negative (requester %v/s burst %d, device %v/s burst %d)",
			c.ClaimRequesterRate, c.ClaimRequesterBurst, c.ClaimDeviceRate, c.ClaimDeviceBurst)
	}
	// Peers accept a node's claim notices of one device at most at the
	// network's rate (claimOriginDeviceRate): a node allowed to claim
	// faster would see its notices Ignored, and be Rejected far over.
	if c.ClaimDeviceRate > claimOriginDeviceRate || c.ClaimDeviceBurst > claimOriginDeviceBurst {
		return fmt.Errorf("the per-device claim limit (%v/s, burst %d) must stay within what peers accept of one node's claim notices of a device (%d/s, burst %d)",
			c.ClaimDeviceRate, c.ClaimDeviceBurst, claimOriginDeviceRate, claimOriginDeviceBurst)
	}
	if err := c.Policy.Validate(); err != nil {
		return err
	}
	return c.Constants().Validate()
}

// Node is a running kpnode.
type Node struct {
	cfg      Config
	log      *slog.Logger
	store    *storage.Store
	registry *prometheus.Registry
	metrics  *metrics
	api      http.Handler
	identity crypto.PrivKey
	// netID is the network name with the network constants' tag
	// (protocol.Constants.NetworkID), embedded in every topic, protocol ID
	// and DHT key.
	netID string
	guard *peerGuard
	// outboxDone counts finished outbox entries by result.
	outboxDone *prometheus.CounterVec

	// Set by Start, read-only afterwards.
	host        host.Host
	gossip      *gossip.Service
	watch       *mismatchWatch
	fetchServer *fetch.Server
	fetchClient *fetch.Client
	sync        *kpsync.Service
	dht         *discovery.Service
	lookup      *lookup.Lookup
	// claims is the claim service (nil until Start wires it, and when the
	// host has no Ed25519 key); the fetch server reads it concurrently.
	claims atomic.Pointer[claim.Service]

	// outbox holds acknowledged publications for shards the node does not
	// hold until a holder has them; outboxWake nudges its worker.
	outbox     *storage.Outbox
	outboxWake chan struct{}
	// peering paces the searches for holders of a shard (peering.go).
	peering shardPeering
	// limits are the notice rate limits on gossip (notices.go).
	limits *noticeLimits

	// runCtx is the node's lifetime: derived by Start from no caller's
	// context, cancelled by Close. Every goroutine the node starts runs
	// under it and is joined by Close (see goTracked).
	runCtx context.Context
	wg     sync.WaitGroup
	goMu   sync.Mutex // guards stopping, runCtx and cancel; held while adding to wg
	// stopping is set by Close before it waits: no goroutine starts after.
	stopping bool
	cancel   context.CancelFunc

	mu       sync.Mutex // guards the fields below
	started  bool
	listener net.Listener
	server   *http.Server
	serveErr chan error
	closed   bool
}

// goTracked runs f(runCtx) in a goroutine that Close waits for. It reports
// false (and runs nothing) before Start and once Close has begun.
func (n *Node) goTracked(f func(ctx context.Context)) bool {
	n.goMu.Lock()
	defer n.goMu.Unlock()
	if n.stopping || n.runCtx == nil {
		return false
	}
	n.wg.Add(1)
	ctx := n.runCtx
	go func() {
		defer n.wg.Done()
		f(ctx)
	}()
	return true
}

// New opens the node's store and builds its API; Start begins serving.
func New(cfg Config) (*Node, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("node: config: %w", err)
	}
	// The data dir holds the network binding, the store and the identity;
	// an injected host brings its identity and an in-memory store needs no
	// directory, so with both the node touches no file.
	if cfg.Host == nil || !cfg.InMemory {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("node: data dir: %w", err)
		}
		if err := checkDataDirNetwork(cfg.DataDir, cfg.Constants().NetworkID(cfg.Network)); err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
	}
	var identity crypto.PrivKey
	if cfg.Host == nil {
		var err error
		if identity, err = LoadOrCreateIdentity(cfg.DataDir); err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
	}
	storeDir := ""
	if !cfg.InMemory {
		storeDir = filepath.Join(cfg.DataDir, "store")
	}
	store, err := storage.Open(storage.Options{
		Dir:           storeDir,
		InMemory:      cfg.InMemory,
		MaxPerDevice:  cfg.MaxPerDevice,
		Retention:     cfg.Policy.Retention,
		PruneInterval: cfg.PruneInterval,
		NoSync:        cfg.NoSync,
		Logger:        cfg.Logger.With("component", "storage"),
		Now:           cfg.Now,
		ShardCount:    cfg.Shards.Count(),
		ClockSkew:     storeClockSkew(cfg.Policy.ClockSkew),
		MaxBytes:      cfg.MaxStoreBytes,
		MinFreeDisk:   cfg.MinFreeDisk,
	})
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	outbox, err := store.OpenOutbox(context.Background(), cfg.OutboxMax, outboxMaxBytes)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("node: %w", err)
	}
	n := &Node{cfg: cfg, log: cfg.Logger, store: store, registry: prometheus.NewRegistry(), identity: identity,
		netID: cfg.Constants().NetworkID(cfg.Network), outbox: outbox, outboxWake: make(chan struct{}, 1),
		limits: newNoticeLimits(defaultNoticeRates, nil)}
	n.guard = newPeerGuard(cfg.Logger.With("component", "peerguard"), n.registry, cfg.Now)
	if cfg.Gater != nil {
		if err := cfg.Gater.bind(n.guard); err != nil {
			store.Close()
			return nil, fmt.Errorf("node: %w", err)
		}
	}
	n.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	n.metrics = newMetrics(n.registry, store)
	n.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kpnode_outbox_pending",
		Help: "Acknowledged publications of shards the node does not hold, waiting for a holder to have them."},
		func() float64 { return float64(outbox.Len()) }))
	n.outboxDone = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_outbox_done_total",
		Help: "Outbox entries finished, by result (confirmed: a holder has the record; dropped: it can no longer be delivered)."}, []string{"result"})
	n.registry.MustRegister(n.outboxDone)
	n.api, err = httpapi.New(httpapi.Config{Backend: apiBackend{n}, Registry: n.registry, Logger: cfg.Logger.With("component", "httpapi")})
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("node: %w", err)
	}
	return n, nil
}

// Handler returns the HTTP API handler (for tests and embedding).
func (n *Node) Handler() http.Handler { return n.api }

// Start listens on the API address and starts background work. It returns
// once the API accepts connections. ctx bounds the start only: the node
// runs under a lifetime context of its own (keeping ctx's values) until
// Close.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return errors.New("node: closed")
	}
	if n.started {
		return errors.New("node: already started")
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("node: start: %w", err)
	}
	life, cancel := context.WithCancel(context.WithoutCancel(ctx))
	n.goMu.Lock()
	n.runCtx, n.cancel = life, cancel
	n.goMu.Unlock()
	fail := func(err error) error {
		n.stopGoroutines()
		n.stopNetwork()
		// The goroutines and services of this attempt are gone for good
		// (stopGoroutines refuses new ones): a failed start is final, and
		// the caller closes the node.
		n.started = true
		return err
	}
	if err := n.startNetwork(life); err != nil {
		return fail(err)
	}
	n.started = true
	if n.cfg.APIAddr == "" {
		n.store.Start(life)
		n.goTracked(n.outboxLoop)
		n.goTracked(n.maintenanceLoop)
		return nil
	}
	ln, err := net.Listen("tcp", n.cfg.APIAddr)
	if err != nil {
		return fail(fmt.Errorf("node: api listen: %w", err))
	}
	n.store.Start(life)
	n.goTracked(n.outboxLoop)
	n.goTracked(n.maintenanceLoop)
	n.listener = ln
	n.server = &http.Server{
		Handler:           n.api,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		BaseContext:       func(net.Listener) context.Context { return life },
		ErrorLog:          slog.NewLogLogger(n.log.Handler(), slog.LevelDebug),
	}
	n.serveErr = make(chan error, 1)
	server := n.server
	n.goTracked(func(context.Context) { n.serveErr <- server.Serve(ln) })
	n.log.Info("http api listening", "addr", ln.Addr().String())
	return nil
}

// APIAddr returns the address the API listens on, or nil before Start
// and when Config.APIAddr is empty.
func (n *Node) APIAddr() net.Addr {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.listener == nil {
		return nil
	}
	return n.listener.Addr()
}

// Close stops serving (letting requests in flight finish for up to 5 s),
// cancels the node's lifetime context, waits for every goroutine the node
// started, leaves the network and closes the store. It is safe to call
// more than once.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	server := n.server
	n.mu.Unlock()

	var errs []error
	if server != nil {
		ctx, stop := context.WithTimeout(context.Background(), 5*time.Second)
		if err := server.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("http shutdown: %w", err))
		}
		stop()
		if err := <-n.serveErr; err != nil && !errors.Is(err, http.ErrServerClosed) {
			errs = append(errs, fmt.Errorf("http serve: %w", err))
		}
	}
	n.stopGoroutines()
	if err := n.stopNetwork(); err != nil {
		errs = append(errs, err)
	}
	if err := n.store.Close(); err != nil {
		errs = append(errs, fmt.Errorf("store close: %w", err))
	}
	return errors.Join(errs...)
}

// stopGoroutines cancels the lifetime context and waits for every tracked
// goroutine.
func (n *Node) stopGoroutines() {
	n.goMu.Lock()
	n.stopping = true
	cancel := n.cancel
	n.goMu.Unlock()
	if cancel != nil {
		cancel()
	}
	n.wg.Wait()
}

// maintenanceLoop prunes void lookup floors every PruneInterval.
func (n *Node) maintenanceLoop(ctx context.Context) {
	t := time.NewTicker(n.cfg.PruneInterval)
	defer t.Stop()
	for {
		if k, err := n.store.PruneFloors(ctx, n.cfg.Now().UnixMilli()); err != nil && ctx.Err() == nil {
			n.log.Warn("prune lookup floors", "err", err)
		} else if k > 0 {
			n.log.Debug("pruned lookup floors", "count", k)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// storeClockSkew converts the policy's clock skew (0: none) to the store's
// option (0: the default, negative: none).
func storeClockSkew(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// networkFile records, in the data dir, the network ID (name and network
// constants) the store was written under.
const networkFile = "network"

// ErrDataDirNetwork: the data dir was written under another network name
// or other network constants.
var ErrDataDirNetwork = errors.New("data dir belongs to another network")

// checkDataDirNetwork binds a data dir to one network ID. Records a store
// accepted under other constants (say --mls-validation=off) would be
// offered to peers that must refuse them, so a node refuses to start on a
// data dir of another network ID, with a message saying what to do. A data
// dir without the file (new, or written by an older version) is bound to
// the current ID.
func checkDataDirNetwork(dir, netID string) error {
	path := filepath.Join(dir, networkFile)
	raw, err := os.ReadFile(path)
	switch {
	case err == nil:
		if got := strings.TrimSpace(string(raw)); got != netID {
			return fmt.Errorf("%w: %s was written by network %q and this node is set up for %q; "+
				"--network and the network constants (shard count, --mls-validation, --max-kp-lifetime) cannot change "+
				"on a data dir: start with the settings it was created with, or use a new --data directory "+
				"(a full node syncs its shards back from its peers)", ErrDataDirNetwork, dir, got, netID)
		}
		return nil
	case errors.Is(err, fs.ErrNotExist):
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(netID+"\n"), 0o600); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
		if err := os.Rename(tmp, path); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
		return nil
	default:
		return fmt.Errorf("read %s: %w", path, err)
	}
}
