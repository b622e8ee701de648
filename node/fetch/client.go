package fetch

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// DefaultTimeout bounds one request: opening the stream, sending the
// request and reading the answer.
const DefaultTimeout = 5 * time.Second

// ClientConfig configures a Client. Zero fields take the defaults.
type ClientConfig struct {
	// Protocol is the fetch protocol ID (protocol.FetchProtocol(netID)).
	Protocol p2pprotocol.ID
	// Opener opens streams to peers (host.Host).
	Opener StreamOpener
	// Validator checks every record a peer serves.
	Validator Validator
	// Timeout bounds one request. Default DefaultTimeout.
	Timeout time.Duration
	// Consumed, if set, gets the consume notices of the device asked that
	// a KIND_LATEST, KIND_ALL or KIND_CLAIM answer (OK or NOT_FOUND)
	// carries: at most MaxConsumed, decoded, of that device, not verified
	// (the node's ingest path validates them and its store tombstones the
	// refs and deletes its own copies). It runs before Request returns, so
	// the caller sees their effect on the store.
	Consumed func(ctx context.Context, p peer.ID, notices []*protocol.ConsumeNotice)
}

// Validate reports whether c (with its defaults) is usable.
func (c ClientConfig) Validate() error {
	switch {
	case c.Protocol == "":
		return errors.New("fetch client: protocol ID is required")
	case c.Opener == nil:
		return errors.New("fetch client: stream opener is required")
	case c.Validator == nil:
		return errors.New("fetch client: validator is required")
	case c.Timeout < 0:
		return fmt.Errorf("fetch client: timeout must be positive, got %v", c.Timeout)
	}
	return nil
}

// Client asks peers for records over the fetch protocol. It holds no
// state besides its configuration and starts no goroutine.
type Client struct {
	cfg ClientConfig
}

// NewClient builds a Client.
func NewClient(cfg ClientConfig) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	return &Client{cfg: cfg}, nil
}

// Request sends one request to p and reads its response, within ctx and
// the client's timeout; it reads at most MaxResponse bytes. Only an OK
// answer is returned; NOT_FOUND is ErrNoRecord, NOT_HOLDER ErrNotHeld, BUSY
// ErrBusy (wrapped), RATE_LIMITED a *RateLimitError (ErrRateLimited),
// anything else an error naming the status. The records
// in an OK answer are not verified: FetchLatest and FetchAccount do that.
func (c *Client) Request(ctx context.Context, p peer.ID, req *pb.FetchRequest) (*pb.FetchResponse, error) {
	resp, err := c.roundTrip(ctx, p, req)
	if err != nil {
		return nil, err
	}
	return resp, statusError(p, resp)
}

// roundTrip sends req to p and reads its response, whatever its status.
func (c *Client) roundTrip(ctx context.Context, p peer.ID, req *pb.FetchRequest) (*pb.FetchResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	s, err := c.cfg.Opener.NewStream(ctx, p, c.cfg.Protocol)
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
		return nil, fmt.Errorf("send request to %s: %w", p, err)
	}
	var resp pb.FetchResponse
	if err := pbio.NewDelimitedReader(s, MaxResponse).ReadMsg(&resp); err != nil {
		_ = s.Reset()
		return nil, fmt.Errorf("read response from %s: %w", p, err)
	}
	c.deliverConsumed(ctx, p, req, &resp)
	return &resp, nil
}

// statusError is the error a response's status means (nil for OK).
func statusError(p peer.ID, resp *pb.FetchResponse) error {
	switch resp.Status {
	case pb.FetchResponse_STATUS_OK:
		return nil
	case pb.FetchResponse_STATUS_NOT_FOUND:
		return ErrNoRecord
	case pb.FetchResponse_STATUS_NOT_HOLDER:
		return ErrNotHeld
	case pb.FetchResponse_STATUS_BUSY:
		return fmt.Errorf("%w: %s", ErrBusy, p)
	case pb.FetchResponse_STATUS_RATE_LIMITED:
		after := min(time.Duration(resp.RetryAfterMs)*time.Millisecond, MaxRetryAfter)
		return &RateLimitError{Peer: p, After: max(after, time.Millisecond)}
	}
	return fmt.Errorf("peer %s answered %s: %s", p, resp.Status, resp.Error)
}

// deliverConsumed hands the consume notices of the device req asked for
// that resp carries to cfg.Consumed. Notices of another device, undecodable
// ones and any beyond MaxConsumed are dropped.
func (c *Client) deliverConsumed(ctx context.Context, p peer.ID, req *pb.FetchRequest, resp *pb.FetchResponse) {
	if c.cfg.Consumed == nil || len(resp.Consumed) == 0 || len(req.Key) != protocol.KeySize {
		return
	}
	switch req.Kind {
	case pb.FetchRequest_KIND_LATEST, pb.FetchRequest_KIND_ALL, pb.FetchRequest_KIND_CLAIM:
	default:
		return
	}
	if resp.Status != pb.FetchResponse_STATUS_OK && resp.Status != pb.FetchResponse_STATUS_NOT_FOUND {
		return
	}
	var dev protocol.Key
	copy(dev[:], req.Key)
	var ns []*protocol.ConsumeNotice
	for _, m := range resp.Consumed[:min(len(resp.Consumed), MaxConsumed)] {
		n, err := pb.ToConsume(m)
		if err != nil || n.DeviceID != dev {
			continue
		}
		ns = append(ns, n)
	}
	if len(ns) > 0 {
		c.cfg.Consumed(ctx, p, ns)
	}
}

// FetchLatest asks p for a device's latest bundle and validates it fully
// (the same rules as every other path) before returning it with what
// validation derived (ReceivedAtMS is left zero). A bundle of another
// device, or more or fewer than one, is protocol.ErrMalformed.
func (c *Client) FetchLatest(ctx context.Context, p peer.ID, device protocol.Key) (*storage.Bundle, error) {
	resp, err := c.Request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: device[:]})
	if err != nil {
		return nil, err
	}
	if len(resp.Bundles) != 1 {
		return nil, fmt.Errorf("%w: %d bundles for a latest request", protocol.ErrMalformed, len(resp.Bundles))
	}
	b, err := pb.ToBundle(resp.Bundles[0])
	if err != nil {
		return nil, err
	}
	if b.DeviceID != device {
		return nil, fmt.Errorf("%w: asked for %s, got %s", protocol.ErrMalformed, device, b.DeviceID)
	}
	info, err := c.cfg.Validator.ValidateBundle(b)
	if err != nil {
		return nil, fmt.Errorf("bundle from %s: %w", p, err)
	}
	return &storage.Bundle{Bundle: *b, BundleInfo: info}, nil
}

// FetchAccount asks p for an account bundle and validates it. UpdatedAtMS
// is what the holder says (0 if it says nothing).
func (c *Client) FetchAccount(ctx context.Context, p peer.ID, account protocol.Key) (*storage.Account, error) {
	resp, err := c.Request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: account[:]})
	if err != nil {
		return nil, err
	}
	a, err := pb.ToAccount(resp.Account)
	if err != nil {
		return nil, err
	}
	if a.AccountPub != account {
		return nil, fmt.Errorf("%w: asked for %s, got %s", protocol.ErrMalformed, account, a.AccountPub)
	}
	lamport, err := c.cfg.Validator.ValidateAccount(a)
	if err != nil {
		return nil, fmt.Errorf("account bundle from %s: %w", p, err)
	}
	return &storage.Account{AccountBundle: *a, Lamport: lamport, UpdatedAtMS: resp.Account.UpdatedAtMs}, nil
}

// Claim asks p to hand out one bundle of dev (KIND_CLAIM): of cipher suite
// suite (0: any); with ownedOnly only one p owns in its own view (OwnerClaim
// names the refs). It validates the bundle fully, checks its suite when the
// key_package names one, and checks that the claim notice p answered with
// names that bundle (its signature is the ingest path's to verify).
// NOT_FOUND is ErrNoRecord; RATE_LIMITED a *RateLimitError.
func (c *Client) Claim(ctx context.Context, p peer.ID, dev protocol.Key, suite uint16, ownedOnly bool) (*storage.Bundle, bool, *protocol.ClaimNotice, error) {
	resp, err := c.Request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_CLAIM, Key: dev[:], CipherSuite: uint32(suite), OwnedOnly: ownedOnly})
	if err != nil {
		return nil, false, nil, err
	}
	b, n, err := c.claimed(p, dev, suite, resp)
	if err != nil {
		return nil, false, nil, err
	}
	return b, resp.LastResort, n, nil
}

// OwnerAnswer is an owner's answer to an owner request (OwnerClaim).
type OwnerAnswer struct {
	// Bundle, one of the named refs, and the owner's claim notice of it;
	// nil when the owner answered NOT_FOUND.
	Bundle *storage.Bundle
	Notice *protocol.ClaimNotice
	// Taken are the claim notices the owner holds for named refs it could
	// not hand out (layout checked: dev's, a named ref each, distinct; the
	// ingest path verifies their signatures).
	Taken []*protocol.ClaimNotice
}

// OwnerClaim asks p, the owner of refs (at most MaxOwnerRefs, distinct,
// in the order to try them) in this node's view, to hand out one of them
// (KIND_CLAIM owned_only). An OK answer must be a one-time bundle of one
// named ref with its claim notice; an answer of either status may carry
// proof that named refs are taken. NOT_FOUND is ErrNoRecord, with the
// answer's Taken; RATE_LIMITED a *RateLimitError; BUSY ErrBusy; an answer
// that breaks these rules protocol.ErrMalformed.
func (c *Client) OwnerClaim(ctx context.Context, p peer.ID, dev protocol.Key, suite uint16, refs []protocol.Ref) (OwnerAnswer, error) {
	if len(refs) == 0 || len(refs) > MaxOwnerRefs {
		return OwnerAnswer{}, fmt.Errorf("fetch: an owner request names 1 to %d refs, not %d", MaxOwnerRefs, len(refs))
	}
	req := &pb.FetchRequest{Kind: pb.FetchRequest_KIND_CLAIM, Key: dev[:], CipherSuite: uint32(suite), OwnedOnly: true}
	named := make(map[protocol.Ref]bool, len(refs))
	for _, r := range refs {
		req.Refs = append(req.Refs, r[:])
		named[r] = true
	}
	resp, err := c.roundTrip(ctx, p, req)
	if err != nil {
		return OwnerAnswer{}, err
	}
	var a OwnerAnswer
	if len(resp.Taken) > len(refs) {
		return OwnerAnswer{}, fmt.Errorf("%w: %d taken notices for %d refs", protocol.ErrMalformed, len(resp.Taken), len(refs))
	}
	for _, m := range resp.Taken {
		n, err := pb.ToClaim(m)
		if err != nil {
			return OwnerAnswer{}, err
		}
		_, ndev, ref, err := protocol.DecodeClaimPayload(n.Payload)
		if err != nil {
			return OwnerAnswer{}, err
		}
		if ndev != dev || !named[ref] {
			return OwnerAnswer{}, fmt.Errorf("%w: a taken notice names a ref not asked for", protocol.ErrMalformed)
		}
		named[ref] = false // each ref once
		a.Taken = append(a.Taken, n)
	}
	switch resp.Status {
	case pb.FetchResponse_STATUS_OK:
	case pb.FetchResponse_STATUS_NOT_FOUND:
		if len(resp.Bundles) != 0 || resp.Claim != nil {
			return OwnerAnswer{}, fmt.Errorf("%w: a NOT_FOUND answer with a bundle", protocol.ErrMalformed)
		}
		return a, ErrNoRecord
	default:
		return OwnerAnswer{}, statusError(p, resp)
	}
	if resp.LastResort {
		return OwnerAnswer{}, fmt.Errorf("%w: the last-resort bundle for an owner request", protocol.ErrMalformed)
	}
	b, n, err := c.claimed(p, dev, suite, resp)
	if err != nil {
		return OwnerAnswer{}, err
	}
	if !named[b.Ref] {
		return OwnerAnswer{}, fmt.Errorf("%w: handed out a ref not asked for, or one it proved taken", protocol.ErrMalformed)
	}
	if b.LastResort {
		return OwnerAnswer{}, fmt.Errorf("%w: a last-resort bundle for an owner request", protocol.ErrMalformed)
	}
	a.Bundle, a.Notice = b, n
	return a, nil
}

// claimed checks an OK claim answer: one bundle of dev, valid, of suite
// when its key_package names one, and a claim notice naming it.
func (c *Client) claimed(p peer.ID, dev protocol.Key, suite uint16, resp *pb.FetchResponse) (*storage.Bundle, *protocol.ClaimNotice, error) {
	if len(resp.Bundles) != 1 {
		return nil, nil, fmt.Errorf("%w: %d bundles for a claim", protocol.ErrMalformed, len(resp.Bundles))
	}
	b, err := pb.ToBundle(resp.Bundles[0])
	if err != nil {
		return nil, nil, err
	}
	if b.DeviceID != dev {
		return nil, nil, fmt.Errorf("%w: claimed for %s, got %s", protocol.ErrMalformed, dev, b.DeviceID)
	}
	info, err := c.cfg.Validator.ValidateBundle(b)
	if err != nil {
		return nil, nil, fmt.Errorf("claimed bundle from %s: %w", p, err)
	}
	if suite != 0 {
		if _, kp, err := protocol.SplitBundlePayload(b.Payload); err == nil {
			if got, ok := protocol.KeyPackageCipherSuite(kp); ok && got != suite {
				return nil, nil, fmt.Errorf("%w: claimed cipher suite %d, got %d", protocol.ErrMalformed, suite, got)
			}
		}
	}
	if resp.Claim == nil {
		return nil, nil, fmt.Errorf("%w: a claim answer without its claim notice", protocol.ErrMalformed)
	}
	n, err := pb.ToClaim(resp.Claim)
	if err != nil {
		return nil, nil, err
	}
	_, ndev, ref, err := protocol.DecodeClaimPayload(n.Payload)
	if err != nil {
		return nil, nil, err
	}
	if ndev != dev || ref != info.Ref {
		return nil, nil, fmt.Errorf("%w: the claim notice names another bundle", protocol.ErrMalformed)
	}
	return &storage.Bundle{Bundle: *b, BundleInfo: info}, n, nil
}

// Count asks p for dev's claim counts (KIND_COUNT).
func (c *Client) Count(ctx context.Context, p peer.ID, dev protocol.Key) (storage.ClaimCounts, error) {
	resp, err := c.Request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_COUNT, Key: dev[:]})
	if err != nil {
		return storage.ClaimCounts{}, err
	}
	if resp.Counts == nil {
		return storage.ClaimCounts{}, fmt.Errorf("%w: a count answer without counts", protocol.ErrMalformed)
	}
	return storage.ClaimCounts{OneTime: int(resp.Counts.OneTime), LastResort: int(resp.Counts.LastResort),
		LastResortHandedOut: int64(min(resp.Counts.LastResortHandedOut, 1<<63-1))}, nil
}
