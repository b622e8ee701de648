package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"
	"golang.org/x/sync/semaphore"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/ed25519strict"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Fetch protocol limits (protocol/README.md, "Fetch").
//
// A request is a kind and a 32-byte key: its encoded FetchRequest (the
// length prefix not counted) is at most maxFetchRequest bytes, and anything
// longer is hostile. A response's encoded FetchResponse is at most
// maxFetchResponse bytes: KIND_ALL answers the newest bundles that fit and
// says in error that it cut the rest. A requester reads at most
// maxFetchResponse bytes, so a responder can never make it allocate more.
const (
	maxFetchRequest  = 256
	maxFetchResponse = 1 << 20
	fetchTimeout     = 5 * time.Second
	// maxBundleWire bounds one encoded bundle or account bundle inside a
	// FetchResponse: the payload cap plus its key, signature, field tags
	// and length prefixes (104 bytes), rounded up.
	maxBundleWire = protocol.MaxPayloadSize + 128
	// fetchResponseReserve is what a response needs besides its bundles:
	// the status and the error text that says it was cut.
	fetchResponseReserve = 256
)

// Fetch response budgets: bytes of responses in flight, node-wide. A
// request acquires its worst case (the store's read plus the encoded
// answer) before touching the store, and is answered STATUS_BUSY when the
// budget cannot cover it, so a flood of requests costs at most the budget
// in memory. KIND_ALL and the point kinds (LATEST, ACCOUNT) have separate
// budgets, so a flood of KIND_ALL never starves the lookups nodes rely on.
// Point requests weigh 128 KiB (128 at once); a KIND_ALL weighs what the
// store reads for it (at most maxFetchResponse of payloads plus one more
// bundle, storage.BundlesUpTo) plus the encoded answer, about 2.1 MiB (7
// at once).
const (
	fetchBulkBudget  = 16 << 20
	fetchPointBudget = 16 << 20
	// pointWeight: a stored record plus its encoded answer.
	pointWeight = 2 * maxBundleWire
)

// DefaultStreamTimeout bounds a served fetch or sync stream.
const DefaultStreamTimeout = 10 * time.Second

// fetchService serves and issues fetch requests. It owns its handlers:
// each derives its context from the service's, and close waits for them.
type fetchService struct {
	n     *Node
	h     host.Host
	proto p2pprotocol.ID
	log   *slog.Logger

	ctx    context.Context // the service's lifetime; cancelled by close
	cancel context.CancelFunc

	bulk, point *semaphore.Weighted
	allWeight   int64 // what one KIND_ALL may allocate
	inflight    atomic.Int64
	peak        atomic.Int64 // high-water mark of inflight (tests, metrics)

	mu     sync.Mutex // guards closed and wg.Add
	closed bool
	wg     sync.WaitGroup
}

func startFetch(n *Node, h host.Host) *fetchService {
	ctx, cancel := context.WithCancel(n.runCtx)
	f := &fetchService{n: n, h: h, proto: p2pprotocol.ID(protocol.FetchProtocol(n.netID)),
		log: n.log.With("component", "fetch"), ctx: ctx, cancel: cancel}
	// The store stops reading at the response cap (storage.BundlesUpTo), so
	// a KIND_ALL holds at most that much read plus the encoded answer.
	f.allWeight = 2*maxFetchResponse + maxBundleWire
	f.bulk = semaphore.NewWeighted(max(fetchBulkBudget, f.allWeight))
	f.point = semaphore.NewWeighted(fetchPointBudget)
	n.metrics.fetchInflight(f.inflight.Load)
	h.SetStreamHandler(f.proto, f.handle)
	return f
}

// close stops serving: no new stream is handled, streams in flight are
// reset, and close returns once every handler has returned.
func (f *fetchService) close() {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	f.h.RemoveStreamHandler(f.proto)
	f.cancel()
	f.wg.Wait()
}

// handle serves one request on one stream: it reads one length-prefixed
// FetchRequest, answers it and closes the stream. Bytes after the first
// request are discarded unread. Truncated, oversized, undecodable or slow
// requests reset the stream; the node keeps serving others.
func (f *fetchService) handle(s network.Stream) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		_ = s.Reset()
		return
	}
	f.wg.Add(1)
	f.mu.Unlock()
	defer f.wg.Done()
	// A panic on hostile input ends this stream, never the process.
	defer func() {
		if r := recover(); r != nil {
			f.log.Error("fetch: handler panicked", "peer", s.Conn().RemotePeer(), "panic", r, "stack", string(debug.Stack()))
			_ = s.Reset()
		}
	}()

	deadline := time.Now().Add(f.n.cfg.StreamTimeout)
	_ = s.SetDeadline(deadline)
	ctx, cancel := context.WithDeadline(f.ctx, deadline)
	defer cancel()
	// Closing the service (or the deadline) must also end a blocked read.
	stop := context.AfterFunc(ctx, func() { _ = s.Reset() })
	defer stop()

	var req pb.FetchRequest
	if err := pbio.NewDelimitedReader(s, maxFetchRequest).ReadMsg(&req); err != nil {
		f.log.Debug("fetch: bad request", "peer", s.Conn().RemotePeer(), "err", err)
		f.n.metrics.fetchServed("bad_request")
		_ = s.Reset()
		return
	}
	resp, release := f.serve(ctx, &req)
	defer release()
	f.n.metrics.fetchServed(statusLabel(resp.Status))
	if err := pbio.NewDelimitedWriter(s).WriteMsg(resp); err != nil {
		f.log.Debug("fetch: write response", "peer", s.Conn().RemotePeer(), "err", err)
		_ = s.Reset()
		return
	}
	if stop() {
		_ = s.Close()
	}
}

// acquire takes n bytes of sem's budget, or reports false at once.
func (f *fetchService) acquire(sem *semaphore.Weighted, n int64) (release func(), ok bool) {
	if !sem.TryAcquire(n) {
		return func() {}, false
	}
	cur := f.inflight.Add(n)
	for {
		p := f.peak.Load()
		if cur <= p || f.peak.CompareAndSwap(p, cur) {
			break
		}
	}
	return func() { f.inflight.Add(-n); sem.Release(n) }, true
}

func statusLabel(s pb.FetchResponse_Status) string {
	switch s {
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
	}
	return "internal"
}

var busy = &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BUSY, Error: "fetch budget exhausted; retry later"}

// serve answers from the store alone, within the response budgets. It
// checks, in order: the kind (KIND_UNSPECIFIED or unknown: BAD_REQUEST),
// the key's length (BAD_REQUEST), that it is an Ed25519 point (else
// NOT_FOUND or NOT_HOLDER at once), then the budget (BUSY). release returns the budget once the answer is written.
func (f *fetchService) serve(ctx context.Context, req *pb.FetchRequest) (resp *pb.FetchResponse, release func()) {
	release = func() {}
	badRequest := func(msg string) (*pb.FetchResponse, func()) {
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BAD_REQUEST, Error: msg}, release
	}
	switch req.Kind {
	case pb.FetchRequest_KIND_LATEST, pb.FetchRequest_KIND_ALL, pb.FetchRequest_KIND_ACCOUNT:
	default:
		return badRequest("unknown request kind")
	}
	if len(req.Key) != protocol.KeySize {
		return badRequest("key must be 32 bytes")
	}
	var key protocol.Key
	copy(key[:], req.Key)
	notFound := func() *pb.FetchResponse {
		if f.n.cfg.Shards.HasKey(key) {
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
		f.log.Warn("fetch: store failed", "err", err)
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_INTERNAL}
	}
	sem, weight := f.point, int64(pointWeight)
	if req.Kind == pb.FetchRequest_KIND_ALL {
		sem, weight = f.bulk, f.allWeight
	}
	release, ok := f.acquire(sem, weight)
	if !ok {
		return busy, release
	}
	switch req.Kind {
	case pb.FetchRequest_KIND_LATEST:
		b, err := f.n.store.LatestBundle(ctx, key)
		if errors.Is(err, storage.ErrNotFound) || (err == nil && len(b.Payload) > protocol.MaxPayloadSize) {
			return notFound(), release
		} else if err != nil {
			return internal(err), release
		}
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}}, release
	case pb.FetchRequest_KIND_ALL:
		bs, cut, err := f.n.store.BundlesUpTo(ctx, key, maxFetchResponse)
		if err != nil {
			return internal(err), release
		}
		if len(bs) == 0 && !cut {
			return notFound(), release
		}
		return allResponse(bs, cut), release
	default: // KIND_ACCOUNT
		a, err := f.n.store.Account(ctx, key)
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

// allResponse answers KIND_ALL: bundles newest first (the store's order),
// as many as fit in maxFetchResponse encoded bytes. When it leaves some
// out (or the store stopped reading, cut), error says "truncated: N
// bundles" ("truncated: N of M bundles" when M, all it read, is known).
func allResponse(bs []*storage.Bundle, cut bool) *pb.FetchResponse {
	resp := &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK}
	size := fetchResponseReserve
	for _, b := range bs {
		if len(b.Payload) > protocol.MaxPayloadSize {
			continue // stored before the cap; no peer would accept it
		}
		m := pb.FromBundle(&b.Bundle)
		n := proto.Size(m)
		if size += 1 + protowire.SizeVarint(uint64(n)) + n; size > maxFetchResponse {
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

// errNotHeld: the peer does not hold the key's shard; errNoRecord: it holds
// the shard and has no record.
var (
	errNotHeld  = errors.New("peer does not hold the shard")
	errNoRecord = errors.New("no record")
	errBusy     = errors.New("peer is busy")
)

// request sends one request to p and reads its response, within ctx and
// fetchTimeout.
func (f *fetchService) request(ctx context.Context, p peer.ID, req *pb.FetchRequest) (*pb.FetchResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	s, err := f.h.NewStream(ctx, p, f.proto)
	if err != nil {
		return nil, fmt.Errorf("open stream to %s: %w", p, err)
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	// A cancelled ctx must also end a read blocked on a slow peer.
	stop := context.AfterFunc(ctx, func() { _ = s.Reset() })
	defer stop()
	if err := pbio.NewDelimitedWriter(s).WriteMsg(req); err != nil {
		_ = s.Reset()
		return nil, fmt.Errorf("send request to %s: %w", p, err)
	}
	if err := s.CloseWrite(); err != nil {
		_ = s.Reset()
		return nil, err
	}
	var resp pb.FetchResponse
	if err := pbio.NewDelimitedReader(s, maxFetchResponse).ReadMsg(&resp); err != nil {
		_ = s.Reset()
		return nil, fmt.Errorf("read response from %s: %w", p, err)
	}
	switch resp.Status {
	case pb.FetchResponse_STATUS_OK:
		return &resp, nil
	case pb.FetchResponse_STATUS_NOT_FOUND:
		return nil, errNoRecord
	case pb.FetchResponse_STATUS_NOT_HOLDER:
		return nil, errNotHeld
	case pb.FetchResponse_STATUS_BUSY:
		return nil, fmt.Errorf("%w: %s", errBusy, p)
	}
	return nil, fmt.Errorf("peer %s answered %s: %s", p, resp.Status, resp.Error)
}

// fetchLatest asks p for a device's latest bundle and validates it fully
// (the same rules as every other path) before returning it.
func (f *fetchService) fetchLatest(ctx context.Context, p peer.ID, device protocol.Key) (*protocol.Bundle, protocol.BundleInfo, error) {
	resp, err := f.request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: device[:]})
	if err != nil {
		return nil, protocol.BundleInfo{}, err
	}
	if len(resp.Bundles) != 1 {
		return nil, protocol.BundleInfo{}, fmt.Errorf("%w: %d bundles for a latest request", protocol.ErrMalformed, len(resp.Bundles))
	}
	b, err := pb.ToBundle(resp.Bundles[0])
	if err != nil {
		return nil, protocol.BundleInfo{}, err
	}
	if b.DeviceID != device {
		return nil, protocol.BundleInfo{}, fmt.Errorf("%w: asked for %s, got %s", protocol.ErrMalformed, device, b.DeviceID)
	}
	info, err := f.n.cfg.Policy.ValidateBundle(b, f.n.cfg.Now())
	if err != nil {
		f.n.metrics.bundleRejected(sourceFetch, protocol.RuleOf(err))
		return nil, info, fmt.Errorf("bundle from %s: %w", p, err)
	}
	return b, info, nil
}

// fetchAccount asks p for an account bundle and validates it.
func (f *fetchService) fetchAccount(ctx context.Context, p peer.ID, account protocol.Key) (*protocol.AccountBundle, uint64, int64, error) {
	resp, err := f.request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: account[:]})
	if err != nil {
		return nil, 0, 0, err
	}
	a, err := pb.ToAccount(resp.Account)
	if err != nil {
		return nil, 0, 0, err
	}
	if a.AccountPub != account {
		return nil, 0, 0, fmt.Errorf("%w: asked for %s, got %s", protocol.ErrMalformed, account, a.AccountPub)
	}
	lamport, err := f.n.cfg.Policy.ValidateAccount(a)
	if err != nil {
		f.n.metrics.accountRejected(sourceFetch, protocol.RuleOf(err))
		return nil, 0, 0, fmt.Errorf("account bundle from %s: %w", p, err)
	}
	return a, lamport, resp.Account.UpdatedAtMs, nil
}

// FetchLatest asks peer p for a device's latest bundle over the fetch
// protocol and validates it; it does not store or cache it.
func (n *Node) FetchLatest(ctx context.Context, p peer.ID, device protocol.Key) (*protocol.Bundle, error) {
	b, _, err := n.fetch.fetchLatest(ctx, p, device)
	return b, err
}
