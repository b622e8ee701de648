package node

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Sync limits. A differing range with at most syncListThreshold items on the
// responder's side is listed item by item (8 bytes each); a larger one is
// split into its 256 children. Wants are asked for in batches.
//
// Both sides hold the other to budgets (protocol/README.md, "Sync"). An
// honest peer stays far below every one of them; a peer that breaks a
// structural budget (answers what was not asked, asks what was not offered)
// is cut off and banned. Volume budgets that a very large honest catch-up
// could reach (rounds, bytes, pending wants) end the session quietly: the
// next session continues where this one stopped.
const (
	syncListThreshold = 64
	syncMaxListing    = 4096 // item IDs in one listing (a range of one key may exceed the threshold)
	syncMaxRanges     = 1024 // ranges per request
	syncMaxListings   = 64   // want listings per request
	syncMaxWant       = 512  // item IDs per request
	syncMaxRequest    = 1 << 20
	syncMaxResponse   = 8 << 20
	syncResponseLimit = 4 << 20 // records per response, before truncating
	syncSessionLimit  = 2 * time.Minute

	// Per response (initiator's structural budget, a violation bans).
	syncMaxRespRanges = 1 << 16 // child ranges
	syncMaxRespIDs    = 1 << 17 // listed item IDs
	// Per session (initiator). Ranges and listed IDs beyond these ban: an
	// honest responder sends about 256 + 65,536 ranges and at most its item
	// count in IDs even to an empty initiator, for up to ~2M items a shard.
	syncMaxSessionRanges = 1 << 17
	syncMaxSessionIDs    = 1 << 21
	// Per session (initiator), reached only by huge honest catch-ups: the
	// session ends quietly.
	syncMaxPending      = 1 << 16   // wanted item IDs not yet asked for
	syncMaxRounds       = 512       // rounds, both sides (the responder bans beyond syncMaxRounds+1)
	syncMaxSessionBytes = 256 << 20 // response bytes read

	// Responder. syncWorkFactor × the shard's item count + syncWorkSlack is
	// what one session may make the responder scan; an honest session
	// scans about 2-3× the shard when everything differs.
	syncWorkFactor      = 8
	syncWorkSlack       = 1 << 16
	syncMaxSessions     = 8 // concurrent inbound sessions, whole node
	syncMaxPeerSessions = 2 // concurrent inbound sessions, one peer

	// DefaultSyncInterval is how often a node reconciles each shard it holds
	// with a random peer that holds it too.
	DefaultSyncInterval = 30 * time.Second
)

// Errors that end a session.
var (
	// errSyncBusy: a session for the shard, or with the peer, is running,
	// or the peer's session rate is used up; the session was not started.
	errSyncBusy = errors.New("sync: busy")
	// errSyncViolation: the peer broke a sync budget; it has been banned.
	errSyncViolation = errors.New("sync: peer broke a budget")
	// errSyncBudget: this session reached a volume budget and stopped; the
	// next session continues.
	errSyncBudget = errors.New("sync: session budget reached")
)

// syncService runs anti-entropy: on connecting to a peer and periodically,
// each shard a node holds is reconciled with a peer that holds it, and the
// node pulls what it lacks. What gossip loses, or a node misses while it is
// offline or partitioned, arrives this way.
//
// The service owns its goroutines: they derive from its lifetime context
// and close() cancels it and waits for them, inbound sessions included.
type syncService struct {
	n     *Node
	h     host.Host
	proto p2pprotocol.ID
	log   *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sub    event.Subscription // identify events; nil without held shards
	notify *network.NotifyBundle

	// shardLocks serialise sessions per shard: a node that reconnects to
	// several peers at once pulls the missing records from the first and
	// finds the others already in agreement, instead of pulling them twice.
	shardLocks []sync.Mutex

	refused  *refusedItems
	inbound  *syncPeers // sessions peers run with this node
	outbound *syncPeers // sessions this node runs with peers (the same pacing)
	sessions chan struct{}

	mu     sync.Mutex // guards closed
	closed bool

	scanned *prometheus.CounterVec // items scanned, by role
	refusal *prometheus.CounterVec // inbound sessions refused, by reason
}

func startSync(ctx context.Context, n *Node, h host.Host) *syncService {
	s := &syncService{n: n, h: h, proto: p2pprotocol.ID(protocol.SyncProtocol(n.netID)),
		log: n.log.With("component", "sync"), shardLocks: make([]sync.Mutex, n.cfg.Shards.Count()),
		refused:  newRefusedItems(n.cfg.Policy.Retention),
		inbound:  newSyncPeers(n.cfg.Shards.Count()),
		outbound: newSyncPeers(n.cfg.Shards.Count()),
		sessions: make(chan struct{}, syncMaxSessions),
		scanned: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_sync_items_scanned_total",
			Help: "Store items sync read to compare and list ranges, by role (initiator: this node's sessions; responder: peers' sessions)."}, []string{"role"}),
		refusal: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_sync_sessions_refused_total",
			Help: "Inbound sync sessions reset before the first request, by reason (busy, peer_sessions, peer_rate)."}, []string{"reason"}),
	}
	n.registry.MustRegister(s.scanned, s.refusal)
	s.ctx, s.cancel = context.WithCancel(ctx)
	s.notify = &network.NotifyBundle{DisconnectedF: func(nw network.Network, c network.Conn) {
		if p := c.RemotePeer(); nw.Connectedness(p) != network.Connected {
			s.inbound.forget(p, time.Now())
			s.outbound.forget(p, time.Now())
		}
	}}
	h.Network().Notify(s.notify)
	h.SetStreamHandler(s.proto, s.handle)
	if !n.cfg.Shards.Empty() {
		sub, err := h.EventBus().Subscribe([]any{new(event.EvtPeerIdentificationCompleted), new(event.EvtPeerProtocolsUpdated)})
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
	return s
}

// close stops serving, ends running sessions and waits for every goroutine
// of the service.
func (s *syncService) close() {
	s.h.RemoveStreamHandler(s.proto)
	s.h.Network().StopNotify(s.notify)
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	if s.sub != nil {
		s.sub.Close()
	}
	s.wg.Wait()
}

// goTracked runs f in a goroutine joined by close, unless the service is
// closed.
func (s *syncService) goTracked(f func()) bool {
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

// watchPeers starts a reconciliation of every held shard with each peer
// that identify reports as speaking sync.
func (s *syncService) watchPeers(sub event.Subscription) {
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
		if p == "" || p == s.h.ID() || !slices.Contains(protos, s.proto) {
			continue
		}
		s.goTracked(func() { s.syncPeer(s.ctx, p, s.n.cfg.Shards.List(), false) })
	}
}

// loop reconciles each held shard with a random peer of its topic.
func (s *syncService) loop() {
	defer s.wg.Done()
	t := time.NewTimer(s.nextInterval())
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		for _, shard := range s.n.cfg.Shards.List() {
			peers := s.n.gossip.ShardPeers(shard)
			if len(peers) == 0 {
				continue
			}
			s.syncPeer(s.ctx, peers[rand.IntN(len(peers))], []int{shard}, false)
		}
		t.Reset(s.nextInterval())
	}
}

func (s *syncService) nextInterval() time.Duration {
	return s.n.cfg.SyncInterval + time.Duration(rand.Int64N(int64(s.n.cfg.SyncInterval/5)))
}

// syncPeer reconciles shards with p. Unless wait is set, a shard with a
// session already running is skipped: that session brings what p has too,
// or the next round will.
func (s *syncService) syncPeer(ctx context.Context, p peer.ID, shards []int, wait bool) {
	for _, shard := range shards {
		for _, set := range []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_ACCOUNTS} {
			if ctx.Err() != nil {
				return
			}
			pulled, err := s.syncShard(ctx, p, shard, set, wait)
			switch {
			case errors.Is(err, errNotHeld), errors.Is(err, errSyncBusy):
			case errors.Is(err, errSyncViolation):
				return // p is banned and disconnected
			case err != nil:
				s.log.Debug("sync failed", "peer", p, "shard", shard, "set", set, "err", err)
			case pulled > 0:
				s.log.Info("sync pulled records", "peer", p, "shard", shard, "set", set, "records", pulled)
			}
		}
	}
}

func setKind(set pb.SyncRequest_Set) storage.SetKind {
	if set == pb.SyncRequest_SET_ACCOUNTS {
		return storage.AccountSet
	}
	return storage.BundleSet
}

// countingStream counts the bytes a sync session moves.
type countingStream struct {
	network.Stream
	read, written int64
}

func (c *countingStream) Read(p []byte) (int, error) {
	n, err := c.Stream.Read(p)
	c.read += int64(n)
	return n, err
}

func (c *countingStream) Write(p []byte) (int, error) {
	n, err := c.Stream.Write(p)
	c.written += int64(n)
	return n, err
}

// SyncNow reconciles shard's bundle and account sets with peer p now and
// returns how many records it stored (operators' tools and tests).
func (n *Node) SyncNow(ctx context.Context, p peer.ID, shard int) (int, error) {
	total := 0
	for _, set := range []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_ACCOUNTS} {
		pulled, err := n.sync.syncShard(ctx, p, shard, set, true)
		total += pulled
		if err != nil {
			return total, err
		}
	}
	return total, nil
}
