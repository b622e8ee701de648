package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/node/lookup"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// source names the path a record arrived on, for metrics and logs.
type source = ingest.Source

const (
	sourceHTTP   = ingest.SourceHTTP
	sourceGossip = ingest.SourceGossip
	sourceFetch  = ingest.SourceFetch
	sourceSync   = ingest.SourceSync
)

// nodeIngester is the node's ingest path as the protocol services see it.
type nodeIngester struct{ n *Node }

var _ ingest.Ingester = nodeIngester{}

func (i nodeIngester) IngestBundle(ctx context.Context, b *protocol.Bundle, src ingest.Source) (storage.PutOutcome, protocol.BundleInfo, error) {
	return i.n.ingestBundle(ctx, b, src)
}

func (i nodeIngester) IngestAccount(ctx context.Context, a *protocol.AccountBundle, rule storage.AccountRule, src ingest.Source) (*storage.Account, storage.PutOutcome, error) {
	return i.n.ingestAccount(ctx, a, rule, src)
}

// ingestBundle validates a bundle and stores it: the one path every bundle
// takes, whatever it arrived on. Validation failures are
// *protocol.ValidationError.
func (n *Node) ingestBundle(ctx context.Context, b *protocol.Bundle, src source) (storage.PutOutcome, protocol.BundleInfo, error) {
	info, err := n.cfg.Policy.ValidateBundle(b, n.cfg.Now())
	if err != nil {
		n.metrics.bundleRejected(src, protocol.RuleOf(err))
		return 0, info, err
	}
	outcome, err := n.store.PutBundle(ctx, &storage.Bundle{Bundle: *b, BundleInfo: info})
	if err != nil {
		return 0, info, err
	}
	n.metrics.bundleAccepted(src, outcome)
	if f := n.cfg.OnBundleStored; f != nil && (outcome == storage.Stored || outcome == storage.Refreshed) {
		f(b.DeviceID, info.Ref)
	}
	n.log.Debug("bundle accepted", "source", src, "device", b.DeviceID, "ref", info.Ref, "ts", info.TimestampMS, "outcome", outcome)
	return outcome, info, nil
}

// ingestAccount validates an account bundle and stores it under rule.
func (n *Node) ingestAccount(ctx context.Context, a *protocol.AccountBundle, rule storage.AccountRule, src source) (*storage.Account, storage.PutOutcome, error) {
	lamport, err := n.cfg.Policy.ValidateAccount(a)
	if err != nil {
		n.metrics.accountRejected(src, protocol.RuleOf(err))
		return nil, 0, err
	}
	rec := &storage.Account{AccountBundle: *a, Lamport: lamport}
	outcome, err := n.store.PutAccount(ctx, rec, rule)
	if errors.Is(err, storage.ErrStale) {
		n.metrics.accountRejected(src, "stale")
		return nil, 0, err
	}
	if err != nil {
		return nil, 0, err
	}
	n.metrics.accountAccepted(src, outcome)
	return rec, outcome, nil
}

// SubmitBundle takes a bundle from the local API: validate, store, then
// gossip it to its shard's holders. A bundle the node already holds is
// accepted again (idempotent) and re-gossiped, which repairs a peer that
// missed it. For a shard the node does not hold, the bundle is also put in
// the outbox before SubmitBundle returns (see publish).
func (n *Node) SubmitBundle(ctx context.Context, b *protocol.Bundle) error {
	outcome, _, err := n.ingestBundle(ctx, b, sourceHTTP)
	if err != nil {
		return err
	}
	if outcome == storage.OverQuota {
		return nil
	}
	return n.publish(ctx, &storage.OutboxEntry{Kind: storage.OutboxBundle, Key: b.DeviceID, Signature: b.Signature, Payload: b.Payload})
}

// SubmitAccount takes an account bundle from the local API. Its lamport must
// be greater than the stored one's (storage.ErrStale otherwise, as in
// chat-store); then it is gossiped, as SubmitBundle.
func (n *Node) SubmitAccount(ctx context.Context, a *protocol.AccountBundle) error {
	rec, _, err := n.ingestAccount(ctx, a, storage.AccountMustIncrease, sourceHTTP)
	if err != nil {
		return err
	}
	return n.publish(ctx, &storage.OutboxEntry{Kind: storage.OutboxAccount, Key: a.AccountPub, Signature: a.Signature,
		Payload: a.Payload, UpdatedAtMS: rec.UpdatedAtMS})
}

// publish gossips a record the node has stored. For a shard the node holds,
// it publishes at once: if no peer hears it, sync spreads it from this
// node's store. For a shard it does not hold (every shard, on a light node)
// no peer will ever pull it from here, so the record goes to the outbox on
// disk, and publish returns only once that is committed: the caller's 204
// then never stands for a publication a crash or an outage could lose. (A
// crash between the store write and the outbox write loses no
// acknowledgement: no 204 was sent, the client posts again, and a record
// already held is queued again.) The outbox worker publishes it once a
// holder is present and deletes it once a holder has it.
func (n *Node) publish(ctx context.Context, e *storage.OutboxEntry) error {
	if n.cfg.Shards.HasKey(e.Key) {
		if n.gossip == nil {
			return nil
		}
		if err := n.gossipEntry(ctx, e); err != nil {
			n.log.Warn("gossip publish failed; the record is stored and sync will spread it", "key", e.Key, "err", err)
		}
		return nil
	}
	e.NextAttemptMS = n.cfg.Now().UnixMilli()
	if err := n.outbox.Add(ctx, e); err != nil {
		return fmt.Errorf("node: queue publication: %w", err)
	}
	n.wakeOutbox()
	return nil
}

// LatestBundle returns the bundle to hand a chat client for a device. A
// node answers keys of the shards it holds from its store alone. For other
// keys it asks the network too and serves the better of what its own client
// published and what the holders have.
func (n *Node) LatestBundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error) {
	local, err := n.store.LatestBundle(ctx, device)
	if n.cfg.Shards.HasKey(device) || n.lookup == nil || (err != nil && !errors.Is(err, storage.ErrNotFound)) {
		return local, err
	}
	remote, rerr := n.lookup.Bundle(ctx, device)
	switch {
	case rerr != nil && local == nil:
		return nil, rerr
	case rerr != nil:
		return local, nil
	case local == nil || lookup.BetterBundle(remote, local):
		return remote, nil
	}
	return local, nil
}

// Bundles returns every bundle held for a device, newest first.
func (n *Node) Bundles(ctx context.Context, device protocol.Key) ([]*storage.Bundle, error) {
	return n.store.Bundles(ctx, device)
}

// Account returns the account bundle for an account key: from the store
// for held shards; otherwise the winner (convergence rule) of the stored
// copy and the holders' version.
func (n *Node) Account(ctx context.Context, account protocol.Key) (*storage.Account, error) {
	local, err := n.store.Account(ctx, account)
	if n.cfg.Shards.HasKey(account) || n.lookup == nil || (err != nil && !errors.Is(err, storage.ErrNotFound)) {
		return local, err
	}
	remote, rerr := n.lookup.Account(ctx, account)
	switch {
	case rerr != nil && local == nil:
		return nil, rerr
	case rerr != nil:
		return local, nil
	case local == nil || protocol.AccountSupersedes(remote.Lamport, remote.Payload, local.Lamport, local.Payload):
		return remote, nil
	}
	return local, nil
}

// Status reports the node's state, as GET /v1/status serves it.
func (n *Node) Status(ctx context.Context) Status {
	c := n.store.Counts()
	st := Status{
		Version:       n.cfg.Version,
		DataDir:       n.cfg.DataDir,
		Network:       n.cfg.Network,
		NetworkID:     n.netID,
		Light:         n.cfg.Light,
		Shards:        n.cfg.Shards.List(),
		ShardCount:    n.cfg.Shards.Count(),
		MLSValidation: string(n.cfg.Policy.MLS),
		Devices:       c.Devices,
		Bundles:       c.Bundles,
		Accounts:      c.Accounts,
		Peers:         []string{},

		PendingPublications: n.outbox.Len(),
	}
	if st.Shards == nil {
		st.Shards = []int{}
	}
	if n.host != nil {
		st.PeerID = n.host.ID().String()
		st.Addrs, _ = n.P2PAddrs()
		for _, p := range n.ConnectedPeers() {
			st.Peers = append(st.Peers, p.String())
		}
		st.ConnectedPeers = len(st.Peers)
		st.Ready = st.ConnectedPeers > 0 && n.DHTPeers() > 0 && n.Provided()
		for _, s := range st.Shards {
			st.Ready = st.Ready && n.TopicPeers(s) > 0
		}
	}
	return st
}

// Ingest validates and stores a bundle without gossiping it, for imports
// (and tests): peers that hold its shard get it through sync.
func (n *Node) Ingest(ctx context.Context, b *protocol.Bundle) (storage.PutOutcome, error) {
	outcome, _, err := n.ingestBundle(ctx, b, sourceHTTP)
	return outcome, err
}
