package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Fetch protocol limits. A request is a kind and a 32-byte key; anything
// over maxFetchRequest is hostile. A response holds at most MaxPerDevice
// bundles of at most the API's 1 MiB body each, but a requester caps what it
// reads at maxFetchResponse and treats more as a failed fetch.
const (
	maxFetchRequest  = 256
	maxFetchResponse = 8 << 20
	fetchTimeout     = 5 * time.Second
)

// DefaultStreamTimeout bounds a served fetch or sync stream.
const DefaultStreamTimeout = 10 * time.Second

// fetchService serves and issues fetch requests.
type fetchService struct {
	n     *Node
	h     host.Host
	proto p2pprotocol.ID
	log   *slog.Logger
}

func startFetch(n *Node, h host.Host) *fetchService {
	f := &fetchService{n: n, h: h, proto: p2pprotocol.ID(protocol.FetchProtocol(n.netID)), log: n.log.With("component", "fetch")}
	h.SetStreamHandler(f.proto, f.handle)
	return f
}

func (f *fetchService) close() { f.h.RemoveStreamHandler(f.proto) }

// handle serves one request on one stream. Truncated, oversized or slow
// requests end the stream; the node keeps serving others.
func (f *fetchService) handle(s network.Stream) {
	defer s.Close()
	start := time.Now()
	deadline := start.Add(f.n.cfg.StreamTimeout)
	_ = s.SetDeadline(deadline)
	var req pb.FetchRequest
	r := pbio.NewDelimitedReader(s, maxFetchRequest)
	if err := r.ReadMsg(&req); err != nil {
		f.log.Debug("fetch: bad request", "peer", s.Conn().RemotePeer(), "err", err)
		f.n.metrics.fetchServed("bad_request")
		_ = s.Reset()
		return
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	resp := f.serve(ctx, &req)
	f.n.metrics.fetchServed(statusLabel(resp.Status))
	if err := pbio.NewDelimitedWriter(s).WriteMsg(resp); err != nil {
		f.log.Debug("fetch: write response", "peer", s.Conn().RemotePeer(), "err", err)
		_ = s.Reset()
	}
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

// serve answers from the store alone.
func (f *fetchService) serve(ctx context.Context, req *pb.FetchRequest) *pb.FetchResponse {
	if len(req.Key) != protocol.KeySize {
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BAD_REQUEST, Error: "key must be 32 bytes"}
	}
	var key protocol.Key
	copy(key[:], req.Key)
	notFound := func() *pb.FetchResponse {
		if f.n.cfg.Shards.HasKey(key) {
			return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND}
		}
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_HOLDER}
	}
	internal := func(err error) *pb.FetchResponse {
		f.log.Warn("fetch: store failed", "err", err)
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_INTERNAL}
	}
	switch req.Kind {
	case pb.FetchRequest_KIND_LATEST:
		b, err := f.n.store.LatestBundle(ctx, key)
		if errors.Is(err, storage.ErrNotFound) {
			return notFound()
		} else if err != nil {
			return internal(err)
		}
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{storedBundleToPB(b)}}
	case pb.FetchRequest_KIND_ALL:
		bs, err := f.n.store.Bundles(ctx, key)
		if err != nil {
			return internal(err)
		}
		if len(bs) == 0 {
			return notFound()
		}
		// Newest first, up to what a requester reads; the oldest are left out.
		resp := &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK}
		size := 0
		for _, b := range bs {
			if size += len(b.Payload) + 128; size > maxFetchResponse-(64<<10) {
				break
			}
			resp.Bundles = append(resp.Bundles, storedBundleToPB(b))
		}
		return resp
	case pb.FetchRequest_KIND_ACCOUNT:
		a, err := f.n.store.Account(ctx, key)
		if errors.Is(err, storage.ErrNotFound) {
			return notFound()
		} else if err != nil {
			return internal(err)
		}
		return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Account: &pb.AccountBundle{
			AccountPub: a.AccountPub[:], Payload: a.Payload, Signature: a.Signature[:], UpdatedAtMs: a.UpdatedAtMS}}
	}
	return &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BAD_REQUEST, Error: "unknown request kind"}
}

func storedBundleToPB(b *storage.Bundle) *pb.Bundle {
	return &pb.Bundle{DeviceId: b.DeviceID[:], Payload: b.Payload, Signature: b.Signature[:]}
}

// errNotHeld: the peer does not hold the key's shard; errNoRecord: it holds
// the shard and has no record.
var (
	errNotHeld  = errors.New("peer does not hold the shard")
	errNoRecord = errors.New("no record")
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
		return nil, protocol.BundleInfo{}, fmt.Errorf("%w: %d bundles for a latest request", errMalformed, len(resp.Bundles))
	}
	b, err := bundleFromPB(resp.Bundles[0])
	if err != nil {
		return nil, protocol.BundleInfo{}, err
	}
	if b.DeviceID != device {
		return nil, protocol.BundleInfo{}, fmt.Errorf("%w: asked for %s, got %s", errMalformed, device, b.DeviceID)
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
	a, err := accountFromPB(resp.Account)
	if err != nil {
		return nil, 0, 0, err
	}
	if a.AccountPub != account {
		return nil, 0, 0, fmt.Errorf("%w: asked for %s, got %s", errMalformed, account, a.AccountPub)
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
