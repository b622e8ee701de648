package node

import (
	"context"
	"crypto/sha256"
	"fmt"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/protocol"
)

// DefaultStreamTimeout bounds a served fetch or sync stream.
const DefaultStreamTimeout = fetch.DefaultStreamTimeout

// errNotHeld: the peer does not hold the shard (a fetch or sync refusal).
var errNotHeld = fetch.ErrNotHeld

// startFetch wires the fetch protocol: a server answering from the store on
// h (until Close), and the client lookups and the outbox ask peers with.
func (n *Node) startFetch(ctx context.Context, h host.Host) error {
	pid := p2pprotocol.ID(protocol.FetchProtocol(n.netID))
	srv, err := fetch.NewServer(fetch.ServerConfig{
		Protocol:      pid,
		Store:         n.store,
		Holds:         n.cfg.Shards.HasKey,
		Claimer:       fetchClaimer{n},
		Handlers:      h,
		StreamTimeout: n.cfg.StreamTimeout,
		Logger:        n.log.With("component", "fetch"),
		Registerer:    n.registry,
	})
	if err != nil {
		return fmt.Errorf("fetch: %w", err)
	}
	if err := srv.Start(ctx); err != nil {
		return fmt.Errorf("fetch: %w", err)
	}
	n.fetchServer = srv
	n.fetchClient, err = fetch.NewClient(fetch.ClientConfig{Protocol: pid, Opener: h, Validator: fetchValidator{n},
		Consumed: n.fetchedConsumes})
	if err != nil {
		return fmt.Errorf("fetch: %w", err)
	}
	return nil
}

// fetchedConsumes ingests the consume notices a fetch answer carried for
// the device asked (source fetch: validated, then the store tombstones
// their refs and deletes its own copies of the bundles), so a light node
// stops serving a bundle consumed elsewhere, from its store, cache or
// floor. A notice that fails is counted by the ingest path and skipped; one
// already stored is skipped before any signature work (every holder a
// lookup asks answers with the same notices).
func (n *Node) fetchedConsumes(ctx context.Context, p peer.ID, ns []*protocol.ConsumeNotice) {
	for _, c := range ns {
		if len(c.Payload) > protocol.MaxConsumePayloadSize {
			continue // rule consume_too_large: not even hashed
		}
		if has, err := n.store.HasConsumeNotice(ctx, c.DeviceID, sha256.Sum256(c.Payload)); err == nil && has {
			continue
		}
		if _, _, err := n.ingestConsume(ctx, c, sourceFetch); err != nil && ctx.Err() == nil {
			n.log.Debug("fetch: consume notice refused", "peer", p, "device", c.DeviceID, "err", err)
		}
	}
}

// fetchValidator validates what peers serve by the node's policy and clock,
// counting what it refuses (source fetch).
type fetchValidator struct{ n *Node }

func (v fetchValidator) ValidateBundle(b *protocol.Bundle) (protocol.BundleInfo, error) {
	info, err := v.n.cfg.Policy.ValidateBundle(b, v.n.cfg.Now())
	if err != nil {
		v.n.metrics.bundleRejected(sourceFetch, protocol.RuleOf(err))
	}
	return info, err
}

func (v fetchValidator) ValidateAccount(a *protocol.AccountBundle) (uint64, error) {
	lamport, err := v.n.cfg.Policy.ValidateAccount(a)
	if err != nil {
		v.n.metrics.accountRejected(sourceFetch, protocol.RuleOf(err))
	}
	return lamport, err
}

// FetchLatest asks peer p for a device's latest bundle over the fetch
// protocol and validates it; it does not store or cache it.
func (n *Node) FetchLatest(ctx context.Context, p peer.ID, device protocol.Key) (*protocol.Bundle, error) {
	b, err := n.fetchClient.FetchLatest(ctx, p, device)
	if err != nil {
		return nil, err
	}
	return &b.Bundle, nil
}
