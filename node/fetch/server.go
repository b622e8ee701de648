package fetch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/ed25519strict"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Response budgets: bytes of responses in flight, server-wide. A request
// acquires its worst case (the store's read plus the encoded answer, with
// the device's consume notices it carries) before
// touching the store, and is answered STATUS_BUSY when the budget cannot
// cover it, so a flood of requests costs at most the budget in memory.
// KIND_ALL and the point kinds (LATEST, ACCOUNT) have separate budgets, so
// a flood of KIND_ALL never starves the lookups nodes rely on. Point
// requests weigh PointWeight (102 at once in the default budget); a
// KIND_ALL weighs AllWeight, what the store reads for it (at most
// MaxResponse of payloads plus one more bundle, storage.BundlesUpTo, and
// MaxConsumedWire of consume notices) plus the encoded answer, about
// 2.1 MiB (7 at once).
const (
	DefaultBulkBudget  = 16 << 20
	DefaultPointBudget = 16 << 20
	// PointWeight: a stored record plus its encoded answer, and the
	// device's consume notices the answer carries.
	PointWeight = 2*MaxBundleWire + MaxConsumedWire
	// AllWeight: what one KIND_ALL may allocate.
	AllWeight = 2*MaxResponse + MaxBundleWire + MaxConsumedWire
	// DefaultStreamTimeout bounds a served stream: reading the request and
	// writing the answer.
	DefaultStreamTimeout = 10 * time.Second
)

// ServerConfig configures a Server. Zero fields take the defaults.
type ServerConfig struct {
	// Protocol is the fetch protocol ID (protocol.FetchProtocol(netID)).
	Protocol p2pprotocol.ID
	// Store is what requests are answered from.
	Store Store
	// Holds reports whether this node holds a key's shard: a miss is then
	// NOT_FOUND, else NOT_HOLDER. Nil: no shard is held.
	Holds func(protocol.Key) bool
	// Claimer serves KIND_CLAIM and KIND_COUNT for keys of held shards.
	// Nil: both are answered as unknown kinds (BAD_REQUEST).
	Claimer Claimer
	// Handlers, if set, gets the stream handler from Start to Close
	// (host.Host). Without it, streams are handed to Handle directly.
	Handlers StreamHandlers
	// StreamTimeout bounds one served stream. Default DefaultStreamTimeout.
	StreamTimeout time.Duration
	// BulkBudget (KIND_ALL) and PointBudget (LATEST, ACCOUNT) bound the
	// response bytes in flight. BulkBudget is raised to AllWeight at least.
	BulkBudget, PointBudget int64
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Registerer gets the server's metrics (kpnode_fetch_served_total,
	// kpnode_fetch_inflight_bytes). Nil: not exported.
	Registerer prometheus.Registerer
}

func (c ServerConfig) withDefaults() ServerConfig {
	if c.StreamTimeout == 0 {
		c.StreamTimeout = DefaultStreamTimeout
	}
	if c.BulkBudget == 0 {
		c.BulkBudget = DefaultBulkBudget
	}
	if c.PointBudget == 0 {
		c.PointBudget = DefaultPointBudget
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Holds == nil {
		c.Holds = func(protocol.Key) bool { return false }
	}
	return c
}

// Validate reports whether c (with its defaults) is usable.
func (c ServerConfig) Validate() error {
	c = c.withDefaults()
	switch {
	case c.Protocol == "":
		return errors.New("fetch server: protocol ID is required")
	case c.Store == nil:
		return errors.New("fetch server: store is required")
	case c.StreamTimeout < 0:
		return fmt.Errorf("fetch server: stream timeout must be positive, got %v", c.StreamTimeout)
	case c.BulkBudget < 0 || c.PointBudget < PointWeight:
		return fmt.Errorf("fetch server: budgets must cover one request (point %d, at least %d)", c.PointBudget, PointWeight)
	}
	return nil
}

// Server answers fetch requests. It owns its handlers: each derives its
// context from the one Start was given, and Close waits for them.
type Server struct {
	cfg    ServerConfig
	log    *slog.Logger
	served *prometheus.CounterVec

	bulk, point *semaphore.Weighted
	inflight    atomic.Int64
	peak        atomic.Int64 // high-water mark of inflight (tests)

	mu      sync.Mutex // guards ctx, started, closed and wg.Add
	ctx     context.Context
	cancel  context.CancelFunc
	started bool
	closed  bool
	wg      sync.WaitGroup
}

// NewServer builds a Server and registers its metrics; Start begins serving.
func NewServer(cfg ServerConfig) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	s := &Server{cfg: cfg, log: cfg.Logger,
		bulk:  semaphore.NewWeighted(max(cfg.BulkBudget, AllWeight)),
		point: semaphore.NewWeighted(cfg.PointBudget),
		served: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_fetch_served_total",
			Help: "Fetch requests served, by status."}, []string{"status"}),
	}
	if reg := cfg.Registerer; reg != nil {
		inflight := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kpnode_fetch_inflight_bytes",
			Help: "Fetch response bytes reserved by requests being served (bounded by the fetch budgets)."},
			func() float64 { return float64(s.inflight.Load()) })
		for _, c := range []prometheus.Collector{s.served, inflight} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("fetch server: metrics: %w", err)
			}
		}
	}
	return s, nil
}

// Start serves until Close or until ctx ends: handlers run under ctx, and
// the stream handler is registered on cfg.Handlers if set.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		return errors.New("fetch server: already started or closed")
	}
	s.ctx, s.cancel = context.WithCancel(ctx)
	s.started = true
	if h := s.cfg.Handlers; h != nil {
		h.SetStreamHandler(s.cfg.Protocol, s.handleStream)
	}
	return nil
}

// Close stops serving: no new stream is handled, streams in flight are
// reset, and Close returns once every handler has returned.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	cancel := s.cancel
	s.mu.Unlock()
	if h := s.cfg.Handlers; h != nil {
		h.RemoveStreamHandler(s.cfg.Protocol)
	}
	if cancel != nil {
		cancel()
	}
	s.wg.Wait()
	return nil
}

func (s *Server) handleStream(st network.Stream) { s.Handle(st, st.Conn().RemotePeer()) }

// Handle serves one request on st, from peer from (for logs): it reads one
// length-prefixed FetchRequest, answers it and closes st. Bytes after the
// first request are discarded unread. Truncated, oversized, undecodable or
// slow requests abort st; the server keeps serving others. Before Start or
// after Close, st is aborted at once.
func (s *Server) Handle(st Stream, from peer.ID) {
	s.mu.Lock()
	if !s.started || s.closed {
		s.mu.Unlock()
		abort(st)
		return
	}
	s.wg.Add(1)
	base := s.ctx
	s.mu.Unlock()
	defer s.wg.Done()
	// A panic on hostile input ends this stream, never the process.
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("fetch: handler panicked", "peer", from, "panic", r, "stack", string(debug.Stack()))
			abort(st)
		}
	}()

	deadline := time.Now().Add(s.cfg.StreamTimeout)
	_ = st.SetDeadline(deadline)
	ctx, cancel := context.WithDeadline(base, deadline)
	defer cancel()
	// Closing the server (or the deadline) must also end a blocked read.
	stop := context.AfterFunc(ctx, func() { abort(st) })
	defer stop()

	var req pb.FetchRequest
	if err := pbio.NewDelimitedReader(st, MaxRequest).ReadMsg(&req); err != nil {
		s.log.Debug("fetch: bad request", "peer", from, "err", err)
		s.served.WithLabelValues("bad_request").Inc()
		abort(st)
		return
	}
	resp, release := s.serve(ctx, from, &req)
	defer release()
	s.served.WithLabelValues(statusLabel(resp.Status)).Inc()
	if err := pbio.NewDelimitedWriter(st).WriteMsg(resp); err != nil {
		s.log.Debug("fetch: write response", "peer", from, "err", err)
		abort(st)
		return
	}
	if stop() {
		_ = st.Close()
	}
}

// Inflight returns the response bytes reserved by requests being served.
func (s *Server) Inflight() int64 { return s.inflight.Load() }

// acquire takes n bytes of sem's budget, or reports false at once.
func (s *Server) acquire(sem *semaphore.Weighted, n int64) (release func(), ok bool) {
	if !sem.TryAcquire(n) {
		return func() {}, false
	}
	cur := s.inflight.Add(n)
	for {
		p := s.peak.Load()
		if cur <= p || s.peak.CompareAndSwap(p, cur) {
			break
		}
	}
	return func() { s.inflight.Add(-n); sem.Release(n) }, true
}

func statusLabel(st pb.FetchResponse_Status) string {
	switch st {
	case pb.FetchResponse_STATUS_OK:
		return "ok"
	case pb.FetchResponse_STATUS_NOT_FOUND:
		return "not_found"
	case pb.FetchResponse_STATUS_BAD_REQUEST:
		return "bad_request"
	case pb.FetchResponse_STATUS_NOT_HOLDER:
		return "not_holder"
	case pb.FetchResponse_STATUS_BUSY:
		return "busy"
	case pb.FetchResponse_STATUS_RATE_LIMITED:
		return "rate_limited"
	}
	return "internal"
}

// busyText is the error of a BUSY answer.
const busyText = "fetch budget exhausted; retry later"

// serve answers from the store alone (KIND_CLAIM and KIND_COUNT: from the
// Claimer), within the response budgets. It checks, in order: the kind
// (KIND_UNSPECIFIED or unknown: BAD_REQUEST), the key's length
// (BAD_REQUEST), that it is an Ed25519 point (else NOT_FOUND or NOT_HOLDER
// at once), for a claim or count that the shard is held (else NOT_HOLDER:
// a node never claims on another's behalf for a shard it does not hold),
// then the budget (BUSY). release returns the budget once the answer is
// written. from names the requester of a claim ("peer:<id>").
func (s *Server) serve(ctx context.Context, from peer.ID, req *pb.FetchRequest) (resp *pb.FetchResponse, release func()) {
	release = func() {}
	badRequest := func(msg string) (*pb.FetchResponse, func()) {
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BAD_REQUEST, Error: msg}, release
	}
	switch req.Kind {
	case pb.FetchRequest_KIND_LATEST, pb.FetchRequest_KIND_ALL, pb.FetchRequest_KIND_ACCOUNT:
	case pb.FetchRequest_KIND_CLAIM, pb.FetchRequest_KIND_COUNT:
		if s.cfg.Claimer == nil {
			return badRequest("unknown request kind")
		}
		if req.CipherSuite > 0xffff {
			return badRequest("cipher_suite must fit 16 bits")
		}
	default:
		return badRequest("unknown request kind")
	}
	if len(req.Key) != protocol.KeySize {
		return badRequest("key must be 32 bytes")
	}
	if msg := checkRefs(req); msg != "" {
		return badRequest(msg)
	}
	var key protocol.Key
	copy(key[:], req.Key)
	notFound := func() *pb.FetchResponse {
		if s.cfg.Holds(key) {
			return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND}
		}
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_HOLDER}
	}
	// No record can have a key that is not an Ed25519 point (validation
	// rule 1): a miss, as the HTTP API's 404, without reading the store.
	if _, err := ed25519strict.DecodePoint(req.Key); err != nil {
		return notFound(), release
	}
	internal := func(err error) *pb.FetchResponse {
		s.log.Warn("fetch: store failed", "err", err)
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_INTERNAL}
	}
	claimKind := req.Kind == pb.FetchRequest_KIND_CLAIM || req.Kind == pb.FetchRequest_KIND_COUNT
	if claimKind && !s.cfg.Holds(key) {
		return notFound(), release
	}
	sem, weight := s.point, int64(PointWeight)
	if req.Kind == pb.FetchRequest_KIND_ALL {
		sem, weight = s.bulk, AllWeight
	}
	release, ok := s.acquire(sem, weight)
	if !ok {
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BUSY, Error: busyText}, release
	}
	switch req.Kind {
	case pb.FetchRequest_KIND_LATEST:
		// The consume notices are read after the records, so a bundle
		// consumed meanwhile comes with the notice that consumed it.
		b, err := s.cfg.Store.LatestBundle(ctx, key)
		consumed, _ := s.consumed(ctx, key)
		if errors.Is(err, storage.ErrNotFound) || (err == nil && len(b.Payload) > protocol.MaxPayloadSize) {
			return withConsumed(notFound(), consumed), release
		} else if err != nil {
			return internal(err), release
		}
		return withConsumed(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}}, consumed), release
	case pb.FetchRequest_KIND_ALL:
		bs, cut, err := s.cfg.Store.BundlesUpTo(ctx, key, MaxResponse)
		if err != nil {
			return internal(err), release
		}
		consumed, size := s.consumed(ctx, key)
		if len(bs) == 0 && !cut {
			return withConsumed(notFound(), consumed), release
		}
		return withConsumed(allResponse(bs, cut, size), consumed), release
	case pb.FetchRequest_KIND_CLAIM:
		resp := s.serveClaim(ctx, from, key, req)
		if resp.Status == pb.FetchResponse_STATUS_OK || resp.Status == pb.FetchResponse_STATUS_NOT_FOUND {
			consumed, _ := s.consumed(ctx, key) // not read for a refusal (RATE_LIMITED)
			resp = withConsumed(resp, consumed)
		}
		return resp, release
	case pb.FetchRequest_KIND_COUNT:
		c, err := s.cfg.Claimer.Count(ctx, key)
		if err != nil {
			return internal(err), release
		}
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Counts: &pb.ClaimCounts{
			OneTime: clampU32(c.OneTime), LastResort: clampU32(c.LastResort), LastResortHandedOut: uint64(max(c.LastResortHandedOut, 0))}}, release
	default: // KIND_ACCOUNT
		a, err := s.cfg.Store.Account(ctx, key)
		if errors.Is(err, storage.ErrNotFound) || (err == nil && len(a.Payload) > protocol.MaxPayloadSize) {
			return notFound(), release
		} else if err != nil {
			return internal(err), release
		}
		m := pb.FromAccount(&a.AccountBundle)
		m.UpdatedAtMs = a.UpdatedAtMS
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Account: m}, release
	}
}

// consumed returns dev's consume notices to carry in an answer: newest
// first, at most MaxConsumed of them and MaxConsumedWire encoded bytes
// (size, as they count in the response). A failed read carries none: the
// answer itself does not depend on them.
func (s *Server) consumed(ctx context.Context, dev protocol.Key) (out []*pb.ConsumeNotice, size int) {
	ns, err := s.cfg.Store.ConsumeNotices(ctx, dev, MaxConsumed)
	if err != nil {
		s.log.Warn("fetch: read consume notices", "device", dev, "err", err)
		return nil, 0
	}
	for _, n := range ns {
		m := pb.FromConsume(n)
		k := proto.Size(m)
		k += 1 + protowire.SizeVarint(uint64(k))
		if size+k > MaxConsumedWire {
			break
		}
		size += k
		out = append(out, m)
	}
	return out, size
}

// withConsumed sets resp's consume notices if its status is OK or
// NOT_FOUND (the only answers that carry them) and returns resp.
func withConsumed(resp *pb.FetchResponse, consumed []*pb.ConsumeNotice) *pb.FetchResponse {
	if resp.Status == pb.FetchResponse_STATUS_OK || resp.Status == pb.FetchResponse_STATUS_NOT_FOUND {
		resp.Consumed = consumed
	}
	return resp
}

// allResponse answers KIND_ALL: bundles newest first (the store's order),
// as many as fit in MaxResponse encoded bytes besides reserved (the consume
// notices the answer carries). When it leaves some out (or the store
// stopped reading, cut), error says "truncated: N bundles" ("truncated: N
// of M bundles" when M, all it read, is known).
func allResponse(bs []*storage.Bundle, cut bool, reserved int) *pb.FetchResponse {
	resp := &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK}
	size := ResponseReserve + reserved
	for _, b := range bs {
		if len(b.Payload) > protocol.MaxPayloadSize {
			continue // stored before the cap; no peer would accept it
		}
		m := pb.FromBundle(&b.Bundle)
		n := proto.Size(m)
		if size += 1 + protowire.SizeVarint(uint64(n)) + n; size > MaxResponse {
			break
		}
		resp.Bundles = append(resp.Bundles, m)
	}
	switch {
	case len(resp.Bundles) < len(bs):
		resp.Error = fmt.Sprintf("truncated: %d of %d bundles", len(resp.Bundles), len(bs))
	case cut:
		resp.Error = fmt.Sprintf("truncated: %d bundles", len(resp.Bundles))
	}
	return resp
}

// serveClaim answers KIND_CLAIM for a key of a held shard: the bundle the
// Claimer hands out with its claim notice, or what its error means. An
// owner request's answer also carries the notices proving named refs
// taken (OK and NOT_FOUND alike).
func (s *Server) serveClaim(ctx context.Context, from peer.ID, key protocol.Key, req *pb.FetchRequest) *pb.FetchResponse {
	creq := ClaimRequest{Peer: from, Device: key, Suite: uint16(req.CipherSuite), OwnedOnly: req.OwnedOnly}
	for _, r := range req.Refs {
		var ref protocol.Ref
		copy(ref[:], r)
		creq.Refs = append(creq.Refs, ref)
	}
	a, err := s.cfg.Claimer.ServeClaim(ctx, creq)
	var taken []*pb.ClaimNotice
	if req.OwnedOnly {
		for _, n := range a.Taken[:min(len(a.Taken), MaxOwnerRefs)] {
			taken = append(taken, pb.FromClaim(n))
		}
	}
	var ra interface{ RetryAfter() time.Duration }
	switch {
	case err == nil && a.Bundle != nil && a.Notice != nil && len(a.Bundle.Payload) <= protocol.MaxPayloadSize:
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&a.Bundle.Bundle)},
			LastResort: a.LastResort, Claim: pb.FromClaim(a.Notice), Taken: taken}
	case err == nil:
		s.log.Warn("fetch: claimer answered no bundle, no claim notice or an oversized bundle", "device", key)
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_INTERNAL}
	case errors.As(err, &ra):
		ms := max(ra.RetryAfter().Milliseconds(), 1)
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_RATE_LIMITED, Error: "rate limited",
			RetryAfterMs: uint32(min(ms, int64(MaxRetryAfter/time.Millisecond)))}
	case errors.Is(err, storage.ErrNotFound), errors.Is(err, ErrNoRecord):
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND, Taken: taken}
	case errors.Is(err, ErrNotHeld):
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_HOLDER}
	}
	s.log.Warn("fetch: claim failed", "peer", from, "device", key, "err", err)
	return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_INTERNAL}
}

// checkRefs checks an owner request's refs: only with KIND_CLAIM
// owned_only, at most MaxOwnerRefs, each 32 bytes, distinct.
func checkRefs(req *pb.FetchRequest) string {
	if len(req.Refs) == 0 {
		return ""
	}
	if req.Kind != pb.FetchRequest_KIND_CLAIM || !req.OwnedOnly {
		return "refs only name an owner request's refs (KIND_CLAIM, owned_only)"
	}
	if len(req.Refs) > MaxOwnerRefs {
		return fmt.Sprintf("at most %d refs", MaxOwnerRefs)
	}
	seen := make(map[protocol.Ref]bool, len(req.Refs))
	for _, r := range req.Refs {
		if len(r) != protocol.RefSize {
			return "refs must be 32 bytes"
		}
		ref := protocol.Ref(r)
		if seen[ref] {
			return "refs must be distinct"
		}
		seen[ref] = true
	}
	return ""
}

func clampU32(n int) uint32 { return uint32(min(max(n, 0), 1<<32-1)) }
