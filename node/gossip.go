package node

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Gossip size cap and queues, bounded in bytes.
//
// maxGossipRPC is the largest RPC a node reads or sends: one message at the
// payload cap (protocol.MaxPayloadSize) plus its protobuf framing (record
// keys, signature, GossipMessage, pubsub Message with its topic, RPC),
// about 250 bytes, with room to spare. gossipsub v0.19 splits every
// outgoing RPC so that it stays under this size (a burst of small messages
// becomes several RPCs, each message whole), so honest peers never send
// more. An RPC that announces more is refused before it is read, and its
// sender is cut off (rpcWatch).
//
// What a peer can make a node hold before validation is bounded in bytes:
// gossipValidateQueue messages waiting for a validation worker plus
// gossipValidateThrottle messages being validated, each at most
// maxGossipRPC: (512 + 256) × 68 KiB ≈ 51 MiB, plus gossipsub's inbound
// channel of 32 RPCs (2 MiB). A message that finds both full is dropped
// (kpnode_gossip_dropped_total{where="validation"}) and repaired by sync.
// Each peer's outbound queue holds gossipOutboundQueue RPCs; they refer to
// messages this node has already accepted and shares between all peers'
// queues, so a peer that stops reading holds references, not copies.
// Honest bursts fit: 1,000 bundles published at once are 1,000 RPCs and as
// many IDONTWANTs per peer.
const (
	maxGossipRPC           = protocol.MaxPayloadSize + 4<<10
	gossipValidateQueue    = 512
	gossipValidateThrottle = 256
	gossipOutboundQueue    = 2048
	gossipSubBuffer        = 1024
	validatorTimeout       = 5 * time.Second
	validatorConcurrent    = gossipValidateThrottle
)

// Peer scoring. Every message carries its device's or account's signature
// and every node validates it the same way before forwarding, so an honest
// peer never forwards an invalid message: a Reject is proof of a faulty or
// hostile sender. One invalid message costs invalid² × 100, so a peer that
// sends 2 falls below the gossip threshold (−100: no gossip to or from it),
// 2 below publish (−200) and 3 below graylist (−400: everything it sends is
// ignored). The counter decays to 1% in an hour. A little positive score
// for first deliveries and time in mesh keeps long-lived honest peers
// well above zero.
const (
	gossipThreshold    = -100
	publishThreshold   = -200
	graylistThreshold  = -400
	invalidWeight      = -100
	acceptPXThreshold  = 10
	opportunisticGraft = 5
)

func scoreParams(topics []string, guard *peerGuard) (*pubsub.PeerScoreParams, *pubsub.PeerScoreThresholds) {
	tp := make(map[string]*pubsub.TopicScoreParams, len(topics))
	for _, t := range topics {
		tp[t] = &pubsub.TopicScoreParams{
			SkipAtomicValidation:           true,
			TopicWeight:                    1,
			TimeInMeshWeight:               0.01,
			TimeInMeshQuantum:              time.Second,
			TimeInMeshCap:                  300,
			FirstMessageDeliveriesWeight:   0.5,
			FirstMessageDeliveriesDecay:    pubsub.ScoreParameterDecay(10 * time.Minute),
			FirstMessageDeliveriesCap:      100,
			InvalidMessageDeliveriesWeight: invalidWeight,
			InvalidMessageDeliveriesDecay:  pubsub.ScoreParameterDecay(time.Hour),
		}
	}
	_, loop4, _ := net.ParseCIDR("127.0.0.0/8")
	_, loop6, _ := net.ParseCIDR("::1/128")
	params := &pubsub.PeerScoreParams{
		SkipAtomicValidation: true,
		Topics:               tp,
		AppSpecificScore:     guard.appScore,
		AppSpecificWeight:    1,
		// Many peers behind one IP is a Sybil signal on the internet; on a
		// loopback testnet it is every peer, so loopback is exempt.
		IPColocationFactorWeight:    -10,
		IPColocationFactorThreshold: 8,
		IPColocationFactorWhitelist: []*net.IPNet{loop4, loop6},
		BehaviourPenaltyWeight:      -10,
		BehaviourPenaltyThreshold:   6,
		BehaviourPenaltyDecay:       pubsub.ScoreParameterDecay(10 * time.Minute),
		DecayInterval:               time.Second,
		DecayToZero:                 0.01,
		RetainScore:                 10 * time.Minute,
	}
	thresholds := &pubsub.PeerScoreThresholds{
		GossipThreshold:             gossipThreshold,
		PublishThreshold:            publishThreshold,
		GraylistThreshold:           graylistThreshold,
		AcceptPXThreshold:           acceptPXThreshold,
		OpportunisticGraftThreshold: opportunisticGraft,
	}
	return params, thresholds
}

// messageID is SHA-256 of the message data: the same record from two
// publishers is one message.
func messageID(m *pubsubpb.Message) string {
	h := sha256.Sum256(m.Data)
	return string(h[:])
}

// gossip owns the pubsub router and the network's topics.
type gossip struct {
	n        *Node
	ps       *pubsub.PubSub
	bundles  []*pubsub.Topic // by shard; every shard is joined, held ones subscribed
	accounts []*pubsub.Topic
	subs     []*pubsub.Subscription
	log      *slog.Logger
	watch    *mismatchWatch
	budget   *inboundBudget
	wg       sync.WaitGroup // the drain goroutines
}

func startGossip(ctx context.Context, n *Node, h host.Host) (*gossip, error) {
	cfg := n.cfg
	count := cfg.Shards.Count()
	var all []string
	for s := 0; s < count; s++ {
		all = append(all, protocol.BundleTopic(n.netID, s), protocol.AccountTopic(n.netID, s))
	}
	params, thresholds := scoreParams(all, n.guard)
	budget := newInboundBudget(n.guard, n.metrics, time.Now)
	opts := []pubsub.Option{
		pubsub.WithMessageSignaturePolicy(pubsub.StrictNoSign),
		pubsub.WithNoAuthor(),
		pubsub.WithMessageIdFn(messageID),
		pubsub.WithPeerScore(params, thresholds),
		pubsub.WithFloodPublish(true),
		pubsub.WithPeerExchange(true),
		pubsub.WithValidateQueueSize(gossipValidateQueue),
		pubsub.WithValidateThrottle(gossipValidateThrottle),
		pubsub.WithPeerOutboundQueueSize(gossipOutboundQueue),
		pubsub.WithMaxMessageSize(maxGossipRPC),
		pubsub.WithRawTracer(n.metrics.gossipTracer()),
		pubsub.WithRPCLogger(slog.New(&rpcWatch{guard: n.guard, metrics: n.metrics, next: n.log.With("component", "gossip").Handler()})),
		pubsub.WithAppSpecificRpcInspector(budget.inspect),
	}
	if n.cfg.PeerScoreInspect != nil {
		opts = append(opts, pubsub.WithPeerScoreInspect(n.cfg.PeerScoreInspect, 100*time.Millisecond))
	}
	ps, err := pubsub.NewGossipSub(ctx, h, opts...)
	if err != nil {
		return nil, fmt.Errorf("gossipsub: %w", err)
	}
	g := &gossip{n: n, ps: ps, log: n.log.With("component", "gossip"), budget: budget,
		bundles: make([]*pubsub.Topic, count), accounts: make([]*pubsub.Topic, count)}
	self := h.ID()
	for s := 0; s < count; s++ {
		shard := s
		bt, at := protocol.BundleTopic(n.netID, s), protocol.AccountTopic(n.netID, s)
		if err := ps.RegisterTopicValidator(bt, g.guard(bt, func(ctx context.Context, from peer.ID, m *pubsub.Message) pubsub.ValidationResult {
			return g.validateBundle(ctx, self, shard, from, m)
		}), pubsub.WithValidatorTimeout(validatorTimeout), pubsub.WithValidatorConcurrency(validatorConcurrent)); err != nil {
			return nil, err
		}
		if err := ps.RegisterTopicValidator(at, g.guard(at, func(ctx context.Context, from peer.ID, m *pubsub.Message) pubsub.ValidationResult {
			return g.validateAccount(ctx, self, shard, from, m)
		}), pubsub.WithValidatorTimeout(validatorTimeout), pubsub.WithValidatorConcurrency(validatorConcurrent)); err != nil {
			return nil, err
		}
		if g.bundles[s], err = ps.Join(bt); err != nil {
			return nil, err
		}
		if g.accounts[s], err = ps.Join(at); err != nil {
			return nil, err
		}
		if !cfg.Shards.Has(s) {
			continue // joined for publishing only
		}
		for _, t := range []*pubsub.Topic{g.bundles[s], g.accounts[s]} {
			sub, err := t.Subscribe(pubsub.WithBufferSize(gossipSubBuffer))
			if err != nil {
				g.close()
				return nil, err
			}
			g.subs = append(g.subs, sub)
			g.wg.Add(1)
			go g.drain(ctx, sub)
		}
	}
	if g.watch, err = startMismatchWatch(ctx, n, h); err != nil {
		g.close()
		return nil, err
	}
	return g, nil
}

// drain consumes a subscription. Records are stored by the validator, so a
// delivered message needs no more work; draining keeps the buffer empty.
func (g *gossip) drain(ctx context.Context, sub *pubsub.Subscription) {
	defer g.wg.Done()
	for {
		if _, err := sub.Next(ctx); err != nil {
			return
		}
	}
}

// close cancels the subscriptions, waits for their drain goroutines and
// the mismatch watcher, and leaves the topics.
func (g *gossip) close() {
	for _, s := range g.subs {
		s.Cancel()
	}
	g.wg.Wait()
	if g.watch != nil {
		g.watch.close()
	}
	for _, t := range append(g.bundles, g.accounts...) {
		if t != nil {
			t.Close()
		}
	}
}

// guard wraps a validator so a panic in it ignores the message, logs, and
// keeps the node running, and so every verdict is counted.
func (g *gossip) guard(topic string, v func(context.Context, peer.ID, *pubsub.Message) pubsub.ValidationResult) pubsub.ValidatorEx {
	return func(ctx context.Context, from peer.ID, m *pubsub.Message) (res pubsub.ValidationResult) {
		defer func() {
			if r := recover(); r != nil {
				g.log.Error("validator panicked", "topic", topic, "from", from, "panic", r)
				res = pubsub.ValidationIgnore
			}
			g.n.metrics.gossipVerdict(res)
		}()
		return v(ctx, from, m)
	}
}

// verdict maps an ingest error once: malformed or forged → Reject (the
// sender's score pays); stale, clock window, duplicate, over quota, or a
// local failure → Ignore.
func verdict(err error) pubsub.ValidationResult {
	var ve *protocol.ValidationError
	switch {
	case err == nil:
		return pubsub.ValidationAccept
	case errors.As(err, &ve):
		if ve.Transient() {
			return pubsub.ValidationIgnore
		}
		return pubsub.ValidationReject
	case errors.Is(err, errMalformed):
		return pubsub.ValidationReject
	default:
		return pubsub.ValidationIgnore
	}
}

// errMalformed marks a gossip or fetch message that does not decode, has
// wrong sizes, or names a key of another shard.
var errMalformed = protocol.ErrMalformed

func decodeGossip(data []byte) (*pb.GossipMessage, error) {
	var gm pb.GossipMessage
	if err := proto.Unmarshal(data, &gm); err != nil {
		return nil, fmt.Errorf("%w: %v", errMalformed, err)
	}
	return &gm, nil
}

func (g *gossip) validateBundle(ctx context.Context, self peer.ID, shard int, from peer.ID, m *pubsub.Message) pubsub.ValidationResult {
	if from == self {
		return pubsub.ValidationAccept // validated and stored before publishing
	}
	gm, err := decodeGossip(m.Data)
	if err != nil {
		g.log.Debug("gossip: malformed bundle message", "from", from, "err", err)
		return pubsub.ValidationReject
	}
	b, err := pb.ToBundle(gm.GetBundle())
	if err == nil && protocol.Shard(b.DeviceID, g.n.cfg.Shards.Count()) != shard {
		err = fmt.Errorf("%w: device %s is not in shard %d", errMalformed, b.DeviceID, shard)
	}
	if err != nil {
		g.log.Debug("gossip: malformed bundle", "from", from, "err", err)
		return pubsub.ValidationReject
	}
	outcome, _, err := g.n.ingestBundle(ctx, b, sourceGossip)
	if err != nil {
		g.log.Debug("gossip: bundle refused", "from", from, "device", b.DeviceID, "err", err)
		return verdict(err)
	}
	if outcome == storage.Duplicate || outcome == storage.OverQuota {
		return pubsub.ValidationIgnore
	}
	return pubsub.ValidationAccept
}

func (g *gossip) validateAccount(ctx context.Context, self peer.ID, shard int, from peer.ID, m *pubsub.Message) pubsub.ValidationResult {
	if from == self {
		return pubsub.ValidationAccept
	}
	gm, err := decodeGossip(m.Data)
	if err != nil {
		return pubsub.ValidationReject
	}
	a, err := pb.ToAccount(gm.GetAccount())
	if err == nil && protocol.Shard(a.AccountPub, g.n.cfg.Shards.Count()) != shard {
		err = fmt.Errorf("%w: account %s is not in shard %d", errMalformed, a.AccountPub, shard)
	}
	if err != nil {
		g.log.Debug("gossip: malformed account bundle", "from", from, "err", err)
		return pubsub.ValidationReject
	}
	_, outcome, err := g.n.ingestAccount(ctx, a, storage.AccountConverge, sourceGossip)
	if errors.Is(err, storage.ErrStale) {
		return pubsub.ValidationIgnore
	}
	if err != nil {
		g.log.Debug("gossip: account bundle refused", "from", from, "account", a.AccountPub, "err", err)
		return verdict(err)
	}
	if outcome == storage.Duplicate {
		return pubsub.ValidationIgnore
	}
	return pubsub.ValidationAccept
}

// publishBundle gossips a bundle the node has validated and stored.
func (g *gossip) publishBundle(ctx context.Context, b *protocol.Bundle) error {
	data, err := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: pb.FromBundle(b)}})
	if err != nil {
		return err
	}
	return g.bundles[protocol.Shard(b.DeviceID, len(g.bundles))].Publish(ctx, data)
}

// publishAccount gossips an account bundle the node has validated and stored.
func (g *gossip) publishAccount(ctx context.Context, a *protocol.AccountBundle, updatedAtMS int64) error {
	msg := pb.FromAccount(a)
	msg.UpdatedAtMs = updatedAtMS
	data, err := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Account{Account: msg}})
	if err != nil {
		return err
	}
	return g.accounts[protocol.Shard(a.AccountPub, len(g.accounts))].Publish(ctx, data)
}

// rpcWatch is gossipsub's RPC logger. gossipsub refuses an inbound RPC
// over maxGossipRPC (before reading it), an RPC whose control part is over
// its control cap, and an RPC that does not decode, by resetting the
// stream and logging; it has no other hook for them. No honest peer sends
// any of these (it splits RPCs to the same cap), so rpcWatch cuts the
// sender off (peerGuard: banned, graylisted, disconnected) and counts it.
// Records it does not act on go to next when next logs their level, except
// the per-RPC "received" and "sent" traces.
type rpcWatch struct {
	guard   *peerGuard
	metrics *metrics
	next    slog.Handler
}

// Messages of go-libp2p-pubsub v0.19's comm.go that rpcWatch acts on.
const (
	rpcReadError      = "error reading rpc"
	rpcBogus          = "bogus rpc from"
	rpcControlTooBig  = "RPC's control message is too large"
	rpcReceivedTrace  = "received"
	rpcSentTrace      = "sent"
	reasonRPCTooLarge = "rpc_too_large"
)

func (w *rpcWatch) Enabled(context.Context, slog.Level) bool { return true }

func (w *rpcWatch) Handle(ctx context.Context, r slog.Record) error {
	var from peer.ID
	var cause error
	r.Attrs(func(a slog.Attr) bool {
		switch v := a.Value.Any().(type) {
		case peer.ID:
			from = v
		case error:
			cause = v
		}
		return true
	})
	reason := ""
	switch {
	case r.Message == rpcReadError && errors.Is(cause, msgio.ErrMsgTooLarge):
		reason = reasonRPCTooLarge
	case strings.HasPrefix(r.Message, rpcControlTooBig):
		reason = "control_too_large"
	case r.Message == rpcBogus:
		reason = "rpc_malformed"
	case r.Message == rpcReceivedTrace || r.Message == rpcSentTrace:
		return nil
	}
	if reason != "" && from != "" {
		w.metrics.gossipRPCRefused(reason)
		w.guard.penalize(from, "gossip", reason)
		return nil
	}
	if w.next.Enabled(ctx, r.Level) {
		return w.next.Handle(ctx, r)
	}
	return nil
}

func (w *rpcWatch) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &rpcWatch{guard: w.guard, metrics: w.metrics, next: w.next.WithAttrs(attrs)}
}

func (w *rpcWatch) WithGroup(name string) slog.Handler {
	return &rpcWatch{guard: w.guard, metrics: w.metrics, next: w.next.WithGroup(name)}
}
