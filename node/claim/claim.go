// Package claim hands out single-use KeyPackages across the network
// (protocol/README.md, "Single use"): a claim gets one one-time bundle of a
// device that no node is known to have handed out, else the device's
// latest last-resort bundle.
//
// A node that holds the device's shard claims at home: among the device's
// unclaimed candidates it takes one it owns (rendezvous hashing of the ref
// over the shard's holders), records a signed claim notice in its store
// (the store keeps one claim per ref, so a lost race is seen at once) and
// gossips it. When it owns none it asks the owners over fetch
// (KIND_CLAIM, owned_only), and when every owner asked fails it falls back
// to claiming one itself. A node that does not hold the shard asks holders
// found through the DHT. Claims are rate-limited per requester and per
// device before any of this.
//
// The Service depends on small interfaces it declares (store, ingester,
// holders view, fetch client, publisher, holder finder), never on the node.
package claim

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Defaults of Config.
const (
	// DefaultRequesterRate and DefaultRequesterBurst limit the claims of one
	// requester (an API client's address, a fetch peer).
	DefaultRequesterRate  = 20
	DefaultRequesterBurst = 40
	// DefaultDeviceRate and DefaultDeviceBurst limit the claims of one
	// target device, whoever asks.
	DefaultDeviceRate  = 20
	DefaultDeviceBurst = 40
	// DefaultOwnerRate and DefaultOwnerBurst limit the owner requests of
	// one holder of the device's shard (a peer in its gossip topic), which
	// asks on behalf of all its clients: charged to neither the requester
	// nor the device bucket (the holder charged them), they only bound the
	// work one peer can cause.
	DefaultOwnerRate  = 200
	DefaultOwnerBurst = 400
	// DefaultSignRate and DefaultSignBurst limit the claim notices this node
	// signs, over all devices: the per-origin limit peers apply to a node's
	// claim notices on gossip (node/notices.go), which an honest node keeps
	// to so that it is never Rejected for flooding.
	DefaultSignRate  = 1000
	DefaultSignBurst = 4000
	// DefaultMaxRequesters and DefaultMaxDevices bound the rate limiters'
	// memory: the requesters and devices remembered (LRU).
	DefaultMaxRequesters = 10_000
	DefaultMaxDevices    = 100_000
	// DefaultOwnerTimeout bounds one request to an owner.
	DefaultOwnerTimeout = time.Second
	// DefaultHolderTimeout bounds one request to a holder by a node that
	// does not hold the shard (the holder may itself ask owners).
	DefaultHolderTimeout = 5 * time.Second
)

// Bounds of one claim.
const (
	// MaxCandidates: the one-time bundles a claim considers.
	MaxCandidates = 64
	// MaxOwnersAsked: the distinct owners a holder asks before it falls back.
	MaxOwnersAsked = 3
	// MaxHoldersAsked: the holders a node that does not hold the shard asks.
	MaxHoldersAsked = 3
	// addrTTL is how long a holder's addresses the finder reported are kept.
	addrTTL = time.Minute
)

// Sentinels of a claim's outcome. A miss is storage.ErrNotFound (the
// device has nothing usable, or an owner-only request found nothing owned).
var (
	// ErrRateLimited: the requester or the device is over its limit; the
	// error is a *RateLimitError saying when to ask again.
	ErrRateLimited = errors.New("claim: rate limited")
	// ErrUnavailable: no holder of the device's shard could be reached.
	ErrUnavailable = errors.New("claim: no holder reachable")
	// errOwnerAnswer: an owner's answer this node does not accept (its
	// notice is refused, or the ref is held here under another claim).
	errOwnerAnswer = errors.New("claim: owner's answer refused")
)

// RateLimitError is a claim refused by a rate limit.
type RateLimitError struct {
	// Scope is what was over its limit: "requester", "device" (only when
	// the device has no last-resort bundle to answer instead), "owner" (a
	// holder's owner requests), "node" (the claim notices this node
	// signs), or "holder" (a holder asked on the requester's behalf
	// refused).
	Scope string
	After time.Duration
}

func (e *RateLimitError) Error() string {
	return fmt.Sprintf("claim: rate limited (%s); retry after %v", e.Scope, e.After)
}

// Is matches ErrRateLimited.
func (e *RateLimitError) Is(target error) bool { return target == ErrRateLimited }

// RetryAfter says when to ask again (httpapi's Retry-After, fetch's
// retry_after_ms).
func (e *RateLimitError) RetryAfter() time.Duration { return e.After }

// Store is what a claim reads: the methods of *storage.Store it uses.
type Store interface {
	ClaimCandidates(ctx context.Context, dev protocol.Key, suite uint16, limit int) ([]*storage.Bundle, error)
	LastResortBundle(ctx context.Context, dev protocol.Key, suite uint16) (*storage.Bundle, error)
	ClaimCounts(ctx context.Context, dev protocol.Key) (storage.ClaimCounts, error)
	// RefClaim returns the bundle held under (dev, ref) and the claim
	// notice held for it (nil: unclaimed); storage.ErrNotFound when the
	// ref is not held.
	RefClaim(ctx context.Context, dev protocol.Key, ref protocol.Ref) (*storage.Bundle, *protocol.ClaimNotice, protocol.ClaimInfo, error)
}

// Ingester records claim notices: the node's ingest path (validate, then
// storage.PutClaim).
type Ingester interface {
	IngestClaim(ctx context.Context, n *protocol.ClaimNotice, src ingest.Source) (storage.PutOutcome, protocol.ClaimInfo, error)
}

// HolderView names the holders of a shard as this node sees them: itself
// when it holds the shard, plus the peers in the shard's gossip topic.
type HolderView interface {
	ShardHolders(shard int) []peer.ID
}

// Client asks a peer over fetch (the fetch client). Claim returns a
// validated bundle of dev, whether it is the last-resort fallback, and the
// claim notice the peer recorded for it (layout checked; the caller
// ingests it). A peer that has nothing answers ingest.ErrNoRecord, one
// that does not hold the shard ingest.ErrNotHeld, one over its limits an
// error with a RetryAfter() time.Duration method, one out of budget
// fetch.ErrBusy. OwnerClaim asks an owner for one of the named refs; its
// answer carries the notices proving named refs taken, with NOT_FOUND too.
type Client interface {
	Claim(ctx context.Context, p peer.ID, dev protocol.Key, suite uint16, ownedOnly bool) (*storage.Bundle, bool, *protocol.ClaimNotice, error)
	OwnerClaim(ctx context.Context, p peer.ID, dev protocol.Key, suite uint16, refs []protocol.Ref) (fetch.OwnerAnswer, error)
	// FetchLatest returns a holder's latest bundle of dev (its latest
	// last-resort one if it has any), validated.
	FetchLatest(ctx context.Context, p peer.ID, dev protocol.Key) (*storage.Bundle, error)
	Count(ctx context.Context, p peer.ID, dev protocol.Key) (storage.ClaimCounts, error)
}

// Publisher gossips a claim notice on the device's shard.
type Publisher interface {
	PublishClaim(ctx context.Context, n *protocol.ClaimNotice) error
}

// HolderFinder streams the peers that hold a shard (the DHT); the channel
// closes when the query ends, at the latest when ctx does.
type HolderFinder interface {
	Holders(ctx context.Context, shard int) <-chan peer.AddrInfo
}

// AddrBook learns the addresses the finder reports (a libp2p peerstore).
type AddrBook interface {
	AddAddrs(p peer.ID, addrs []ma.Multiaddr, ttl time.Duration)
}

// Config configures a Service. Zero limits and timeouts take the defaults.
type Config struct {
	Store     Store
	Ingester  Ingester
	View      HolderView
	Client    Client
	Publisher Publisher
	Finder    HolderFinder
	// AddrBook, if set, learns holders' addresses from the finder.
	AddrBook AddrBook
	// Self is this node's peer ID; Key its Ed25519 identity key, which
	// signs its claim notices.
	Self peer.ID
	Key  ed25519.PrivateKey
	// Shards are the shards this node holds (a light node: none).
	Shards protocol.ShardSet

	// Per requester and per device token buckets: rate per second, burst.
	RequesterRate, DeviceRate   float64
	RequesterBurst, DeviceBurst int
	// OwnerRate and OwnerBurst: per peer token bucket of the owner
	// requests of holders of the device's shard.
	OwnerRate  float64
	OwnerBurst int
	// SignRate and SignBurst bound the claim notices this node signs, all
	// devices together; a claim over it is rate limited (scope "node").
	SignRate  float64
	SignBurst int
	// MaxRequesters and MaxDevices bound the keys the limiters remember.
	MaxRequesters, MaxDevices int
	// OwnerTimeout bounds one owner-only request, HolderTimeout one request
	// to a holder by a node that does not hold the shard.
	OwnerTimeout, HolderTimeout time.Duration

	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Registerer gets kpnode_claims_total, kpnode_claim_owner_fallbacks_total
	// and kpnode_claim_pool_one_time. Nil: not exported.
	Registerer prometheus.Registerer
}

func (c Config) withDefaults() Config {
	setF := func(v *float64, d float64) {
		if *v == 0 {
			*v = d
		}
	}
	setI := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	setD := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	setF(&c.RequesterRate, DefaultRequesterRate)
	setF(&c.DeviceRate, DefaultDeviceRate)
	setI(&c.RequesterBurst, DefaultRequesterBurst)
	setI(&c.DeviceBurst, DefaultDeviceBurst)
	setF(&c.OwnerRate, DefaultOwnerRate)
	setI(&c.OwnerBurst, DefaultOwnerBurst)
	setF(&c.SignRate, DefaultSignRate)
	setI(&c.SignBurst, DefaultSignBurst)
	setI(&c.MaxRequesters, DefaultMaxRequesters)
	setI(&c.MaxDevices, DefaultMaxDevices)
	setD(&c.OwnerTimeout, DefaultOwnerTimeout)
	setD(&c.HolderTimeout, DefaultHolderTimeout)
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Validate reports whether c (with its defaults) is usable.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch {
	case c.Store == nil || c.Ingester == nil || c.View == nil || c.Client == nil || c.Publisher == nil || c.Finder == nil:
		return errors.New("claim: store, ingester, holder view, client, publisher and holder finder are required")
	case c.Self == "":
		return errors.New("claim: self peer ID is required")
	case len(c.Key) != ed25519.PrivateKeySize:
		return errors.New("claim: the node's Ed25519 identity key is required")
	case c.Shards.Count() < 1:
		return protocol.ErrShardCount
	case c.RequesterRate < 0 || c.DeviceRate < 0 || c.SignRate < 0 || c.OwnerRate < 0 ||
		c.RequesterBurst < 1 || c.DeviceBurst < 1 || c.SignBurst < 1 || c.OwnerBurst < 1:
		return fmt.Errorf("claim: rate limits must be positive with a burst of at least 1 (requester %v/s burst %d, device %v/s burst %d)",
			c.RequesterRate, c.RequesterBurst, c.DeviceRate, c.DeviceBurst)
	case c.MaxRequesters < 1 || c.MaxDevices < 1:
		return errors.New("claim: the limiters' sizes must be positive")
	case c.OwnerTimeout < 0 || c.HolderTimeout < 0:
		return errors.New("claim: timeouts must be positive")
	}
	return nil
}

// Result is one bundle handed out.
type Result struct {
	Bundle *storage.Bundle
	// LastResort: no one-time bundle was left; this is the device's latest
	// last-resort bundle, which may be handed out again.
	LastResort bool
	// Notice is the claim notice recorded for the hand-out (nil when a
	// holder handed it out for a node that does not hold the shard and
	// did not say).
	Notice *protocol.ClaimNotice
	// Taken (an owner request naming refs): the claim notices held here
	// for named refs that could not be handed out, the proof they are
	// taken. Set with storage.ErrNotFound too.
	Taken []*protocol.ClaimNotice
}

// peerDevice keys the owner requests of one holder for one device.
type peerDevice struct {
	peer   peer.ID
	device protocol.Key
}

// ownerDeviceBurst is the burst of one holder's owner requests for one
// device: peers accept a burst of 60 claim notices of one origin for one
// device, so more could not be announced anyway.
const ownerDeviceBurst = 60

// An owner's BUSY or RATE_LIMITED answers are believed 3 at a time, then
// one every 5 s; past that its refs are taken over as for a failed owner.
const (
	busyRate  = 0.2
	busyBurst = 3
)

// Service hands out bundles. It starts no goroutine: every claim runs in
// its caller's, bounded by the timeouts above.
type Service struct {
	cfg        Config
	log        *slog.Logger
	requesters *limiter[string]
	devices    *limiter[protocol.Key]
	owners     *limiter[peer.ID]
	// ownerDevices bounds one holder's owner requests for one device at
	// the device's rate (with the claim notice budget's burst): without it
	// one subscriber could drain a pool at the owner budget's pace.
	ownerDevices *limiter[peerDevice]
	// busy is each owner's allowance of BUSY/RATE_LIMITED answers that
	// are believed (its refs are not taken over); an owner that keeps
	// answering so is taken for failed, so a subscriber cannot withhold
	// the refs it owns by claiming to be busy.
	busy  *limiter[peer.ID]
	signs *limiter[struct{}]

	claims    *prometheus.CounterVec
	fallbacks prometheus.Counter
	pool      prometheus.Histogram
}

// New builds a Service and registers its metrics.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	s := &Service{cfg: cfg, log: cfg.Logger,
		requesters:   newLimiter[string](cfg.RequesterRate, cfg.RequesterBurst, cfg.MaxRequesters),
		devices:      newLimiter[protocol.Key](cfg.DeviceRate, cfg.DeviceBurst, cfg.MaxDevices),
		owners:       newLimiter[peer.ID](cfg.OwnerRate, cfg.OwnerBurst, cfg.MaxRequesters),
		ownerDevices: newLimiter[peerDevice](cfg.DeviceRate, ownerDeviceBurst, cfg.MaxRequesters),
		busy:         newLimiter[peer.ID](busyRate, busyBurst, cfg.MaxRequesters),
		signs:        newLimiter[struct{}](cfg.SignRate, cfg.SignBurst, 1),
		claims: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_claims_total",
			Help: "Claims served, by outcome (one_time, last_resort, none: nothing usable, limited: over a rate limit)."}, []string{"outcome"}),
		fallbacks: prometheus.NewCounter(prometheus.CounterOpts{Name: "kpnode_claim_owner_fallbacks_total",
			Help: "One-time bundles this node claimed although another holder owns them, because every owner asked failed."}),
		pool: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kpnode_claim_pool_one_time",
			Help:    "One-time bundles left for the device after each claim this node served from its store.",
			Buckets: []float64{0, 1, 2, 5, 10, 20, 50, 100}}),
	}
	for _, o := range []string{"one_time", "last_resort", "none", "limited"} {
		s.claims.WithLabelValues(o)
	}
	if reg := cfg.Registerer; reg != nil {
		for _, c := range []prometheus.Collector{s.claims, s.fallbacks, s.pool} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("claim: metrics: %w", err)
			}
		}
	}
	return s, nil
}

// Request is one claim.
type Request struct {
	// Requester names who asks, for the per-requester limit: an API
	// client's address, or "peer:<id>" for a fetch peer.
	Requester string
	Device    protocol.Key
	// Suite selects bundles of one MLS cipher suite; 0: any.
	Suite uint16
	// OwnedOnly: a holder asks this node, the owner, for a bundle it owns
	// (fetch KIND_CLAIM owned_only): no owner requests, no fallback, no
	// last resort; storage.ErrNotFound when it owns none. Refs are the refs
	// the holder believes this node owns, tried in order whatever this
	// node's own view (empty: the refs it owns in its view).
	OwnedOnly bool
	Refs      []protocol.Ref
	// Peer is the fetch peer that asks ("" over HTTP): an owner request of
	// a holder of the device's shard is charged to its owner budget only.
	Peer peer.ID
	// Source labels the notices this claim records (http, fetch).
	Source ingest.Source
}

// Claim hands out one bundle of req.Device: the whole algorithm at a node
// that holds the device's shard, else a request to holders of it. Errors:
// *RateLimitError (ErrRateLimited), storage.ErrNotFound when the device
// has nothing usable, ErrUnavailable when no holder answered.
//
// A claim over the device's limit alone (its requester within its own)
// gets the device's last-resort bundle, so claims in bulk for a device
// never lock out the others who ask for it; it is rate limited only when
// the device has no last-resort bundle (or, at a node that does not hold
// the shard, no holder says which it is).
func (s *Service) Claim(ctx context.Context, req Request) (Result, error) {
	err := s.limit(req)
	var rl *RateLimitError
	if errors.As(err, &rl) && rl.Scope == "device" && !req.OwnedOnly {
		// No claim notice for these: a notice per claim over the device
		// limit would let anyone make this node exceed the per-origin
		// notice limit peers apply, and be Rejected by them. The
		// hand-out count misses them.
		last := s.quietLastResort
		if !s.cfg.Shards.HasKey(req.Device) {
			last = s.remoteLastResort
		}
		if r, lerr := last(ctx, req); lerr == nil {
			s.claims.WithLabelValues("last_resort").Inc()
			return r, nil
		}
	}
	if err != nil {
		s.claims.WithLabelValues("limited").Inc()
		return Result{}, err
	}
	var r Result
	if s.cfg.Shards.HasKey(req.Device) {
		r, err = s.claimHeld(ctx, req)
	} else if req.OwnedOnly {
		err = fmt.Errorf("claim: %w", ingest.ErrNotHeld)
	} else {
		r, err = s.claimRemote(ctx, req)
	}
	switch {
	case err == nil && r.LastResort:
		s.claims.WithLabelValues("last_resort").Inc()
	case err == nil:
		s.claims.WithLabelValues("one_time").Inc()
	case errors.Is(err, ErrRateLimited):
		s.claims.WithLabelValues("limited").Inc()
	case errors.Is(err, storage.ErrNotFound):
		s.claims.WithLabelValues("none").Inc()
	}
	return r, err
}

// limit takes a token of the requester's bucket, then of the device's;
// an owner request of a holder of the device's shard takes one of that
// peer's owner budget instead (the holder took the requester's and the
// device's tokens for the claim it serves).
func (s *Service) limit(req Request) error {
	now := s.cfg.Now()
	if req.OwnedOnly && req.Peer != "" && s.cfg.Shards.HasKey(req.Device) && s.isHolder(req.Device, req.Peer) {
		if ok, after := s.owners.allow(req.Peer, now); !ok {
			return &RateLimitError{Scope: "owner", After: after}
		}
		if ok, after := s.ownerDevices.allow(peerDevice{req.Peer, req.Device}, now); !ok {
			return &RateLimitError{Scope: "owner", After: after}
		}
		return nil
	}
	if ok, after := s.requesters.allow(req.Requester, now); !ok {
		return &RateLimitError{Scope: "requester", After: after}
	}
	if ok, after := s.devices.allow(req.Device, now); !ok {
		return &RateLimitError{Scope: "device", After: after}
	}
	return nil
}

// isHolder reports whether p is a holder of dev's shard in this node's
// view (a peer in its gossip topic).
func (s *Service) isHolder(dev protocol.Key, p peer.ID) bool {
	for _, h := range s.cfg.View.ShardHolders(protocol.Shard(dev, s.cfg.Shards.Count())) {
		if h == p {
			return true
		}
	}
	return false
}

// signBudget takes a token of the node's claim notice budget.
func (s *Service) signBudget() error {
	if ok, after := s.signs.allow(struct{}{}, s.cfg.Now()); !ok {
		return &RateLimitError{Scope: "node", After: after}
	}
	return nil
}

// claimHeld is the claim at a holder of the device's shard.
func (s *Service) claimHeld(ctx context.Context, req Request) (Result, error) {
	if req.OwnedOnly && len(req.Refs) > 0 {
		return s.claimNamed(ctx, req)
	}
	shard := protocol.Shard(req.Device, s.cfg.Shards.Count())
	cands, err := s.cfg.Store.ClaimCandidates(ctx, req.Device, req.Suite, MaxCandidates)
	if err != nil {
		return Result{}, fmt.Errorf("claim: candidates: %w", err)
	}
	holders := s.holders(shard)
	// left says how many one-time bundles the device has after a claim,
	// for kpnode_claim_pool_one_time: the candidates read, less the one
	// handed out and those found taken meanwhile, when they were all of
	// them (fewer than the limit, any suite); else the store counts.
	gone := 0
	left := func() int {
		if req.Suite != 0 || len(cands) >= MaxCandidates {
			return -1
		}
		return len(cands) - 1 - gone
	}
	var others []*storage.Bundle
	for _, b := range cands {
		if Owner(holders, b.Ref) != s.cfg.Self {
			others = append(others, b)
			continue
		}
		r, won, err := s.claimLocal(ctx, req, b, left())
		if err != nil {
			return Result{}, err
		}
		if won {
			return r, nil
		}
		gone++
	}
	if req.OwnedOnly {
		return Result{}, fmt.Errorf("claim: no owned keypackage: %w", storage.ErrNotFound)
	}
	if len(others) > 0 {
		r, ok, fallback := s.askOwners(ctx, req, holders, others)
		if ok {
			return r, nil
		}
		// Claim here a ref whose owner failed (unreachable, timed out,
		// invalid answer) or that an owner did not prove taken. Two nodes
		// may then hand out one ref; the store keeps one claim of it. A
		// random one: the owner, if it is alive after all, hands its refs
		// out oldest first. Refs of owners that are alive but busy or
		// over a limit are left to them: the last resort then.
		rand.Shuffle(len(fallback), func(i, j int) { fallback[i], fallback[j] = fallback[j], fallback[i] })
		for _, b := range fallback {
			r, won, err := s.claimLocal(ctx, req, b, -1)
			if err != nil {
				return Result{}, err
			}
			if won {
				s.fallbacks.Inc()
				return r, nil
			}
		}
	}
	return s.lastResort(ctx, req)
}

// claimNamed answers an owner request that names refs: it tries exactly
// those, in order, whatever this node's view of their owners (the asker's
// view decides, so differing views never leave a ref to nobody). A ref
// claimed already, here or meanwhile, is proven taken by the claim notice
// held for it; a ref not held here, consumed, last resort or of another
// suite is skipped. storage.ErrNotFound (with the proofs) when none was
// handed out.
func (s *Service) claimNamed(ctx context.Context, req Request) (Result, error) {
	var taken []*protocol.ClaimNotice
	seen := map[protocol.Ref]bool{}
	for _, ref := range req.Refs[:min(len(req.Refs), fetch.MaxOwnerRefs)] {
		if seen[ref] {
			continue
		}
		seen[ref] = true
		b, held, _, err := s.cfg.Store.RefClaim(ctx, req.Device, ref)
		switch {
		case errors.Is(err, storage.ErrNotFound):
			continue
		case err != nil:
			return Result{Taken: taken}, fmt.Errorf("claim: read %s: %w", ref, err)
		case held != nil:
			taken = append(taken, held)
			continue
		case b.LastResort || !suiteMatches(b, req.Suite):
			continue
		}
		r, won, err := s.claimLocal(ctx, req, b, -1)
		if err != nil {
			return Result{Taken: taken}, err
		}
		if won {
			r.Taken = taken
			return r, nil
		}
		// Claimed meanwhile: the notice that won is the proof.
		if _, held, _, err := s.cfg.Store.RefClaim(ctx, req.Device, ref); err == nil && held != nil {
			taken = append(taken, held)
		}
	}
	return Result{Taken: taken}, fmt.Errorf("claim: none of the named keypackages is free: %w", storage.ErrNotFound)
}

// suiteMatches reports whether b's key_package is of cipher suite suite
// (0: any), as storage.ClaimCandidates selects them.
func suiteMatches(b *storage.Bundle, suite uint16) bool {
	if suite == 0 {
		return true
	}
	_, kp, err := protocol.SplitBundlePayload(b.Payload)
	if err != nil {
		return false
	}
	got, ok := protocol.KeyPackageCipherSuite(kp)
	return ok && got == suite
}

// holders returns the shard's holders as this node sees them, with itself.
func (s *Service) holders(shard int) []peer.ID {
	hs := s.cfg.View.ShardHolders(shard)
	for _, h := range hs {
		if h == s.cfg.Self {
			return hs
		}
	}
	return append(hs, s.cfg.Self)
}

// claimLocal signs and records a claim notice of b: won when the store
// had no claim of it (Stored). The notice is then gossiped, and left (the
// one-time bundles left, or -1: ask the store) observed.
func (s *Service) claimLocal(ctx context.Context, req Request, b *storage.Bundle, left int) (Result, bool, error) {
	if err := s.signBudget(); err != nil {
		return Result{}, false, err
	}
	n := protocol.SignClaim(s.cfg.Key, uint64(s.cfg.Now().UnixMilli()), req.Device, b.Ref)
	outcome, _, err := s.cfg.Ingester.IngestClaim(ctx, &n, req.Source)
	switch {
	case errors.Is(err, storage.ErrRefNotHeld), errors.Is(err, storage.ErrConsumed):
		return Result{}, false, nil // gone since the candidates were read
	case err != nil:
		return Result{}, false, fmt.Errorf("claim: record claim of %s: %w", b.Ref, err)
	case outcome != storage.Stored:
		return Result{}, false, nil // another claim holds it
	}
	s.publish(ctx, &n)
	if left >= 0 {
		s.pool.Observe(float64(left))
	} else {
		s.observePool(ctx, req.Device)
	}
	return Result{Bundle: b, Notice: &n}, true, nil
}

// askOwners asks the owners of cands, one owner at a time in the
// candidates' order, at most MaxOwnersAsked requests in all, each for one
// of the refs the owner owns in this node's view (the next
// fetch.MaxOwnerRefs of them; an owner that proved every ref named taken
// is asked for its next ones). The first owner answer accepted wins (ok).
// Otherwise fallback lists the candidates this node may claim itself: all
// of an owner's that failed (unreachable, timed out, NOT_HOLDER, an answer
// not accepted), and the named ones an owner answered NOT_FOUND for
// without proof that they are taken (a subscriber that withholds refs, or
// an owner that does not hold them). Every proof an owner sends is
// ingested here. The refs of owners that answered BUSY or RATE_LIMITED,
// and of owners not asked, stay theirs.
func (s *Service) askOwners(ctx context.Context, req Request, holders []peer.ID, cands []*storage.Bundle) (r Result, ok bool, fallback []*storage.Bundle) {
	var order []peer.ID
	byOwner := map[peer.ID][]*storage.Bundle{}
	for _, b := range cands {
		o := Owner(holders, b.Ref)
		if byOwner[o] == nil {
			order = append(order, o)
		}
		byOwner[o] = append(byOwner[o], b)
	}
	asks := 0
	for _, o := range order {
		for bs := byOwner[o]; len(bs) > 0; {
			if asks == MaxOwnersAsked || ctx.Err() != nil {
				return Result{}, false, fallback
			}
			asks++
			named := bs[:min(len(bs), fetch.MaxOwnerRefs)]
			refs := make([]protocol.Ref, len(named))
			for j, b := range named {
				refs[j] = b.Ref
			}
			octx, cancel := context.WithTimeout(ctx, s.cfg.OwnerTimeout)
			a, err := s.cfg.Client.OwnerClaim(octx, o, req.Device, req.Suite, refs)
			cancel()
			proven := s.ingestTaken(ctx, o, a.Taken)
			unproven := func(bs []*storage.Bundle) []*storage.Bundle {
				var out []*storage.Bundle
				for _, b := range bs {
					if !proven[b.Ref] {
						out = append(out, b)
					}
				}
				return out
			}
			switch {
			case err == nil:
				proven[a.Bundle.Ref] = true // handed out by o, to this node or before
				if err := s.acceptOwnerAnswer(ctx, a); err != nil {
					s.log.Debug("claim: owner's answer refused", "owner", o, "device", req.Device, "err", err)
					fallback = append(fallback, unproven(bs)...)
					bs = nil
					continue
				}
				s.observePool(ctx, req.Device)
				return Result{Bundle: a.Bundle, Notice: a.Notice}, true, nil
			case errors.Is(err, ingest.ErrNoRecord):
				// o has nothing free of what it was asked: believed for
				// the refs it proved taken, not for the others. Proof of
				// them all: ask it for its next refs.
				if left := unproven(named); len(left) > 0 {
					s.log.Debug("claim: owner answered NOT_FOUND without proof", "owner", o, "device", req.Device, "refs", len(left))
					fallback = append(fallback, left...)
					bs = nil
				} else {
					bs = bs[len(named):]
				}
			case (errors.Is(err, ErrRateLimited) || errors.Is(err, fetch.ErrRateLimited) || errors.Is(err, fetch.ErrBusy)) && s.believeBusy(o):
				// Alive: it may hand its refs out; taking them over here
				// would hand them out twice.
				s.log.Debug("claim: owner busy", "owner", o, "device", req.Device, "err", err)
				bs = nil
			default:
				s.log.Debug("claim: owner failed", "owner", o, "device", req.Device, "err", err)
				fallback = append(fallback, unproven(bs)...)
				bs = nil
			}
		}
	}
	return Result{}, false, fallback
}

// believeBusy spends one of o's believed BUSY/RATE_LIMITED answers. An
// honest owner is rarely busy for a holder (owner requests have their own
// budget); one that keeps saying so is treated as failed, and its refs are
// taken over.
func (s *Service) believeBusy(o peer.ID) bool {
	ok, _ := s.busy.allow(o, s.cfg.Now())
	return ok
}

// ingestTaken ingests the claim notices an owner sent as proof that refs
// are taken, and returns the refs this node now knows are not free: held
// under a claim (this one or one that wins), or no longer held.
func (s *Service) ingestTaken(ctx context.Context, o peer.ID, taken []*protocol.ClaimNotice) map[protocol.Ref]bool {
	proven := map[protocol.Ref]bool{}
	for _, n := range taken {
		_, info, err := s.cfg.Ingester.IngestClaim(ctx, n, ingest.SourceFetch)
		switch {
		case err == nil, errors.Is(err, storage.ErrRefNotHeld), errors.Is(err, storage.ErrConsumed):
			proven[info.Ref] = true
		default:
			s.log.Debug("claim: owner's proof refused", "owner", o, "err", err)
		}
	}
	return proven
}

// acceptOwnerAnswer records the owner's claim notice before gossip brings
// it, so this node does not hand the ref out again meanwhile, and accepts
// the answer only if the ref was free here: the notice is Stored, or the
// claim held here is the owner's (gossip or a proof brought it first). A ref
// held here under another claim (handed out here by fallback, say) is not
// handed out again.
func (s *Service) acceptOwnerAnswer(ctx context.Context, a fetch.OwnerAnswer) error {
	outcome, info, err := s.cfg.Ingester.IngestClaim(ctx, a.Notice, ingest.SourceFetch)
	if err != nil {
		return fmt.Errorf("%w: %w", errOwnerAnswer, err)
	}
	switch outcome {
	case storage.Stored:
		return nil
	case storage.Duplicate:
		// The claim held here is this notice, or another notice of the
		// same owner for the ref: an owner hands a ref out only when its
		// own store records its claim as new, so at most once, and this
		// answer is that hand-out. (Two claimers at the owner that sign
		// in one millisecond leave the store holding whichever notice
		// hashes smaller, which need not be the one handed out.)
		if _, n, held, err := s.cfg.Store.RefClaim(ctx, info.DeviceID, info.Ref); err == nil && n != nil &&
			(held.Hash == info.Hash || n.NodeKey == a.Notice.NodeKey) {
			return nil
		}
	}
	return fmt.Errorf("%w: %s is held here under another claim", errOwnerAnswer, info.Ref)
}

// quietLastResort hands out the device's latest last-resort bundle without
// recording or announcing the hand-out: the claim notice it signs goes only
// to the requester (a fetch claim answer carries one), never to the store
// or gossip.
func (s *Service) quietLastResort(ctx context.Context, req Request) (Result, error) {
	b, err := s.cfg.Store.LastResortBundle(ctx, req.Device, req.Suite)
	if errors.Is(err, storage.ErrNotFound) {
		return Result{}, fmt.Errorf("claim: no keypackage for device: %w", storage.ErrNotFound)
	} else if err != nil {
		return Result{}, fmt.Errorf("claim: last resort: %w", err)
	}
	if err := s.signBudget(); err != nil {
		return Result{}, err
	}
	n := protocol.SignClaim(s.cfg.Key, uint64(s.cfg.Now().UnixMilli()), req.Device, b.Ref)
	s.pool.Observe(0)
	return Result{Bundle: b, LastResort: true, Notice: &n}, nil
}

// lastResort hands out the device's latest last-resort bundle, recording
// a claim notice of it (the store counts its hand-outs).
func (s *Service) lastResort(ctx context.Context, req Request) (Result, error) {
	b, err := s.cfg.Store.LastResortBundle(ctx, req.Device, req.Suite)
	if errors.Is(err, storage.ErrNotFound) {
		return Result{}, fmt.Errorf("claim: no keypackage for device: %w", storage.ErrNotFound)
	} else if err != nil {
		return Result{}, fmt.Errorf("claim: last resort: %w", err)
	}
	if err := s.signBudget(); err != nil {
		return Result{}, err
	}
	n := protocol.SignClaim(s.cfg.Key, uint64(s.cfg.Now().UnixMilli()), req.Device, b.Ref)
	outcome, _, err := s.cfg.Ingester.IngestClaim(ctx, &n, req.Source)
	if err != nil {
		// The bundle is still the right answer: a last-resort bundle may
		// be handed out again; only its count misses this one.
		s.log.Warn("claim: record last-resort hand-out", "device", req.Device, "ref", b.Ref, "err", err)
	} else if outcome == storage.Stored || outcome == storage.Refreshed {
		s.publish(ctx, &n)
	}
	s.pool.Observe(0)
	return Result{Bundle: b, LastResort: true, Notice: &n}, nil
}

// remoteLastResort is the last resort of a node that does not hold the
// device's shard: the latest bundle a holder serves (its latest last-resort
// one when it has any), if it is a last-resort bundle of the suite. No
// claim notice counts it (the node signs none for a shard it does not
// hold). storage.ErrNotFound when the device has no last-resort bundle
// (of the suite); ErrUnavailable when no holder answered.
func (s *Service) remoteLastResort(ctx context.Context, req Request) (Result, error) {
	var res Result
	var final error
	asked := s.eachHolder(ctx, req.Device, func(p peer.ID) bool {
		hctx, cancel := context.WithTimeout(ctx, s.cfg.HolderTimeout)
		b, err := s.cfg.Client.FetchLatest(hctx, p, req.Device)
		cancel()
		switch {
		case err == nil && b.LastResort && suiteMatches(b, req.Suite):
			res = Result{Bundle: b, LastResort: true}
			return true
		case err == nil, errors.Is(err, ingest.ErrNoRecord):
			final = fmt.Errorf("claim: no last-resort keypackage: %w", storage.ErrNotFound)
			return true
		}
		s.log.Debug("claim: latest from holder failed", "holder", p, "device", req.Device, "err", err)
		return false
	})
	switch {
	case res.Bundle != nil:
		return res, nil
	case final != nil:
		return Result{}, final
	}
	return Result{}, fmt.Errorf("%w (%d asked)", ErrUnavailable, asked)
}

func (s *Service) publish(ctx context.Context, n *protocol.ClaimNotice) {
	if err := s.cfg.Publisher.PublishClaim(ctx, n); err != nil {
		s.log.Debug("claim: publish claim notice", "err", err)
	}
}

// observePool records the one-time bundles left for dev.
func (s *Service) observePool(ctx context.Context, dev protocol.Key) {
	if c, err := s.cfg.Store.ClaimCounts(ctx, dev); err == nil {
		s.pool.Observe(float64(c.OneTime))
	}
}

// claimRemote asks up to MaxHoldersAsked holders of the device's shard,
// found through the finder, in turn: the first bundle wins; a holder over
// its limits ends the claim (rate limited); storage.ErrNotFound when at
// least one holder had nothing and none had a bundle; ErrUnavailable when
// none answered.
func (s *Service) claimRemote(ctx context.Context, req Request) (Result, error) {
	var res Result
	var final error
	notFound := false
	asked := s.eachHolder(ctx, req.Device, func(p peer.ID) bool {
		hctx, cancel := context.WithTimeout(ctx, s.cfg.HolderTimeout)
		b, lastResort, n, err := s.cfg.Client.Claim(hctx, p, req.Device, req.Suite, false)
		cancel()
		var ra interface{ RetryAfter() time.Duration }
		switch {
		case err == nil:
			res = Result{Bundle: b, LastResort: lastResort, Notice: n}
			return true
		case errors.As(err, &ra):
			final = &RateLimitError{Scope: "holder", After: ra.RetryAfter()}
			return true
		case errors.Is(err, ingest.ErrNoRecord):
			notFound = true
		}
		s.log.Debug("claim: holder failed", "holder", p, "device", req.Device, "err", err)
		return false
	})
	switch {
	case res.Bundle != nil:
		return res, nil
	case final != nil:
		return Result{}, final
	case notFound:
		return Result{}, fmt.Errorf("claim: no keypackage for device: %w", storage.ErrNotFound)
	case ctx.Err() != nil:
		return Result{}, fmt.Errorf("claim: %w", ctx.Err())
	}
	return Result{}, fmt.Errorf("%w (%d asked)", ErrUnavailable, asked)
}

// eachHolder calls f with holders of dev's shard (never this node) found
// through the finder, until f returns true or MaxHoldersAsked were
// called; it returns how many were.
func (s *Service) eachHolder(ctx context.Context, dev protocol.Key, f func(peer.ID) bool) int {
	shard := protocol.Shard(dev, s.cfg.Shards.Count())
	qctx, cancel := context.WithCancel(ctx)
	defer cancel()
	asked := 0
	seen := map[peer.ID]bool{}
	for ai := range s.cfg.Finder.Holders(qctx, shard) {
		if ai.ID == s.cfg.Self || seen[ai.ID] {
			continue
		}
		seen[ai.ID] = true
		if s.cfg.AddrBook != nil && len(ai.Addrs) > 0 {
			s.cfg.AddrBook.AddAddrs(ai.ID, ai.Addrs, addrTTL)
		}
		asked++
		if f(ai.ID) || asked == MaxHoldersAsked {
			break
		}
	}
	return asked
}

// Count counts dev's bundles: from the store when this node holds the
// shard, else from the first holder that answers (fetch KIND_COUNT).
// Holders that answer NOT_FOUND count as zero counts; ErrUnavailable when
// none answered.
func (s *Service) Count(ctx context.Context, dev protocol.Key) (storage.ClaimCounts, error) {
	if s.cfg.Shards.HasKey(dev) {
		return s.cfg.Store.ClaimCounts(ctx, dev)
	}
	var out storage.ClaimCounts
	found, notFound := false, false
	asked := s.eachHolder(ctx, dev, func(p peer.ID) bool {
		hctx, cancel := context.WithTimeout(ctx, s.cfg.HolderTimeout)
		c, err := s.cfg.Client.Count(hctx, p, dev)
		cancel()
		switch {
		case err == nil:
			out, found = c, true
			return true
		case errors.Is(err, ingest.ErrNoRecord):
			notFound = true
		}
		s.log.Debug("claim: count from holder failed", "holder", p, "device", dev, "err", err)
		return false
	})
	switch {
	case found:
		return out, nil
	case notFound:
		return storage.ClaimCounts{}, nil
	case ctx.Err() != nil:
		return storage.ClaimCounts{}, fmt.Errorf("claim: %w", ctx.Err())
	}
	return storage.ClaimCounts{}, fmt.Errorf("%w (%d asked)", ErrUnavailable, asked)
}

// ServeClaim serves fetch KIND_CLAIM: the claim of req.Peer (requester
// "peer:<id>"), its notices labelled fetch. With Count it makes the
// Service the fetch server's Claimer.
func (s *Service) ServeClaim(ctx context.Context, req fetch.ClaimRequest) (fetch.ClaimAnswer, error) {
	r, err := s.Claim(ctx, Request{Requester: "peer:" + req.Peer.String(), Peer: req.Peer, Device: req.Device, Suite: req.Suite,
		OwnedOnly: req.OwnedOnly, Refs: req.Refs, Source: ingest.SourceFetch})
	return fetch.ClaimAnswer{Bundle: r.Bundle, LastResort: r.LastResort, Notice: r.Notice, Taken: r.Taken}, err
}

var _ fetch.Claimer = (*Service)(nil)
