// Package fetch is the fetch protocol (/kpnode/{network}/fetch/1.0.0,
// protocol/README.md "Fetch"): one length-prefixed FetchRequest and one
// FetchResponse per stream. The Server answers from a Store it declares
// (only the reads it makes) within response budgets; the Client asks a peer
// over a StreamOpener and verifies every record it gets before returning it.
// Neither knows the node: both work on one stream at a time, so tests run
// them over net.Pipe (see package fetchtest).
package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Protocol limits (protocol/README.md, "Fetch").
//
// A request is a kind and a 32-byte key (an owner request also names up
// to MaxOwnerRefs refs): its encoded FetchRequest (the length prefix not
// counted) is at most MaxRequest bytes, and anything longer is hostile. A response's encoded FetchResponse is at most
// MaxResponse bytes: KIND_ALL answers the newest bundles that fit and says
// in error that it cut the rest. A requester reads at most MaxResponse
// bytes, so a responder can never make it allocate more.
const (
	MaxRequest = 640
	// MaxOwnerRefs bounds the refs an owner request (KIND_CLAIM with
	// owned_only) names, and so the claim notices its answer proves taken.
	MaxOwnerRefs = 16
	MaxResponse  = 1 << 20
	// MaxBundleWire bounds one encoded bundle or account bundle inside a
	// FetchResponse: the payload cap plus its key, signature, field tags
	// and length prefixes (104 bytes), rounded up.
	MaxBundleWire = protocol.MaxPayloadSize + 128
	// ResponseReserve is what a response needs besides its bundles: the
	// status and the error text that says it was cut.
	ResponseReserve = 256
	// MaxConsumed bounds the consume notices of the device asked that an
	// answer carries (newest first), MaxConsumedWire their encoded bytes
	// (the newest notice that does not fit, and every older one, is left
	// out). A requester reads no more than MaxConsumed of them.
	MaxConsumed     = 16
	MaxConsumedWire = 32 << 10
)

// Sentinels of a request's outcome, for callers that branch on them.
var (
	// ErrNotHeld: the peer does not hold the key's shard (NOT_HOLDER).
	ErrNotHeld = ingest.ErrNotHeld
	// ErrNoRecord: the peer holds the shard and has no record (NOT_FOUND).
	ErrNoRecord = ingest.ErrNoRecord
	// ErrBusy: the peer's fetch budget is spent (BUSY); retry later.
	ErrBusy = errors.New("peer is busy")
	// ErrRateLimited: a claim is over the peer's per-requester or
	// per-device limit (RATE_LIMITED); the error is a *RateLimitError.
	ErrRateLimited = errors.New("rate limited")
)

// MaxRetryAfter caps the retry_after_ms a client believes, so a peer cannot
// make its caller wait for long.
const MaxRetryAfter = time.Minute

// RateLimitError is a RATE_LIMITED answer: when to ask again.
type RateLimitError struct {
	Peer  peer.ID
	After time.Duration
}

func (e *RateLimitError) Error() string {
	return fmt.Sprintf("peer %s: rate limited; retry after %v", e.Peer, e.After)
}

// Is matches ErrRateLimited.
func (e *RateLimitError) Is(target error) bool { return target == ErrRateLimited }

// RetryAfter says when to ask again.
func (e *RateLimitError) RetryAfter() time.Duration { return e.After }

// ClaimRequest is a KIND_CLAIM as the Claimer gets it.
type ClaimRequest struct {
	// Peer asked (the requester of the per-requester limit).
	Peer   peer.ID
	Device protocol.Key
	// Suite selects bundles of one MLS cipher suite; 0: any.
	Suite uint16
	// OwnedOnly: a holder asks this node as an owner. Refs are the refs
	// (at most MaxOwnerRefs, distinct) it believes this node owns, in the
	// order to try them; empty: the ones this node owns in its own view.
	OwnedOnly bool
	Refs      []protocol.Ref
}

// ClaimAnswer is what the Claimer hands out.
type ClaimAnswer struct {
	Bundle *storage.Bundle
	// LastResort: the device's last-resort bundle, as the fallback.
	LastResort bool
	// Notice is the claim notice recorded for Bundle.
	Notice *protocol.ClaimNotice
	// Taken (owner requests): the claim notices held for named refs the
	// owner could not hand out, the proof they are taken. A NOT_FOUND
	// answer carries them too.
	Taken []*protocol.ClaimNotice
}

// Claimer serves KIND_CLAIM and KIND_COUNT (the node's claim service).
// ServeClaim hands out one bundle of req.Device to req.Peer: with
// OwnedOnly only a bundle this node owns (of req.Refs when named), else
// the whole claim algorithm. Errors: storage.ErrNotFound (NOT_FOUND; the
// answer's Taken still goes out), ingest.ErrNotHeld (NOT_HOLDER), an
// error with a RetryAfter() time.Duration method (RATE_LIMITED).
type Claimer interface {
	ServeClaim(ctx context.Context, req ClaimRequest) (ClaimAnswer, error)
	Count(ctx context.Context, dev protocol.Key) (storage.ClaimCounts, error)
}

// Stream is the transport of one exchange: a libp2p stream, or one end of
// net.Pipe in tests. A Stream that also has Reset (libp2p streams) is reset
// rather than closed when an exchange fails, so the peer sees the failure.
type Stream interface {
	io.ReadWriter
	SetDeadline(time.Time) error
	Close() error
}

// abort ends a failed exchange: Reset where the stream has it, else Close.
func abort(s Stream) {
	if r, ok := s.(interface{ Reset() error }); ok {
		_ = r.Reset()
		return
	}
	_ = s.Close()
}

// Store is what the Server reads: the methods of *storage.Store it uses.
type Store interface {
	LatestBundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error)
	// BundlesUpTo returns a device's bundles newest first, stopping once
	// their payloads exceed maxBytes (cut reports that it stopped).
	BundlesUpTo(ctx context.Context, device protocol.Key, maxBytes int) (bs []*storage.Bundle, cut bool, err error)
	Account(ctx context.Context, account protocol.Key) (*storage.Account, error)
	// ConsumeNotices returns up to limit of a device's consume notices,
	// newest first.
	ConsumeNotices(ctx context.Context, device protocol.Key, limit int) ([]*protocol.ConsumeNotice, error)
}

// StreamOpener opens a stream to a peer; host.Host satisfies it.
type StreamOpener interface {
	NewStream(ctx context.Context, p peer.ID, pids ...p2pprotocol.ID) (network.Stream, error)
}

// StreamHandlers registers stream handlers; host.Host satisfies it.
type StreamHandlers interface {
	SetStreamHandler(pid p2pprotocol.ID, handler network.StreamHandler)
	RemoveStreamHandler(pid p2pprotocol.ID)
}

// Validator checks a record a peer served by the rules every path applies
// (failures are *protocol.ValidationError). PolicyValidator is one; the
// node's counts what it refuses.
type Validator interface {
	ValidateBundle(b *protocol.Bundle) (protocol.BundleInfo, error)
	ValidateAccount(a *protocol.AccountBundle) (lamport uint64, err error)
}

// PolicyValidator validates with a policy and a clock (nil: time.Now).
type PolicyValidator struct {
	Policy protocol.Policy
	Now    func() time.Time
}

// ValidateBundle validates b at the validator's current time.
func (v PolicyValidator) ValidateBundle(b *protocol.Bundle) (protocol.BundleInfo, error) {
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	return v.Policy.ValidateBundle(b, now())
}

// ValidateAccount validates a.
func (v PolicyValidator) ValidateAccount(a *protocol.AccountBundle) (uint64, error) {
	return v.Policy.ValidateAccount(a)
}
