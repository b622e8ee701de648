package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/node/internal/bucket"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Notice rate limits on gossip (protocol/README.md, "Gossip"). A claim
// notice is charged to its origin (the node that signed it) for its device
// and in all; a consume notice to its device. The buckets are charged only
// for notices whose signature verified, and a notice the store already
// held gives its tokens back, so neither a forger nor a peer replaying an
// origin's old notices can spend an origin's budget. Over a limit the
// notice is Ignored (ingest.ErrNoticeRate); sync, which is not limited
// here, brings it later if it is genuine.
const (
	// An honest node hands out at most 20 bundles of a device a second,
	// 40 at once (its per-device claim limit), so it signs no more claim
	// notices than that; a receiver allows half a burst more for gossip's
	// jitter. This is what bounds how fast one node can mark a device's
	// pool as claimed.
	claimOriginDeviceRate  = 20
	claimOriginDeviceBurst = 60
	// All of one origin's claim notices, whatever the device: a busy
	// honest node stays below, a hostile one cannot mark every device of
	// the network at once.
	claimOriginRate  = 1000
	claimOriginBurst = 4000
	// Consume notices per device: a device consumes what it used, a few at
	// a time.
	consumeDeviceRate  = 2
	consumeDeviceBurst = 20
	// noticeLimitKeys bounds each limit's memory (a key forgotten starts
	// again with a full bucket).
	noticeLimitKeys = 1 << 16
)

// noticeLimits are the gossip rate limits of the notice ingest path.
type noticeLimits struct {
	originDevice  *bucket.Keyed[[2 * protocol.KeySize]byte]
	origin        *bucket.Keyed[protocol.Key]
	consumeDevice *bucket.Keyed[protocol.Key]
}

// noticeRates are the rates and bursts of the notice limits.
type noticeRates struct {
	originDeviceRate, originDeviceBurst float64
	originRate, originBurst             float64
	consumeRate, consumeBurst           float64
}

var defaultNoticeRates = noticeRates{
	originDeviceRate: claimOriginDeviceRate, originDeviceBurst: claimOriginDeviceBurst,
	originRate: claimOriginRate, originBurst: claimOriginBurst,
	consumeRate: consumeDeviceRate, consumeBurst: consumeDeviceBurst,
}

func newNoticeLimits(r noticeRates, now func() time.Time) *noticeLimits {
	return &noticeLimits{
		originDevice:  bucket.New[[2 * protocol.KeySize]byte](noticeLimitKeys, r.originDeviceRate, r.originDeviceBurst, now),
		origin:        bucket.New[protocol.Key](noticeLimitKeys, r.originRate, r.originBurst, now),
		consumeDevice: bucket.New[protocol.Key](noticeLimitKeys, r.consumeRate, r.consumeBurst, now),
	}
}

func originDeviceKey(origin, device protocol.Key) (k [2 * protocol.KeySize]byte) {
	copy(k[:], origin[:])
	copy(k[protocol.KeySize:], device[:])
	return k
}

// takeClaim charges a verified claim notice from gossip to its origin; the
// returned func gives the tokens back (the notice did not count).
func (l *noticeLimits) takeClaim(origin, device protocol.Key) (refund func(), err error) {
	od := originDeviceKey(origin, device)
	if !l.originDevice.Take(od, 1) {
		return nil, ingest.ErrClaimRate
	}
	if !l.origin.Take(origin, 1) {
		l.originDevice.Give(od, 1)
		return nil, ingest.ErrNoticeRate
	}
	return func() { l.originDevice.Give(od, 1); l.origin.Give(origin, 1) }, nil
}

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
// merely a ref not held. From gossip, the notice is charged to its origin
// first (noticeLimits).
func (n *Node) ingestClaim(ctx context.Context, c *protocol.ClaimNotice, src source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	info, err := n.cfg.Policy.ValidateClaim(c, n.cfg.Now())
	if err != nil {
		n.metrics.noticeRejected("claim", src, protocol.RuleOf(err))
		return 0, info, err
	}
	refund := func() {}
	if src == sourceGossip {
		if refund, err = n.limits.takeClaim(c.NodeKey, info.DeviceID); err != nil {
			reason := protocol.Rule("rate_origin")
			if errors.Is(err, ingest.ErrClaimRate) {
				reason = "rate_origin_device"
			}
			n.metrics.noticeRejected("claim", src, reason)
			return 0, info, fmt.Errorf("claim of device %s by %s: %w", info.DeviceID, c.NodeKey, err)
		}
	}
	outcome, err := n.store.PutClaim(ctx, c, info)
	if err != nil || outcome == storage.Duplicate {
		refund()
	}
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
// From gossip, the notice is charged to its device first (noticeLimits).
func (n *Node) ingestConsume(ctx context.Context, c *protocol.ConsumeNotice, src source) (storage.PutOutcome, protocol.ConsumeInfo, error) {
	info, err := n.cfg.Policy.ValidateConsume(c, n.cfg.Now())
	if err != nil {
		n.metrics.noticeRejected("consume", src, protocol.RuleOf(err))
		return 0, info, err
	}
	charged := false
	if src == sourceGossip {
		if !n.limits.consumeDevice.Take(c.DeviceID, 1) {
			n.metrics.noticeRejected("consume", src, "rate_device")
			return 0, info, fmt.Errorf("consume notice of device %s: %w", c.DeviceID, ingest.ErrNoticeRate)
		}
		charged = true
	}
	outcome, err := n.store.PutConsume(ctx, c, info)
	if charged && (err != nil || outcome == storage.Duplicate) {
		n.limits.consumeDevice.Give(c.DeviceID, 1)
	}
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
// then gossip it on the device's shard, as SubmitBundle does: at once for a
// shard the node holds (sync spreads it from the store if no peer hears
// it), through the outbox for one it does not (the 204 then stands for a
// queued publication). A notice the node already holds is accepted again
// and re-gossiped. A device over its tombstone quota is
// storage.ErrConsumeQuota, and nothing changed.
func (n *Node) SubmitConsume(ctx context.Context, c *protocol.ConsumeNotice) error {
	outcome, _, err := n.ingestConsume(ctx, c, sourceHTTP)
	if err != nil {
		return err
	}
	if outcome == storage.OverQuota {
		return fmt.Errorf("node: %w", storage.ErrConsumeQuota)
	}
	return n.publish(ctx, &storage.OutboxEntry{Kind: storage.OutboxConsume, Key: c.DeviceID, Signature: c.Signature, Payload: c.Payload})
}

// PublishClaim gossips a claim notice this node signed and stored, on its
// device's shard. Claim notices are best-effort: not queued in the outbox
// (a node claims only for shards it holds, and sync spreads the stored
// notice to the other holders).
func (n *Node) PublishClaim(ctx context.Context, c *protocol.ClaimNotice) error {
	if n.gossip == nil {
		return nil
	}
	return n.gossip.PublishClaim(ctx, c)
}
