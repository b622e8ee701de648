// Package sync is kpnode's anti-entropy: range-based set reconciliation of
// a shard's bundle, account or notice set with one peer
// (protocol/README.md, "Sync").
//
// A session is an Initiator and a Responder exchanging SyncRequest and
// SyncResponse messages over a Conn (any byte stream with a deadline: a
// libp2p stream, a net.Conn, one end of a net.Pipe). Each side reads the
// store through the Set interface, stores what it pulls through an
// ingest.Ingester, and holds the other to budgets, cutting off a peer that
// breaks one through an ingest.Penalizer. Sessions know nothing of libp2p
// hosts.
//
// Service runs sessions on libp2p streams: it answers peers' sessions, and
// starts its own when a peer that speaks sync connects and periodically,
// with a peer that a PeerSource names for each held shard.
//
// The package is named after what it does, as go-header's is; inside it
// the standard library's sync is imported as gosync, and importers name
// this one kpsync.
package sync

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/node/internal/bucket"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Sync limits. A differing range with at most listThreshold items on the
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
	listThreshold = 64
	MaxListing    = 4096 // item IDs in one listing (a range of one key may exceed the threshold)
	maxRanges     = 1024 // ranges per request
	maxListings   = 64   // want listings per request
	maxWant       = 512  // item IDs per request
	maxRequest    = 1 << 20
	maxResponse   = 8 << 20
	responseLimit = 4 << 20 // records per response, before truncating

	// DefaultSessionLimit bounds one session, both roles.
	DefaultSessionLimit = 2 * time.Minute

	// Per response (initiator's structural budget, a violation bans).
	maxRespRanges = 1 << 16 // child ranges
	maxRespIDs    = 1 << 17 // listed item IDs
	// Per session (initiator). Ranges and listed IDs beyond these ban: an
	// honest responder sends about 256 + 65,536 ranges and at most its item
	// count in IDs even to an empty initiator, for up to ~2M items a shard.
	maxSessionRanges = 1 << 17
	maxSessionIDs    = 1 << 21
	// Per session (initiator), reached only by huge honest catch-ups: the
	// session ends quietly.
	maxPending      = 1 << 16   // wanted item IDs not yet asked for
	MaxRounds       = 512       // rounds, both sides (the responder bans beyond MaxRounds+1)
	maxSessionBytes = 256 << 20 // response bytes read

	// Responder. workFactor × the shard's item count + workSlack is what
	// one session may make the responder scan; an honest session scans
	// about 2-3× the shard when everything differs.
	workFactor      = 8
	workSlack       = 1 << 16
	maxSessions     = 8 // concurrent inbound sessions, whole node
	maxPeerSessions = 2 // concurrent inbound sessions, one peer

	// DefaultInterval is how often a node reconciles each shard it holds
	// with a random peer that holds it too.
	DefaultInterval = 30 * time.Second
)

// Errors that end a session.
var (
	// ErrBusy: a session for the shard, or with the peer, is running, or
	// the peer's session rate is used up; the session was not started.
	ErrBusy = errors.New("sync: busy")
	// ErrViolation: the peer broke a sync budget; it has been penalized.
	ErrViolation = errors.New("sync: peer broke a budget")
	// ErrBudget: this session reached a volume budget and stopped; the
	// next session continues.
	ErrBudget = errors.New("sync: session budget reached")
	// ErrNotHeld: the responder does not hold the shard.
	ErrNotHeld = errors.New("sync: peer does not hold the shard")
	// ErrRefused: the responder answered a request with a final status
	// (not holder, bad request, budget spent) and closed its side of the
	// session in order; what it refused is wrapped too.
	ErrRefused = errors.New("sync: request refused")
)

// PenaltyProtocol labels the penalties sessions give (the protocol label
// of kpnode_peer_penalties_total).
const PenaltyProtocol = "sync"

// Set is the store as sessions read it: the digests of a shard's set and of
// its prefix ranges, the item hashes under a prefix, and the records of
// wanted item IDs. *storage.Store satisfies it.
type Set interface {
	ShardDigest(kind storage.SetKind, shard int) protocol.Digest
	PrefixDigests(ctx context.Context, kind storage.SetKind, shard int, prefix []byte) (all protocol.Digest, children [256]protocol.Digest, keys int, err error)
	PrefixItems(ctx context.Context, kind storage.SetKind, shard int, prefix []byte) ([][32]byte, error)
	BundlesByID(ctx context.Context, shard int, prefix []byte, ids map[uint64]bool) ([]*storage.Bundle, error)
	AccountsByID(ctx context.Context, shard int, prefix []byte, ids map[uint64]bool) ([]*storage.Account, error)
	NoticesByID(ctx context.Context, shard int, prefix []byte, ids map[uint64]bool) ([]*storage.Notice, error)
}

var _ Set = (*storage.Store)(nil)

// Conn is what a session runs over: a byte stream whose reads and writes
// can be bounded in time. network.Stream and net.Conn satisfy it. A Conn
// that also has CloseWrite (a libp2p stream, a TCP connection) is
// half-closed at the end of a session, and each side waits briefly for the
// other's close; the caller closes the Conn after Run returns.
type Conn interface {
	io.ReadWriter
	SetDeadline(t time.Time) error
}

// Local is what sessions need of the node they run in. One Local is shared
// by every session of a service; its parts are safe for concurrent use.
// Set, Ingester, Shards and RoundTimeout are required; the other fields
// have defaults.
type Local struct {
	Set       Set
	Ingester  ingest.Ingester
	Penalizer ingest.Penalizer
	// Shards are the shards held, and the network's shard count.
	Shards protocol.ShardSet
	// MLS is the network's MLS mode: how a bundle's sync item hash is read.
	MLS protocol.MLSMode
	// RoundTimeout bounds how long a peer may take to send a request or
	// answer one (the node's stream timeout).
	RoundTimeout time.Duration
	// Now is the clock of the refused items; nil is time.Now.
	Now func() time.Time
	// Refused remembers items this node refused, so that it does not pull
	// them again; nil remembers none.
	Refused *Refused
	// ClaimBudget bounds the claim notices one responder may get stored
	// for one device (the gossip validator's per-(peer, device) budget,
	// applied to sync): a wanted claim notice over it is skipped, neither
	// stored nor remembered as refused, and wanted again next session.
	// Notices cost their signer only a key, so without it one responder
	// could mark a device's whole pool claimed at once. nil: no budget.
	ClaimBudget *bucket.Keyed[PeerDevice]
	// Metrics counts rounds and scans; nil counts nothing.
	Metrics *Metrics
	// Log gets the sessions' debug lines; nil is slog.Default().
	Log *slog.Logger
}

// PeerDevice keys ClaimBudget: a responder and a device.
type PeerDevice struct {
	Peer   peer.ID
	Device protocol.Key
}

// The default ClaimBudget: the gossip validator's per-(peer, device)
// claim budget, 60 at once and 20 a second.
const (
	DefaultClaimBudgetBurst = 60
	DefaultClaimBudgetRate  = 20
)

// NewClaimBudget returns the default ClaimBudget on the clock now.
func NewClaimBudget(now func() time.Time) *bucket.Keyed[PeerDevice] {
	return bucket.New[PeerDevice](1<<16, DefaultClaimBudgetRate, DefaultClaimBudgetBurst, now)
}

func (l *Local) now() time.Time {
	if l.Now == nil {
		return time.Now()
	}
	return l.Now()
}

func (l *Local) log() *slog.Logger {
	if l.Log == nil {
		return slog.Default()
	}
	return l.Log
}

func (l *Local) penalize(p peer.ID, reason string) {
	if l.Penalizer != nil {
		l.Penalizer.Penalize(p, PenaltyProtocol, reason)
	}
}

// Metrics are the sync metrics (names and labels are part of the node's
// interface: dashboards and tests read them).
type Metrics struct {
	rounds prometheus.Counter
	bytes  *prometheus.CounterVec // by direction
	// bytesIn and bytesOut are bytes' two series, resolved once: streams
	// add to them on every read and write.
	bytesIn, bytesOut prometheus.Counter
	scanned           *prometheus.CounterVec // items scanned, by role
	refusal           *prometheus.CounterVec // inbound sessions refused, by reason
}

// NewMetrics registers the sync metrics on reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		rounds: prometheus.NewCounter(prometheus.CounterOpts{Name: "kpnode_sync_rounds_total",
			Help: "Sync rounds this node ran as initiator: one per SyncResponse read and decoded, whatever its status."}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_sync_bytes_total",
			Help: "Bytes moved by sync sessions, by direction (in, out)."}, []string{"direction"}),
		scanned: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_sync_items_scanned_total",
			Help: "Store items sync read to compare and list ranges, by role (initiator: this node's sessions; responder: peers' sessions)."}, []string{"role"}),
		refusal: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_sync_sessions_refused_total",
			Help: "Inbound sync sessions reset before the first request, by reason (busy, peer_sessions, peer_rate)."}, []string{"reason"}),
	}
	m.bytesIn, m.bytesOut = m.bytes.WithLabelValues("in"), m.bytes.WithLabelValues("out")
	if reg != nil {
		reg.MustRegister(m.rounds, m.bytes, m.scanned, m.refusal)
	}
	return m
}

func (m *Metrics) round() {
	if m != nil {
		m.rounds.Inc()
	}
}

func (m *Metrics) moved(in, out int64) {
	if m == nil {
		return
	}
	if in > 0 {
		m.bytesIn.Add(float64(in))
	}
	if out > 0 {
		m.bytesOut.Add(float64(out))
	}
}

func (m *Metrics) scan(role string, items uint64) {
	if m != nil {
		m.scanned.WithLabelValues(role).Add(float64(items))
	}
}

func (m *Metrics) refused(reason string) {
	if m != nil {
		m.refusal.WithLabelValues(reason).Inc()
	}
}

func setKind(set pb.SyncRequest_Set) storage.SetKind {
	switch set {
	case pb.SyncRequest_SET_ACCOUNTS:
		return storage.AccountSet
	case pb.SyncRequest_SET_NOTICES:
		return storage.NoticeSet
	}
	return storage.BundleSet
}

// sets are the sets a shard's sessions reconcile, in order: notices name
// bundles (a claim is kept only for a bundle held), so the bundle set goes
// first.
var sets = []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_ACCOUNTS, pb.SyncRequest_SET_NOTICES}

// validSet reports whether set is one of the three.
func validSet(set pb.SyncRequest_Set) bool {
	return set == pb.SyncRequest_SET_BUNDLES || set == pb.SyncRequest_SET_ACCOUNTS || set == pb.SyncRequest_SET_NOTICES
}

// malformedMsg reports whether a read failed on the message itself (over
// the size cap, or not protobuf) rather than on the stream.
func malformedMsg(err error) bool {
	return errors.Is(err, io.ErrShortBuffer) || errors.Is(err, proto.Error)
}

// bindContext makes ctx's end unblock c: the deadline is moved to the
// past. Callers set a round's deadline and then check ctx, so a deadline
// set after ctx ended is never waited on. The returned func stops it.
func bindContext(ctx context.Context, c Conn) (stop func() bool) {
	return context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
}

// halfClose closes c's write side if it has one, and waits (at most wait)
// for the peer to close its side. It reports whether c could half-close.
func halfClose(c Conn, wait time.Duration, drain int64) bool {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		return false
	}
	_ = cw.CloseWrite()
	_ = c.SetDeadline(time.Now().Add(wait))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, drain))
	return true
}

// skipEmpty drops empty writes: pbio writes a message's length and its
// bytes separately, and an empty write would block on a net.Pipe until the
// peer reads, which it never does for an empty message.
type skipEmpty struct{ w io.Writer }

func (s skipEmpty) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return s.w.Write(p)
}
