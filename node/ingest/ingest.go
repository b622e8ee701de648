// Package ingest is the vocabulary the protocol services of a node share:
// where a record came from, the one ingest path every record takes
// (validation, then the store), the verdict that path's result maps to, and
// the penalty a peer pays for breaking a protocol's budget. The services
// (gossip, fetch, sync, lookup) depend on these small interfaces, never on
// the node itself.
package ingest

import (
	"context"
	"errors"
	"fmt"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Source names the path a record arrived on, for metrics and logs.
type Source string

// The paths a record arrives on.
const (
	SourceHTTP   Source = "http"
	SourceGossip Source = "gossip"
	SourceFetch  Source = "fetch"
	SourceSync   Source = "sync"
)

// Ingester is the one path every record takes, whatever it arrived on:
// validate (failures are *protocol.ValidationError), then store.
type Ingester interface {
	IngestBundle(ctx context.Context, b *protocol.Bundle, src Source) (storage.PutOutcome, protocol.BundleInfo, error)
	IngestAccount(ctx context.Context, a *protocol.AccountBundle, rule storage.AccountRule, src Source) (*storage.Account, storage.PutOutcome, error)
	// IngestClaim validates a claim notice and records it (storage.PutClaim).
	IngestClaim(ctx context.Context, n *protocol.ClaimNotice, src Source) (storage.PutOutcome, protocol.ClaimInfo, error)
	// IngestConsume validates a consume notice and applies it
	// (storage.PutConsume).
	IngestConsume(ctx context.Context, n *protocol.ConsumeNotice, src Source) (storage.PutOutcome, protocol.ConsumeInfo, error)
}

// Penalizer cuts off a peer that broke a protocol's budget (proto names the
// protocol, reason the budget; both label a metric, so keep them few).
type Penalizer interface {
	Penalize(p peer.ID, proto, reason string)
}

// What a holder answers when asked for a record it does not have: the
// fetch client returns these, the lookup branches on them.
var (
	// ErrNotHeld: the peer does not hold the key's shard.
	ErrNotHeld = errors.New("peer does not hold the shard")
	// ErrNoRecord: the peer holds the shard and has no record of the key.
	ErrNoRecord = errors.New("no record")
)

// Notice rate limits of the ingest path (gossip only: sync and fetch are
// bounded by their own budgets, and a notice Ignored on gossip arrives by
// sync later).
var (
	// ErrNoticeRate: a notice from gossip is over a rate limit of its
	// origin (a claim notice: the claiming node, alone and with the device)
	// or of its device (a consume notice). Ignore.
	ErrNoticeRate = errors.New("notice over its rate limit")
	// ErrClaimRate wraps ErrNoticeRate: a claim notice over its origin's
	// rate for one device, the rate every honest node holds its own claims
	// to (with room for gossip's jitter). Gossip Rejects it when the
	// forwarder is the origin itself and keeps doing it.
	ErrClaimRate = fmt.Errorf("%w: the origin's claims of the device", ErrNoticeRate)
)

// Verdict is what a record's ingest result means for the peer that sent it.
type Verdict int

// Verdicts, as gossipsub's validators use them.
const (
	// Accept: the record is valid and new to this node; forward it.
	Accept Verdict = iota + 1
	// Ignore: drop the record without blaming the sender (a duplicate, a
	// record this node's own clock, quotas or store refuse, a local failure).
	Ignore
	// Reject: the record is invalid for every node with the same network
	// constants, so its sender is faulty or hostile.
	Reject
)

func (v Verdict) String() string {
	switch v {
	case Accept:
		return "accept"
	case Ignore:
		return "ignore"
	case Reject:
		return "reject"
	}
	return "unknown"
}

// VerdictOf maps every result of the ingest path to a verdict, once for
// every protocol (the table in protocol/README.md, "Gossip"):
//
//   - stored, or refreshed (a newer timestamp for a known ref): Accept;
//   - malformed (protocol.ErrMalformed) or any validation rule but the transient
//     ones: Reject;
//   - a transient validation rule (this node's clock and retention, and
//     for consume notices which devices' bundles it holds), duplicate,
//     over quota, stale, store full, any other error: Ignore;
//   - a notice naming a bundle this node does not hold
//     (storage.ErrRefNotHeld) or a consumed one (storage.ErrConsumed), a
//     device over its tombstone quota (storage.ErrConsumeQuota), a notice
//     over a rate limit (ErrNoticeRate): Ignore. These depend on what this
//     node holds and has seen, never on the notice alone.
func VerdictOf(outcome storage.PutOutcome, err error) Verdict {
	var ve *protocol.ValidationError
	switch {
	case errors.As(err, &ve):
		if ve.Transient() {
			return Ignore
		}
		return Reject
	case errors.Is(err, protocol.ErrMalformed):
		return Reject
	case errors.Is(err, storage.ErrRefNotHeld), errors.Is(err, storage.ErrConsumed),
		errors.Is(err, storage.ErrConsumeQuota), errors.Is(err, ErrNoticeRate):
		return Ignore // this node's state, not the notice's fault
	case err != nil:
		return Ignore
	case outcome == storage.Stored || outcome == storage.Refreshed:
		return Accept
	default: // Duplicate, OverQuota
		return Ignore
	}
}
