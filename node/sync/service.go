package sync

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"slices"
	gosync "sync"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// Host is what the service needs of a libp2p host: it opens streams and
// registers its handler. host.Host satisfies it.
//
// A Host that also follows connections and identify (Network and EventBus,
// as host.Host does) lets the service forget a peer's pacing when its last
// connection closes, and start a session with each peer identify reports
// as speaking sync; without them the service syncs periodically only.
type Host interface {
	ID() peer.ID
	NewStream(ctx context.Context, p peer.ID, pids ...p2pprotocol.ID) (network.Stream, error)
	SetStreamHandler(pid p2pprotocol.ID, handler network.StreamHandler)
	RemoveStreamHandler(pid p2pprotocol.ID)
}

// networkHost and eventHost are the optional parts of a Host.
type (
	networkHost interface{ Network() network.Network }
	eventHost   interface{ EventBus() event.Bus }
)

var _ interface {
	Host
	networkHost
	eventHost
} = host.Host(nil)

// PeerSource names the peers that hold a shard (the node's gossip topic
// peers). The periodic loop picks one of them at random for each held
// shard.
type PeerSource interface {
	ShardPeers(shard int) []peer.ID
}

// PeerSourceFunc adapts a function to PeerSource.
type PeerSourceFunc func(shard int) []peer.ID

// ShardPeers calls f.
func (f PeerSourceFunc) ShardPeers(shard int) []peer.ID { return f(shard) }

// Config configures a Service. Start from DefaultConfig.
type Config struct {
	// Protocol is the sync stream protocol ID (protocol.SyncProtocol of
	// the network ID).
	Protocol p2pprotocol.ID
	// Shards are the shards held, and the network's shard count. A node
	// that holds none answers peers' sessions (not holder) and starts
	// none.
	Shards protocol.ShardSet
	// MLS is the network's MLS mode.
	MLS protocol.MLSMode
	// Interval is how often each held shard is reconciled with a peer
	// (plus up to a fifth of it at random).
	Interval time.Duration
	// RoundTimeout bounds how long a peer may take to send a request or
	// answer one.
	RoundTimeout time.Duration
	// SessionLimit bounds a whole session, both roles.
	SessionLimit time.Duration
	// Retention is how long a refused item is not pulled again (the
	// policy's retention: by then no node offers it).
	Retention time.Duration
	// Now is the clock of the refused items; nil is time.Now.
	Now func() time.Time
	// Logger; nil is slog.Default().
	Logger *slog.Logger
	// Registerer gets the sync metrics; nil registers nothing.
	Registerer prometheus.Registerer
}

// DefaultConfig returns the defaults; Protocol and Shards must be set.
func DefaultConfig() Config {
	return Config{
		MLS:          protocol.MLSStrict,
		Interval:     DefaultInterval,
		RoundTimeout: 30 * time.Second,
		SessionLimit: DefaultSessionLimit,
		Retention:    protocol.DefaultPolicy().Retention,
	}
}

// Validate reports a config the service cannot run with.
func (c Config) Validate() error {
	switch {
	case c.Protocol == "":
		return errors.New("sync: no protocol ID")
	case c.Shards.Count() < 1:
		return errors.New("sync: no shard count")
	case c.Interval < time.Second:
		return fmt.Errorf("sync: interval must be at least 1s, got %v", c.Interval)
	case c.RoundTimeout <= 0 || c.SessionLimit <= 0:
		return errors.New("sync: round timeout and session limit must be positive")
	case c.Retention <= 0:
		return fmt.Errorf("sync: retention must be positive, got %v", c.Retention)
	}
	return nil
}

// Service runs anti-entropy: on connecting to a peer and periodically, each
// shard a node holds is reconciled with a peer that holds it, and the node
// pulls what it lacks. What gossip loses, or a node misses while it is
// offline or partitioned, arrives this way. It answers peers' sessions
// within per-node and per-peer limits.
//
// The service owns its goroutines: they derive from its lifetime context,
// and Close cancels it and waits for them, inbound sessions included.
type Service struct {
	cfg   Config
	h     Host
	peers PeerSource
	local *Local
	log   *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     gosync.WaitGroup
	sub    event.Subscription // identify events; nil without held shards
	notify *network.NotifyBundle

	// shardLocks serialise sessions per shard: a node that reconnects to
	// several peers at once pulls the missing records from the first and
	// finds the others already in agreement, instead of pulling them twice.
	// Each is a semaphore of one (a channel, not a mutex: a goroutine
	// waiting on a channel is durably blocked, so in a synctest bubble
	// virtual time still advances for the session that holds it).
	shardLocks []chan struct{}

	inbound  *peerPacer // sessions peers run with this node
	outbound *peerPacer // sessions this node runs with peers (the same pacing)
	sessions chan struct{}

	mu      gosync.Mutex // guards started, closed
	started bool
	closed  bool
}

// New builds a service over h, the store set, the ingest path and the
// penalizer (nil: peers that break a budget are not penalized); peers names
// the holders of a shard. Start begins serving.
func New(cfg Config, h Host, set Set, ing ingest.Ingester, pen ingest.Penalizer, peers PeerSource) (*Service, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if h == nil || set == nil || ing == nil || peers == nil {
		return nil, errors.New("sync: a host, a set, an ingester and a peer source are required")
	}
	log := cfg.Logger.With("component", "sync")
	s := &Service{cfg: cfg, h: h, peers: peers, log: log,
		local: &Local{Set: set, Ingester: ing, Penalizer: pen, Shards: cfg.Shards, MLS: cfg.MLS,
			RoundTimeout: cfg.RoundTimeout, Now: cfg.Now, Refused: NewRefused(cfg.Retention),
			ClaimBudget: NewClaimBudget(cfg.Now),
			Metrics:     NewMetrics(cfg.Registerer), Log: log},
		shardLocks: newShardLocks(cfg.Shards.Count()),
		inbound:    newPeerPacer(cfg.Shards.Count()),
		outbound:   newPeerPacer(cfg.Shards.Count()),
		sessions:   make(chan struct{}, maxSessions),
	}
	return s, nil
}

// Start serves the sync protocol and, when shards are held, starts the
// sessions on identify and the periodic loop. Its goroutines live until
// Close or the end of ctx.
func (s *Service) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		return errors.New("sync: service already started")
	}
	s.started = true
	s.ctx, s.cancel = context.WithCancel(ctx)
	s.notify = &network.NotifyBundle{DisconnectedF: func(nw network.Network, c network.Conn) {
		if p := c.RemotePeer(); nw.Connectedness(p) != network.Connected {
			s.inbound.forget(p, time.Now())
			s.outbound.forget(p, time.Now())
		}
	}}
	if nh, ok := s.h.(networkHost); ok {
		nh.Network().Notify(s.notify)
	}
	s.h.SetStreamHandler(s.cfg.Protocol, s.handle)
	if !s.cfg.Shards.Empty() {
		var sub event.Subscription
		err := errors.New("the host has no event bus")
		if eh, ok := s.h.(eventHost); ok {
			sub, err = eh.EventBus().Subscribe([]any{new(event.EvtPeerIdentificationCompleted), new(event.EvtPeerProtocolsUpdated)})
		}
		if err != nil {
			s.log.Warn("sync: no identify events; syncing periodically only", "err", err)
		} else {
			s.sub = sub
			s.wg.Add(1)
			go s.watchPeers(sub)
		}
		s.wg.Add(1)
		go s.loop()
	}
	return nil
}

// Close stops serving, ends running sessions and waits for every goroutine
// of the service.
func (s *Service) Close() error {
	s.mu.Lock()
	started := s.started && !s.closed
	s.closed = true
	s.mu.Unlock()
	if !started {
		return nil
	}
	s.h.RemoveStreamHandler(s.cfg.Protocol)
	if nh, ok := s.h.(networkHost); ok {
		nh.Network().StopNotify(s.notify)
	}
	s.cancel()
	if s.sub != nil {
		s.sub.Close()
	}
	s.wg.Wait()
	return nil
}

// Refused returns the memory of items this node refused to keep.
func (s *Service) Refused() *Refused { return s.local.Refused }

// goTracked runs f in a goroutine joined by Close, unless the service is
// closed.
func (s *Service) goTracked(f func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
	return true
}

// enter registers a stream handler with the goroutines Close joins; it
// reports false once the service is closed (the handler then refuses the
// stream). libp2p runs handlers on goroutines of its own, so without this a
// session could outlive Close.
func (s *Service) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// watchPeers starts a reconciliation of every held shard with each peer
// that identify reports as speaking sync.
func (s *Service) watchPeers(sub event.Subscription) {
	defer s.wg.Done()
	for {
		var p peer.ID
		var protos []p2pprotocol.ID
		select {
		case <-s.ctx.Done():
			return
		case e, ok := <-sub.Out():
			if !ok {
				return
			}
			switch e := e.(type) {
			case event.EvtPeerIdentificationCompleted:
				p, protos = e.Peer, e.Protocols
			case event.EvtPeerProtocolsUpdated:
				p, protos = e.Peer, e.Added
			}
		}
		if p == "" || p == s.h.ID() || !slices.Contains(protos, s.cfg.Protocol) {
			continue
		}
		s.goTracked(func() { s.syncPeer(s.ctx, p, s.cfg.Shards.List(), false) })
	}
}

// loop reconciles each held shard with a random peer that holds it.
func (s *Service) loop() {
	defer s.wg.Done()
	t := time.NewTimer(s.nextInterval())
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		for _, shard := range s.cfg.Shards.List() {
			peers := s.peers.ShardPeers(shard)
			if len(peers) == 0 {
				continue
			}
			s.syncPeer(s.ctx, peers[rand.IntN(len(peers))], []int{shard}, false)
		}
		t.Reset(s.nextInterval())
	}
}

func (s *Service) nextInterval() time.Duration {
	return s.cfg.Interval + time.Duration(rand.Int64N(int64(s.cfg.Interval/5)))
}

// syncPeer reconciles shards with p. Unless wait is set, a shard with a
// session already running is skipped: that session brings what p has too,
// or the next round will.
func (s *Service) syncPeer(ctx context.Context, p peer.ID, shards []int, wait bool) {
	for _, shard := range shards {
		for _, set := range sets {
			if ctx.Err() != nil {
				return
			}
			pulled, err := s.syncShard(ctx, p, shard, set, wait)
			switch {
			case errors.Is(err, ErrNotHeld), errors.Is(err, ErrBusy):
			case errors.Is(err, ErrViolation):
				return // p is banned and disconnected
			case err != nil:
				s.log.Debug("sync failed", "peer", p, "shard", shard, "set", set, "err", err)
			case pulled > 0:
				s.log.Info("sync pulled records", "peer", p, "shard", shard, "set", set, "records", pulled)
			}
		}
	}
}

// SyncNow reconciles shard's bundle, account and notice sets with peer p
// now, waiting for a session already running for the shard or with p, and
// returns how many records it stored (operators' tools and tests).
func (s *Service) SyncNow(ctx context.Context, p peer.ID, shard int) (int, error) {
	total := 0
	for _, set := range sets {
		pulled, err := s.syncShard(ctx, p, shard, set, true)
		total += pulled
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// syncShard runs one initiator session on a new stream to p: it pulls the
// records of shard's set that p holds and this node lacks, and returns how
// many it stored.
func newShardLocks(n int) []chan struct{} {
	locks := make([]chan struct{}, n)
	for i := range locks {
		locks[i] = make(chan struct{}, 1)
	}
	return locks
}

func (s *Service) syncShard(ctx context.Context, p peer.ID, shard int, set pb.SyncRequest_Set, wait bool) (pulled int, err error) {
	// A panic on the peer's bytes (records are parsed before they are
	// verified) ends the session, never the process.
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("sync: panic in a session", "peer", p, "shard", shard, "set", set, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("sync: panic: %v", r)
		}
	}()
	if shard < 0 || shard >= len(s.shardLocks) {
		return 0, fmt.Errorf("no shard %d", shard)
	}
	lock := s.shardLocks[shard]
	if wait {
		select {
		case lock <- struct{}{}:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	} else {
		select {
		case lock <- struct{}{}:
		default:
			return 0, ErrBusy
		}
	}
	defer func() { <-lock }()
	if err := s.outbound.beginOutbound(ctx, p, wait); err != nil {
		return 0, err
	}
	defer s.outbound.end(p)
	ctx, cancel := context.WithTimeout(ctx, s.cfg.SessionLimit)
	defer cancel()
	if s.ctx != nil {
		defer context.AfterFunc(s.ctx, cancel)() // the service's close ends it too
	}
	in := NewInitiator(s.local, p, shard, set)
	defer func() { pulled = in.Pulled() }()
	raw, err := s.h.NewStream(ctx, p, s.cfg.Protocol)
	if err != nil {
		return 0, err
	}
	st := &countingStream{Stream: raw, m: s.local.Metrics}
	defer func() { _ = st.Close() }()
	stop := context.AfterFunc(ctx, func() { _ = raw.Reset() })
	defer stop()
	return 0, in.Run(ctx, st)
}

// handle serves a sync session: request/response rounds until the
// initiator closes its side. Sessions beyond the node's or the peer's
// limits are reset before anything is read (a clean refusal: the
// initiator tries later); a peer that keeps opening them is penalized.
func (s *Service) handle(raw network.Stream) {
	if !s.enter() {
		_ = raw.Reset()
		return
	}
	defer s.wg.Done()
	p := raw.Conn().RemotePeer()
	// A panic on a peer's bytes ends its session, never the process.
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("sync: panic serving a session", "peer", p, "panic", r, "stack", string(debug.Stack()))
			_ = raw.Reset()
		}
	}()
	admitted, ok := s.admit(p)
	if !ok {
		_ = raw.Reset()
		return
	}
	var once gosync.Once
	release := func() { once.Do(admitted) }
	defer release()
	st := &countingStream{Stream: raw, m: s.local.Metrics}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.SessionLimit)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = raw.Reset() })
	defer stop()
	err := NewResponder(s.local, p).Run(ctx, st)
	switch {
	case err == nil:
		// The initiator is done: free the slot before closing, so its
		// next session (it waits for this close) is admitted.
		release()
		_ = raw.Close()
	case errors.Is(err, ErrRefused):
		_ = raw.Close()
	default:
		s.log.Debug("sync: session ended", "peer", p, "err", err)
		_ = raw.Reset()
	}
}

// admit applies the session limits of the responder: at most maxSessions
// inbound sessions in the node, maxPeerSessions per peer, and the peer's
// token bucket. The node-wide limit only refuses ("busy"); refusals for a
// peer's own limits are strikes, and too many penalize it. release ends an
// admitted session.
func (s *Service) admit(p peer.ID) (release func(), ok bool) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, false
	}
	s.wg.Add(1)
	s.mu.Unlock()
	select {
	case s.sessions <- struct{}{}:
	default:
		s.wg.Done()
		s.local.Metrics.refused("busy")
		return nil, false
	}
	ok, reason, ban := s.inbound.tryBegin(p, maxPeerSessions, time.Now())
	if !ok {
		<-s.sessions
		s.wg.Done()
		s.local.Metrics.refused(reason)
		if ban {
			s.local.penalize(p, reason)
		}
		return nil, false
	}
	return func() {
		s.inbound.end(p)
		<-s.sessions
		s.wg.Done()
	}, true
}

// countingStream counts the bytes a sync session moves as they move, so
// the metric is current while a session runs, not only once it ends.
type countingStream struct {
	network.Stream
	m *Metrics
}

func (c *countingStream) Read(p []byte) (int, error) {
	n, err := c.Stream.Read(p)
	c.m.moved(int64(n), 0)
	return n, err
}

func (c *countingStream) Write(p []byte) (int, error) {
	n, err := c.Stream.Write(p)
	c.m.moved(0, int64(n))
	return n, err
}
