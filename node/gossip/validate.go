package gossip

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"

	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node/ingest"
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
// path's result only, mapped by ingest.VerdictOf.
type validator struct {
	self   peer.ID // this node: its own messages were ingested before they were published
	shards int     // the network's shard count
	ing    ingest.Ingester
	log    *slog.Logger
}

// bundle validates a message of shard's bundle topic.
func (v *validator) bundle(ctx context.Context, shard int, from peer.ID, data []byte) ingest.Verdict {
	if from == v.self {
		return ingest.Accept // validated and stored before publishing
	}
	outcome, err := v.ingestBundle(ctx, shard, data)
	verdict := ingest.VerdictOf(outcome, err)
	if err != nil {
		v.log.Debug("gossip: bundle refused", "from", from, "shard", shard, "verdict", verdict, "err", err)
	}
	return verdict
}

func (v *validator) ingestBundle(ctx context.Context, shard int, data []byte) (storage.PutOutcome, error) {
	gm, err := decode(data)
	if err != nil {
		return 0, err
	}
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
