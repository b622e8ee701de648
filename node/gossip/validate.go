package gossip

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"

	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node/ingest"
	keyed "github.com/kpnode/kpnode/node/internal/bucket"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// messageID is SHA-256 of the message data: the same record from two
// publishers is one message.
func messageID(m *pubsubpb.Message) string {
	h := sha256.Sum256(m.Data)
	return string(h[:])
}

// decode reads a gossip message; what does not decode is
// protocol.ErrMalformed.
func decode(data []byte) (*pb.GossipMessage, error) {
	var gm pb.GossipMessage
	if err := proto.Unmarshal(data, &gm); err != nil {
		return nil, fmt.Errorf("%w: %v", protocol.ErrMalformed, err)
	}
	return &gm, nil
}

// validator decides what a message on a shard's topic is worth. It needs
// no router: the verdict depends on the message's bytes and the ingest
// path's result only, mapped by ingest.VerdictOf, save for the notice
// budgets (the forwarding peer's, and a claim notice's origin forwarding
// notices far over its rate).
type validator struct {
	self   peer.ID // this node: its own messages were ingested before they were published
	shards int     // the network's shard count
	ing    ingest.Ingester
	log    *slog.Logger
	// notices is each forwarding peer's budget of notices (nil: none);
	// floods is each origin's budget of claim notices it forwarded itself
	// over its claim rate (nil: never Reject for it).
	notices *keyed.Keyed[peer.ID]
	floods  *keyed.Keyed[peer.ID]
	// peerDevices is each forwarding peer's budget of claim notices per
	// device, whatever keys sign them (nil: none).
	peerDevices *keyed.Keyed[peerDevice]
	// consumeBytes is each forwarding peer's budget of consume notice
	// payload bytes (nil: none).
	consumeBytes *keyed.Keyed[peer.ID]
	metrics      *metrics // nil counts nothing
}

// peerDevice keys a forwarding peer's claim budget for one device.
type peerDevice struct {
	peer   peer.ID
	device protocol.Key
}

// bundle validates a message of shard's bundle topic: a bundle, a claim
// notice or a consume notice.
func (v *validator) bundle(ctx context.Context, shard int, from peer.ID, data []byte) ingest.Verdict {
	if from == v.self {
		return ingest.Accept // validated and stored before publishing
	}
	gm, err := decode(data)
	if err != nil {
		return v.refused(from, shard, "message", ingest.VerdictOf(0, err), err)
	}
	var outcome storage.PutOutcome
	kind := "bundle"
	switch body := gm.Body.(type) {
	case *pb.GossipMessage_Claim:
		return v.claim(ctx, shard, from, body.Claim)
	case *pb.GossipMessage_Consume:
		kind = "consume notice"
		outcome, err = v.ingestConsume(ctx, shard, from, body.Consume)
	default:
		outcome, err = v.ingestBundle(ctx, shard, gm)
	}
	verdict := ingest.VerdictOf(outcome, err)
	if err != nil {
		return v.refused(from, shard, kind, verdict, err)
	}
	return verdict
}

// refused logs a refused message and returns its verdict.
func (v *validator) refused(from peer.ID, shard int, kind string, verdict ingest.Verdict, err error) ingest.Verdict {
	v.log.Debug("gossip: "+kind+" refused", "from", from, "shard", shard, "verdict", verdict, "err", err)
	return verdict
}

// chargeNotice takes one notice from the forwarding peer's budget.
func (v *validator) chargeNotice(from peer.ID) error {
	if v.notices == nil || v.notices.Take(from, 1) {
		return nil
	}
	v.metrics.noticeRefused("peer_budget")
	return fmt.Errorf("gossip: peer %s: %w", from, ingest.ErrNoticeRate)
}

// claim validates a claim notice. Its device (and so its shard) is read
// from the payload's layout before any signature work; a notice over the
// forwarder's budget, or over its budget for the device (notices signed
// by keys other than the forwarder's own), is Ignored before any either. A notice over its
// origin's claim rate for the device is Ignored, and Rejected once the
// origin, forwarding its own notices, has kept going far over it (an
// honest node holds its claims to that rate itself).
func (v *validator) claim(ctx context.Context, shard int, from peer.ID, m *pb.ClaimNotice) ingest.Verdict {
	n, err := pb.ToClaim(m)
	var dev protocol.Key
	if err == nil {
		dev, err = claimShard(n, shard, v.shards)
	}
	if err == nil {
		err = v.chargeNotice(from)
	}
	if err == nil && !isOrigin(from, n.NodeKey) {
		// A peer's own notices are held to its origin limits in the
		// ingest path (keyed by the same identity), which Reject it
		// when it floods; the budget is for the notices it signs with
		// any other key.
		err = v.chargePeerDevice(from, dev)
	}
	var outcome storage.PutOutcome
	if err == nil {
		outcome, _, err = v.ing.IngestClaim(ctx, n, ingest.SourceGossip)
	}
	verdict := ingest.VerdictOf(outcome, err)
	if errors.Is(err, ingest.ErrClaimRate) && v.floods != nil && isOrigin(from, n.NodeKey) && !v.floods.Take(from, 1) {
		v.metrics.noticeRefused("origin_flood")
		verdict = ingest.Reject
	}
	if err != nil {
		return v.refused(from, shard, "claim notice", verdict, err)
	}
	return verdict
}

// chargePeerDevice takes one claim notice from the forwarding peer's
// budget for the device. It is keyed by the connection, not by the node
// key that signed the notice: a peer minting a key per notice still marks
// at most the budget's burst + rate × t refs of one device here.
func (v *validator) chargePeerDevice(from peer.ID, dev protocol.Key) error {
	if v.peerDevices == nil || v.peerDevices.Take(peerDevice{from, dev}, 1) {
		return nil
	}
	v.metrics.noticeRefused("peer_device")
	return fmt.Errorf("gossip: peer %s, device %s: %w", from, dev, ingest.ErrNoticeRate)
}

// claimShard checks a claim notice's layout (its length, then the device
// in it) against the topic's shard, without signature work, and returns
// the device.
func claimShard(n *protocol.ClaimNotice, shard, shards int) (protocol.Key, error) {
	if len(n.Payload) != protocol.ClaimPayloadSize {
		return protocol.Key{}, &protocol.ValidationError{Rule: protocol.RuleClaimNoticeLength, Field: "payload",
			Detail: fmt.Sprintf("claim notice payload must be %d bytes, got %d", protocol.ClaimPayloadSize, len(n.Payload))}
	}
	_, dev, _, err := protocol.DecodeClaimPayload(n.Payload)
	if err != nil {
		return protocol.Key{}, &protocol.ValidationError{Rule: protocol.RuleClaimLayout, Field: "payload", Detail: err.Error(), Err: err}
	}
	if got := protocol.Shard(dev, shards); got != shard {
		return protocol.Key{}, fmt.Errorf("%w: claim notice of device %s, in shard %d, not %d", protocol.ErrMalformed, dev, got, shard)
	}
	return dev, nil
}

// isOrigin reports whether peer p is the node whose identity key is key.
func isOrigin(p peer.ID, key protocol.Key) bool {
	pub, err := crypto.UnmarshalEd25519PublicKey(key[:])
	if err != nil {
		return false
	}
	id, err := peer.IDFromPublicKey(pub)
	return err == nil && id == p
}

func (v *validator) ingestConsume(ctx context.Context, shard int, from peer.ID, m *pb.ConsumeNotice) (storage.PutOutcome, error) {
	n, err := pb.ToConsume(m)
	if err != nil {
		return 0, err
	}
	if got := protocol.Shard(n.DeviceID, v.shards); got != shard {
		return 0, fmt.Errorf("%w: consume notice of device %s, in shard %d, not %d", protocol.ErrMalformed, n.DeviceID, got, shard)
	}
	if err := v.chargeNotice(from); err != nil {
		return 0, err
	}
	if v.consumeBytes != nil && !v.consumeBytes.Take(from, float64(len(n.Payload))) {
		v.metrics.noticeRefused("consume_bytes")
		return 0, fmt.Errorf("gossip: peer %s: consume notice bytes: %w", from, ingest.ErrNoticeRate)
	}
	outcome, _, err := v.ing.IngestConsume(ctx, n, ingest.SourceGossip)
	if err != nil {
		return 0, fmt.Errorf("device %s: %w", n.DeviceID, err)
	}
	return outcome, nil
}

func (v *validator) ingestBundle(ctx context.Context, shard int, gm *pb.GossipMessage) (storage.PutOutcome, error) {
	b, err := pb.ToBundle(gm.GetBundle())
	if err != nil {
		return 0, err
	}
	if got := protocol.Shard(b.DeviceID, v.shards); got != shard {
		return 0, fmt.Errorf("%w: device %s is in shard %d, not %d", protocol.ErrMalformed, b.DeviceID, got, shard)
	}
	outcome, _, err := v.ing.IngestBundle(ctx, b, ingest.SourceGossip)
	if err != nil {
		return 0, fmt.Errorf("device %s: %w", b.DeviceID, err)
	}
	return outcome, nil
}

// account validates a message of shard's account topic. Account bundles on
// gossip follow the convergence rule (storage.AccountConverge).
func (v *validator) account(ctx context.Context, shard int, from peer.ID, data []byte) ingest.Verdict {
	if from == v.self {
		return ingest.Accept
	}
	outcome, err := v.ingestAccount(ctx, shard, data)
	verdict := ingest.VerdictOf(outcome, err)
	if err != nil {
		v.log.Debug("gossip: account bundle refused", "from", from, "shard", shard, "verdict", verdict, "err", err)
	}
	return verdict
}

func (v *validator) ingestAccount(ctx context.Context, shard int, data []byte) (storage.PutOutcome, error) {
	gm, err := decode(data)
	if err != nil {
		return 0, err
	}
	a, err := pb.ToAccount(gm.GetAccount())
	if err != nil {
		return 0, err
	}
	if got := protocol.Shard(a.AccountPub, v.shards); got != shard {
		return 0, fmt.Errorf("%w: account %s is in shard %d, not %d", protocol.ErrMalformed, a.AccountPub, got, shard)
	}
	_, outcome, err := v.ing.IngestAccount(ctx, a, storage.AccountConverge, ingest.SourceGossip)
	if err != nil {
		return 0, fmt.Errorf("account %s: %w", a.AccountPub, err)
	}
	return outcome, nil
}
