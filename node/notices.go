package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

func (i nodeIngester) IngestClaim(ctx context.Context, c *protocol.ClaimNotice, src ingest.Source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	return i.n.ingestClaim(ctx, c, src)
}

func (i nodeIngester) IngestConsume(ctx context.Context, c *protocol.ConsumeNotice, src ingest.Source) (storage.PutOutcome, protocol.ConsumeInfo, error) {
	return i.n.ingestConsume(ctx, c, src)
}

// ingestClaim validates a claim notice and records it: the one path every
// claim notice takes. A notice naming a ref this node holds under another
// device is a forgery under strict MLS validation (a KeyPackageRef binds
// its leaf's signature key, the device), so it fails rule foreign_ref; with
// validation off two devices may share opaque key_package bytes, and it is
// merely a ref not held.
func (n *Node) ingestClaim(ctx context.Context, c *protocol.ClaimNotice, src source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	info, err := n.cfg.Policy.ValidateClaim(c, n.cfg.Now())
	if err != nil {
		n.metrics.noticeRejected("claim", src, protocol.RuleOf(err))
		return 0, info, err
	}
	outcome, err := n.store.PutClaim(ctx, c, info)
	if errors.Is(err, storage.ErrForeignRef) && n.cfg.Policy.MLS == protocol.MLSStrict {
		n.metrics.noticeRejected("claim", src, protocol.RuleForeignRef)
		return 0, info, &protocol.ValidationError{Rule: protocol.RuleForeignRef, Field: "payload",
			Detail: fmt.Sprintf("ref %s is a keypackage of another device", info.Ref), Err: err}
	}
	if err != nil {
		return 0, info, err
	}
	n.metrics.noticeAccepted("claim", src, outcome)
	n.log.Debug("claim notice accepted", "source", src, "device", info.DeviceID, "ref", info.Ref, "outcome", outcome)
	return outcome, info, nil
}

// ingestConsume validates a consume notice and applies it. A notice naming
// a ref this node holds under another device fails rule
// consume_foreign_ref: over HTTP a 400, on gossip an Ignore (the forwarder
// may not hold that other device's bundle, so it could not have known).
func (n *Node) ingestConsume(ctx context.Context, c *protocol.ConsumeNotice, src source) (storage.PutOutcome, protocol.ConsumeInfo, error) {
	info, err := n.cfg.Policy.ValidateConsume(c, n.cfg.Now())
	if err != nil {
		n.metrics.noticeRejected("consume", src, protocol.RuleOf(err))
		return 0, info, err
	}
	outcome, err := n.store.PutConsume(ctx, c, info)
	if errors.Is(err, storage.ErrForeignRef) {
		n.metrics.noticeRejected("consume", src, protocol.RuleConsumeForeignRef)
		return 0, info, &protocol.ValidationError{Rule: protocol.RuleConsumeForeignRef, Field: "payload",
			Detail: "names a keypackage of another device", Err: err}
	}
	if err != nil {
		return 0, info, err
	}
	n.metrics.noticeAccepted("consume", src, outcome)
	n.log.Debug("consume notice accepted", "source", src, "device", c.DeviceID, "refs", len(info.Refs), "outcome", outcome)
	return outcome, info, nil
}

// SubmitConsume takes a consume notice from the local API: validate, apply,
// then gossip it on the device's shard (through the outbox for a shard the
// node does not hold, as SubmitBundle). A notice the node already holds is
// accepted again and re-gossiped.
func (n *Node) SubmitConsume(ctx context.Context, c *protocol.ConsumeNotice) error {
	outcome, _, err := n.ingestConsume(ctx, c, sourceHTTP)
	if err != nil {
		return err
	}
	if outcome == storage.OverQuota {
		return fmt.Errorf("node: %w", storage.ErrConsumeQuota)
	}
	// Gossip and outbox publication of consume notices: wired by the
	// gossip work (storage.OutboxConsume).
	return nil
}
