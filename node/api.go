package node

import (
	"context"
	"errors"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Status is the node's state as GET /v1/status serves it.
type Status = httpapi.Status

// apiBackend is the node as the HTTP API sees it: it converts the store's
// records to httpapi's and maps storage and lookup errors to httpapi's
// sentinels.
type apiBackend struct{ n *Node }

var _ httpapi.Backend = apiBackend{}

func (a apiBackend) SubmitBundle(ctx context.Context, b *protocol.Bundle) error {
	return apiError(a.n.SubmitBundle(ctx, b))
}

func (a apiBackend) SubmitAccount(ctx context.Context, acct *protocol.AccountBundle) error {
	return apiError(a.n.SubmitAccount(ctx, acct))
}

func (a apiBackend) LatestBundle(ctx context.Context, device protocol.Key) (*httpapi.Bundle, error) {
	b, err := a.n.LatestBundle(ctx, device)
	if err != nil {
		return nil, apiError(err)
	}
	return apiBundle(b), nil
}

func (a apiBackend) Bundles(ctx context.Context, device protocol.Key) ([]*httpapi.Bundle, error) {
	bs, err := a.n.Bundles(ctx, device)
	if err != nil {
		return nil, apiError(err)
	}
	out := make([]*httpapi.Bundle, len(bs))
	for i, b := range bs {
		out[i] = apiBundle(b)
	}
	return out, nil
}

func (a apiBackend) Account(ctx context.Context, account protocol.Key) (*httpapi.Account, error) {
	acct, err := a.n.Account(ctx, account)
	if err != nil {
		return nil, apiError(err)
	}
	return &httpapi.Account{AccountBundle: acct.AccountBundle, UpdatedAtMS: acct.UpdatedAtMS}, nil
}

func (a apiBackend) Status(ctx context.Context) httpapi.Status { return a.n.Status(ctx) }

func apiBundle(b *storage.Bundle) *httpapi.Bundle {
	return &httpapi.Bundle{Bundle: b.Bundle, BundleInfo: b.BundleInfo, Claimed: b.Claimed}
}

// apiError maps an error of the node to the httpapi sentinel the API
// answers by, in the order the API checks them. The cause stays in the
// chain and in the text, for the API's logs; an error the API need not
// tell apart (validation errors, or a failure that is a 500) is returned
// as it is.
func apiError(err error) error {
	var sentinel error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, storage.ErrStale):
		sentinel = httpapi.ErrStale
	case errors.Is(err, storage.ErrNotFound):
		sentinel = httpapi.ErrNotFound
	case errors.Is(err, ErrUnavailable):
		sentinel = httpapi.ErrUnavailable
	case errors.Is(err, storage.ErrStoreFull):
		sentinel = httpapi.ErrStoreFull
	case errors.Is(err, storage.ErrOutboxFull):
		sentinel = httpapi.ErrOutboxFull
	case errors.Is(err, storage.ErrConsumed):
		sentinel = httpapi.ErrConsumed
	case errors.Is(err, storage.ErrConsumeQuota):
		// The device's tombstones expire with the retention; a minute is
		// a polite pause, not a promise.
		return &retryError{mappedError{sentinel: httpapi.ErrRateLimited, cause: err}, consumeQuotaRetry}
	default:
		return err
	}
	return &mappedError{sentinel: sentinel, cause: err}
}

// mappedError is a node error that also matches an httpapi sentinel.
type mappedError struct{ sentinel, cause error }

func (e *mappedError) Error() string   { return e.cause.Error() }
func (e *mappedError) Unwrap() []error { return []error{e.sentinel, e.cause} }

// consumeQuotaRetry is the Retry-After of a consume notice refused for the
// device's tombstone quota.
const consumeQuotaRetry = 60 * time.Second

// retryError is a mapped error that says when to try again (httpapi reads
// RetryAfter for a 429).
type retryError struct {
	mappedError
	after time.Duration
}

func (e *retryError) RetryAfter() time.Duration { return e.after }

func (a apiBackend) Claim(ctx context.Context, requester string, device protocol.Key, suite uint16) (*httpapi.Claim, error) {
	r, err := a.n.Claim(ctx, requester, device, suite)
	if err != nil {
		return nil, claimAPIError(err)
	}
	return &httpapi.Claim{Bundle: httpapi.Bundle{Bundle: r.Bundle.Bundle, BundleInfo: r.Bundle.BundleInfo, Claimed: true}, LastResort: r.LastResort}, nil
}

func (a apiBackend) Count(ctx context.Context, device protocol.Key) (httpapi.ClaimCounts, error) {
	c, err := a.n.ClaimCounts(ctx, device)
	if err != nil {
		return httpapi.ClaimCounts{}, claimAPIError(err)
	}
	return httpapi.ClaimCounts{OneTime: c.OneTime, LastResort: c.LastResort, LastResortHandedOut: c.LastResortHandedOut}, nil
}

func (a apiBackend) Consume(ctx context.Context, c *protocol.ConsumeNotice) error {
	return apiError(a.n.SubmitConsume(ctx, c))
}
