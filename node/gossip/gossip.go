// Package gossip is kpnode's gossipsub layer: a bundle topic (bundles, claim
// and consume notices) and an account topic per shard, validators that put
// every message through the node's ingest path and map the result with
// ingest.VerdictOf, peer scoring, and the budgets that bound what a peer
// can make a node hold and check (protocol/README.md, "Gossip"). It depends on a libp2p host, an ingest.Ingester and the node's
// peer guard (Guard), never on the node itself.
package gossip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node/ingest"
	keyed "github.com/kpnode/kpnode/node/internal/bucket"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// Gossip size cap and queues, bounded in bytes.
//
// MaxRPC is the largest RPC a node reads or sends: one message at the
// payload cap (protocol.MaxPayloadSize) plus its protobuf framing (record
// keys, signature, GossipMessage, pubsub Message with its topic, RPC),
// about 250 bytes, with room to spare. gossipsub v0.19 splits every
// outgoing RPC so that it stays under this size (a burst of small messages
// becomes several RPCs, each message whole), so honest peers never send
// more. An RPC that announces more is refused before it is read, and its
// sender is cut off (rpcWatch).
//
// What a peer can make a node hold before validation is bounded in bytes:
// validateQueue messages waiting for a validation worker plus
// validateThrottle messages being validated, each at most MaxRPC:
// (512 + 256) × 68 KiB ≈ 51 MiB, plus gossipsub's inbound channel of 32
// RPCs (2 MiB). A message that finds both full is dropped
// (kpnode_gossip_dropped_total{where="validation"}) and repaired by sync.
// Each peer's outbound queue holds outboundQueue RPCs; they refer to
// messages this node has already accepted and shares between all peers'
// queues, so a peer that stops reading holds references, not copies.
// Honest bursts fit: 1,000 bundles published at once are 1,000 RPCs and as
// many IDONTWANTs per peer.
const (
	MaxRPC              = protocol.MaxPayloadSize + 4<<10
	validateQueue       = 512
	validateThrottle    = 256
	outboundQueue       = 2048
	subBuffer           = 1024
	validatorConcurrent = validateThrottle
)

// Defaults of Config.
const (
	// DefaultPeerBurst and DefaultPeerRate are the per-peer inbound byte
	// budget: ten 1,000-bundle bursts of real KeyPackages (2.9 KB each) at
	// once, and over a thousand such bundles a second for ever, from one
	// peer. Honest peers forward at most what the network publishes on the
	// topics both hold, which is far below.
	DefaultPeerBurst = 32 << 20
	DefaultPeerRate  = 4 << 20
	// DefaultMinCharge is the least a message costs, so that a stream of
	// tiny messages pays for the per-message work (decoding, the seen
	// cache, a signature check).
	DefaultMinCharge = 1 << 10
	// DefaultValidatorTimeout bounds one validation.
	DefaultValidatorTimeout = 5 * time.Second
	// DefaultNoticeBurst and DefaultNoticeRate are each forwarding peer's
	// budget of claim and consume notices (counted before any signature
	// work): far above what honest claims on the shards two nodes share
	// produce, far below what the validators can check.
	DefaultNoticeBurst = 500
	DefaultNoticeRate  = 100
	// DefaultPeerDeviceBurst and DefaultPeerDeviceRate are each forwarding
	// peer's budget of claim notices for one device, whatever node keys
	// sign them (keys are free): one connection marks at most
	// DefaultPeerDeviceBurst + DefaultPeerDeviceRate × t of a device's
	// refs claimed here. Above the honest claim limit per device (20/s,
	// burst 40, at each claiming node).
	DefaultPeerDeviceBurst = 60
	DefaultPeerDeviceRate  = 20
	// DefaultConsumeByteBurst and DefaultConsumeByteRate are each
	// forwarding peer's budget of consume notice payload bytes: 32 notices
	// of 256 refs at once, a thousand refs' worth (32 KiB) a second. Honest
	// devices consume a few refs at a time.
	DefaultConsumeByteBurst = 256 << 10
	DefaultConsumeByteRate  = 32 << 10
)

// The origin flood budget: a claim notice over its origin's claim rate for
// its device (ingest.ErrClaimRate) forwarded by that origin itself costs it
// a strike; strikes come back at floodRate a second, up to floodBurst, and
// a notice that finds none left is Rejected. An honest node holds its
// claims to that rate itself, so only gossip's jitter ever costs it one.
const (
	floodBurst = 40
	floodRate  = 1
	// maxNoticePeers bounds the peers whose notice budgets are kept.
	maxNoticePeers = 4096
	// maxPeerDevices bounds the (peer, device) claim budgets kept; one
	// forgotten starts again full, so the bound holds per budget kept:
	// a peer cycling through more devices than this within a refill
	// (3 s) gets a fresh burst for a device again, at a cost of this many
	// notices from its own peer budget in between.
	maxPeerDevices = 1 << 16
)

// Errors.
var (
	// ErrNotStarted: the service has no topics before Start.
	ErrNotStarted = errors.New("gossip: not started")
	// ErrClosed: Start after Close.
	ErrClosed = errors.New("gossip: closed")
)

// Guard is what the service needs of the node's peer guard: cutting a peer
// off (an RPC over the size cap, undecodable, or with an oversized control
// part), and knowing which peers are cut off (their gossipsub
// app-specific score is far below the graylist threshold).
type Guard interface {
	ingest.Penalizer
	Banned(p peer.ID) bool
}

// Config configures a Service. Zero budgets and a nil Logger, Registerer or
// Now take their defaults in New.
type Config struct {
	// NetworkID is the network name with the network constants' tag
	// (protocol.Constants.NetworkID); every topic name embeds it.
	NetworkID string
	// Shards fixes the topics: every shard's topics are joined (a node
	// publishes to shards it does not hold), the held shards' subscribed.
	Shards protocol.ShardSet
	// PeerBurst and PeerRate are each peer's inbound budget of message
	// bytes: PeerBurst at once, refilled at PeerRate a second. A message
	// costs its data's length, at least MinCharge.
	PeerBurst, PeerRate, MinCharge int
	// ValidatorTimeout bounds one validation.
	ValidatorTimeout time.Duration
	// NoticeBurst and NoticeRate are each forwarding peer's budget of
	// claim and consume notices: NoticeBurst at once, refilled at
	// NoticeRate a second. A notice over it is Ignored.
	NoticeBurst, NoticeRate int
	// PeerDeviceBurst and PeerDeviceRate are each forwarding peer's
	// budget of claim notices for one device, whatever keys sign them:
	// PeerDeviceBurst at once, refilled at PeerDeviceRate a second. A
	// claim notice over it is Ignored.
	PeerDeviceBurst, PeerDeviceRate int
	// ConsumeByteBurst and ConsumeByteRate are each forwarding peer's
	// budget of consume notice payload bytes: ConsumeByteBurst at once,
	// refilled at ConsumeByteRate a second. A consume notice over it is
	// Ignored.
	ConsumeByteBurst, ConsumeByteRate int
	// Logger receives the service's logs. Default slog.Default().
	Logger *slog.Logger
	// Registerer receives the gossip metrics
	// (kpnode_gossip_validations_total, kpnode_gossip_dropped_total,
	// kpnode_gossip_rpcs_refused_total). Default: a registry of its own.
	Registerer prometheus.Registerer
	// PeerScoreInspect, if set, receives every gossipsub peer score ten
	// times a second (diagnostics and tests).
	PeerScoreInspect func(map[peer.ID]float64)
	// Now is the budgets' clock (wall time, not a node's adjustable clock:
	// only its differences count). Default time.Now.
	Now func() time.Time
}

// DefaultConfig returns a Config with the default budgets; NetworkID and
// Shards are the caller's.
func DefaultConfig() Config {
	return Config{PeerBurst: DefaultPeerBurst, PeerRate: DefaultPeerRate, MinCharge: DefaultMinCharge,
		ValidatorTimeout: DefaultValidatorTimeout, NoticeBurst: DefaultNoticeBurst, NoticeRate: DefaultNoticeRate,
		PeerDeviceBurst: DefaultPeerDeviceBurst, PeerDeviceRate: DefaultPeerDeviceRate,
		ConsumeByteBurst: DefaultConsumeByteBurst, ConsumeByteRate: DefaultConsumeByteRate}
}

func (c *Config) setDefaults() {
	d := DefaultConfig()
	if c.PeerBurst == 0 {
		c.PeerBurst = d.PeerBurst
	}
	if c.PeerRate == 0 {
		c.PeerRate = d.PeerRate
	}
	if c.MinCharge == 0 {
		c.MinCharge = d.MinCharge
	}
	if c.ValidatorTimeout == 0 {
		c.ValidatorTimeout = d.ValidatorTimeout
	}
	if c.NoticeBurst == 0 {
		c.NoticeBurst = d.NoticeBurst
	}
	if c.NoticeRate == 0 {
		c.NoticeRate = d.NoticeRate
	}
	if c.PeerDeviceBurst == 0 {
		c.PeerDeviceBurst = d.PeerDeviceBurst
	}
	if c.PeerDeviceRate == 0 {
		c.PeerDeviceRate = d.PeerDeviceRate
	}
	if c.ConsumeByteBurst == 0 {
		c.ConsumeByteBurst = d.ConsumeByteBurst
	}
	if c.ConsumeByteRate == 0 {
		c.ConsumeByteRate = d.ConsumeByteRate
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Validate reports whether c is usable (after defaults).
func (c Config) Validate() error {
	if c.NetworkID == "" {
		return errors.New("gossip: network ID is required")
	}
	if n := c.Shards.Count(); n < 1 || n > 256 {
		return fmt.Errorf("gossip: %w", protocol.ErrShardCount)
	}
	if c.PeerBurst < MaxRPC {
		return fmt.Errorf("gossip: peer burst %d is under one RPC at the size cap (%d bytes)", c.PeerBurst, MaxRPC)
	}
	if c.PeerRate <= 0 || c.MinCharge <= 0 || c.ValidatorTimeout <= 0 || c.NoticeBurst <= 0 || c.NoticeRate <= 0 ||
		c.PeerDeviceBurst <= 0 || c.PeerDeviceRate <= 0 || c.ConsumeByteRate <= 0 {
		return errors.New("gossip: peer rate, minimum charge, validator timeout and notice budgets must be positive")
	}
	if c.ConsumeByteBurst < protocol.MaxConsumePayloadSize {
		return fmt.Errorf("gossip: consume byte burst %d is under one consume notice at the size cap (%d bytes)", c.ConsumeByteBurst, protocol.MaxConsumePayloadSize)
	}
	return nil
}

// Service owns the pubsub router and the network's topics. Build it with
// New, then Start; Close leaves the topics and stops the router. Start
// must have returned before the other methods are called.
type Service struct {
	cfg     Config
	host    host.Host
	guard   Guard
	log     *slog.Logger
	metrics *metrics
	budget  *inboundBudget
	valid   *validator

	mu      sync.Mutex // guards the lifecycle fields below
	started bool
	closed  bool
	cancel  context.CancelFunc

	// Set by Start, read-only afterwards.
	bundles  []*pubsub.Topic // by shard; every shard is joined, held ones subscribed
	accounts []*pubsub.Topic
	subs     []*pubsub.Subscription
	wg       sync.WaitGroup // the drain goroutines
}

// New builds a gossip service on h that ingests through ing and cuts peers
// off through guard. It registers the metrics; Start joins the network.
func New(cfg Config, h host.Host, ing ingest.Ingester, guard Guard) (*Service, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if h == nil || ing == nil || guard == nil {
		return nil, errors.New("gossip: a host, an ingester and a guard are required")
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("gossip: metrics: %w", err)
	}
	log := cfg.Logger
	return &Service{
		cfg: cfg, host: h, guard: guard, log: log, metrics: m,
		budget: newInboundBudget(cfg.PeerBurst, cfg.PeerRate, cfg.MinCharge, m, cfg.Now),
		valid: &validator{self: h.ID(), shards: cfg.Shards.Count(), ing: ing, log: log, metrics: m,
			notices: keyed.New[peer.ID](maxNoticePeers, float64(cfg.NoticeRate), float64(cfg.NoticeBurst), cfg.Now),
			floods:  keyed.New[peer.ID](maxNoticePeers, floodRate, floodBurst, cfg.Now),
			peerDevices: keyed.New[peerDevice](maxPeerDevices, float64(cfg.PeerDeviceRate),
				float64(cfg.PeerDeviceBurst), cfg.Now),
			consumeBytes: keyed.New[peer.ID](maxNoticePeers, float64(cfg.ConsumeByteRate),
				float64(cfg.ConsumeByteBurst), cfg.Now)},
	}, nil
}

// Start runs the gossipsub router under a context derived from ctx (its
// end, or Close, stops it), registers a validator per topic, joins every
// shard's topics and subscribes to the held shards'.
func (s *Service) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return ErrClosed
	case s.started:
		return errors.New("gossip: already started")
	}
	s.started = true
	ctx, s.cancel = context.WithCancel(ctx)
	if err := s.start(ctx); err != nil {
		s.stop()
		s.bundles, s.accounts, s.subs = nil, nil, nil
		return err
	}
	return nil
}

func (s *Service) start(ctx context.Context) error {
	count := s.cfg.Shards.Count()
	var all []string
	for sh := 0; sh < count; sh++ {
		all = append(all, protocol.BundleTopic(s.cfg.NetworkID, sh), protocol.AccountTopic(s.cfg.NetworkID, sh))
	}
	params, thresholds := scoreParams(all, s.appScore)
	opts := []pubsub.Option{
		pubsub.WithMessageSignaturePolicy(pubsub.StrictNoSign),
		pubsub.WithNoAuthor(),
		pubsub.WithMessageIdFn(messageID),
		pubsub.WithPeerScore(params, thresholds),
		pubsub.WithFloodPublish(true),
		pubsub.WithPeerExchange(true),
		pubsub.WithValidateQueueSize(validateQueue),
		pubsub.WithValidateThrottle(validateThrottle),
		pubsub.WithPeerOutboundQueueSize(outboundQueue),
		pubsub.WithMaxMessageSize(MaxRPC),
		pubsub.WithRawTracer(dropTracer{s.metrics}),
		pubsub.WithRPCLogger(slog.New(&rpcWatch{guard: s.guard, metrics: s.metrics, next: s.log.Handler()})),
		pubsub.WithAppSpecificRpcInspector(s.budget.inspect),
	}
	if s.cfg.PeerScoreInspect != nil {
		opts = append(opts, pubsub.WithPeerScoreInspect(s.cfg.PeerScoreInspect, 100*time.Millisecond))
	}
	ps, err := pubsub.NewGossipSub(ctx, s.host, opts...)
	if err != nil {
		return fmt.Errorf("gossipsub: %w", err)
	}
	s.bundles, s.accounts = make([]*pubsub.Topic, count), make([]*pubsub.Topic, count)
	for sh := 0; sh < count; sh++ {
		shard := sh
		bt, at := protocol.BundleTopic(s.cfg.NetworkID, sh), protocol.AccountTopic(s.cfg.NetworkID, sh)
		if err := ps.RegisterTopicValidator(bt, s.guarded(bt, func(ctx context.Context, from peer.ID, data []byte) ingest.Verdict {
			return s.valid.bundle(ctx, shard, from, data)
		}), pubsub.WithValidatorTimeout(s.cfg.ValidatorTimeout), pubsub.WithValidatorConcurrency(validatorConcurrent)); err != nil {
			return fmt.Errorf("gossip: validator: %w", err)
		}
		if err := ps.RegisterTopicValidator(at, s.guarded(at, func(ctx context.Context, from peer.ID, data []byte) ingest.Verdict {
			return s.valid.account(ctx, shard, from, data)
		}), pubsub.WithValidatorTimeout(s.cfg.ValidatorTimeout), pubsub.WithValidatorConcurrency(validatorConcurrent)); err != nil {
			return fmt.Errorf("gossip: validator: %w", err)
		}
		if s.bundles[sh], err = ps.Join(bt); err != nil {
			return fmt.Errorf("gossip: join: %w", err)
		}
		if s.accounts[sh], err = ps.Join(at); err != nil {
			return fmt.Errorf("gossip: join: %w", err)
		}
		if !s.cfg.Shards.Has(sh) {
			continue // joined for publishing only
		}
		for _, t := range []*pubsub.Topic{s.bundles[sh], s.accounts[sh]} {
			sub, err := t.Subscribe(pubsub.WithBufferSize(subBuffer))
			if err != nil {
				return fmt.Errorf("gossip: subscribe: %w", err)
			}
			s.subs = append(s.subs, sub)
			s.wg.Add(1)
			go s.drain(ctx, sub)
		}
	}
	return nil
}

// drain consumes a subscription. Records are stored by the validator, so a
// delivered message needs no more work; draining keeps the buffer empty.
func (s *Service) drain(ctx context.Context, sub *pubsub.Subscription) {
	defer s.wg.Done()
	for {
		if _, err := sub.Next(ctx); err != nil {
			return
		}
	}
}

// Close cancels the subscriptions, waits for their drain goroutines, leaves
// the topics and stops the router. It is safe to call more than once, and
// before Start.
func (s *Service) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.stop()
	return nil
}

// stop undoes what start did; s.mu is held.
func (s *Service) stop() {
	for _, sub := range s.subs {
		sub.Cancel()
	}
	s.wg.Wait()
	for _, t := range append(s.bundles, s.accounts...) {
		if t != nil {
			_ = t.Close() // fails only once the router has stopped, which leaves every topic
		}
	}
	if s.cancel != nil {
		s.cancel()
	}
}

// appScore is gossipsub's app-specific score: banned peers are graylisted.
func (s *Service) appScore(p peer.ID) float64 {
	if s.guard.Banned(p) {
		return bannedScore
	}
	return 0
}

// guarded adapts a validator to gossipsub: a panic in it ignores the
// message, logs, and keeps the node running, and every verdict is counted.
func (s *Service) guarded(topic string, v func(context.Context, peer.ID, []byte) ingest.Verdict) pubsub.ValidatorEx {
	return func(ctx context.Context, from peer.ID, m *pubsub.Message) (res pubsub.ValidationResult) {
		verdict := ingest.Ignore
		defer func() {
			if r := recover(); r != nil {
				s.log.Error("validator panicked", "topic", topic, "from", from, "panic", r)
				verdict = ingest.Ignore
			}
			s.metrics.verdict(verdict)
			res = result(verdict)
		}()
		verdict = v(ctx, from, m.GetData())
		return
	}
}

// result is a verdict as gossipsub takes it.
func result(v ingest.Verdict) pubsub.ValidationResult {
	switch v {
	case ingest.Accept:
		return pubsub.ValidationAccept
	case ingest.Reject:
		return pubsub.ValidationReject
	}
	return pubsub.ValidationIgnore
}

// PublishBundle gossips a bundle the node has validated and stored.
func (s *Service) PublishBundle(ctx context.Context, b *protocol.Bundle) error {
	if s.bundles == nil {
		return ErrNotStarted
	}
	data, err := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: pb.FromBundle(b)}})
	if err != nil {
		return fmt.Errorf("gossip: encode: %w", err)
	}
	return s.bundles[protocol.Shard(b.DeviceID, len(s.bundles))].Publish(ctx, data)
}

// PublishAccount gossips an account bundle the node has validated and
// stored, with the time the node stored it.
func (s *Service) PublishAccount(ctx context.Context, a *protocol.AccountBundle, updatedAtMS int64) error {
	if s.accounts == nil {
		return ErrNotStarted
	}
	msg := pb.FromAccount(a)
	msg.UpdatedAtMs = updatedAtMS
	data, err := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Account{Account: msg}})
	if err != nil {
		return fmt.Errorf("gossip: encode: %w", err)
	}
	return s.accounts[protocol.Shard(a.AccountPub, len(s.accounts))].Publish(ctx, data)
}

// PublishClaim gossips a claim notice the node has signed and stored, on
// its device's shard (the bundle topic). Claim notices are best-effort:
// sync spreads what gossip loses.
func (s *Service) PublishClaim(ctx context.Context, n *protocol.ClaimNotice) error {
	if s.bundles == nil {
		return ErrNotStarted
	}
	_, dev, _, err := protocol.DecodeClaimPayload(n.Payload)
	if err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	return s.publishNotice(ctx, dev, &pb.GossipMessage{Body: &pb.GossipMessage_Claim{Claim: pb.FromClaim(n)}})
}

// PublishConsume gossips a consume notice the node has validated and
// applied, on its device's shard (the bundle topic).
func (s *Service) PublishConsume(ctx context.Context, n *protocol.ConsumeNotice) error {
	if s.bundles == nil {
		return ErrNotStarted
	}
	return s.publishNotice(ctx, n.DeviceID, &pb.GossipMessage{Body: &pb.GossipMessage_Consume{Consume: pb.FromConsume(n)}})
}

func (s *Service) publishNotice(ctx context.Context, dev protocol.Key, gm *pb.GossipMessage) error {
	data, err := proto.Marshal(gm)
	if err != nil {
		return fmt.Errorf("gossip: encode: %w", err)
	}
	return s.bundles[protocol.Shard(dev, len(s.bundles))].Publish(ctx, data)
}

// BundleTopic returns shard's bundle topic (nil before Start or for a shard
// out of range), for callers that publish later or watch its peers.
func (s *Service) BundleTopic(shard int) *pubsub.Topic { return topicOf(s.bundles, shard) }

// AccountTopic returns shard's account topic, as BundleTopic.
func (s *Service) AccountTopic(shard int) *pubsub.Topic { return topicOf(s.accounts, shard) }

func topicOf(ts []*pubsub.Topic, shard int) *pubsub.Topic {
	if shard < 0 || shard >= len(ts) {
		return nil
	}
	return ts[shard]
}

// ShardPeers returns the peers this node knows subscribe to shard's bundle
// topic: the shard's holders it is connected to (a holder subscribes to
// both topics of a shard). Nil before Start or for a shard out of range.
func (s *Service) ShardPeers(shard int) []peer.ID {
	t := s.BundleTopic(shard)
	if t == nil {
		return nil
	}
	return t.ListPeers()
}

// TopicPeers returns how many peers this node knows subscribe to both
// topics of shard (the lower of the two counts).
func (s *Service) TopicPeers(shard int) int {
	bt, at := s.BundleTopic(shard), s.AccountTopic(shard)
	if bt == nil || at == nil {
		return 0
	}
	return min(len(bt.ListPeers()), len(at.ListPeers()))
}
