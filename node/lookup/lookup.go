// Package lookup finds records of shards a node does not hold: it asks the
// holders of the key's shard (a HolderFinder, the DHT in a node) in
// parallel over fetch (a Fetcher), keeps collecting answers for a grace
// period after the first acceptable one and serves the best, never one
// older than the key's floor (a FloorStore: the best version this node has
// served, kept on disk), so one fast lying holder cannot roll a record
// back. Results are cached (LRU, TTL, background refresh), misses are
// negative-cached, and concurrent lookups of one key share one query. A
// bundle that was consumed (a ConsumedChecker: the store's tombstones,
// which the consume notices fetch answers carry keep up to date) is never
// served, from the cache or the network, and its floor no longer applies.
package lookup

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Defaults of Config.
const (
	DefaultTimeout = 2 * time.Second
	// DefaultGrace is how long a lookup keeps collecting answers after the
	// first acceptable one.
	DefaultGrace = 250 * time.Millisecond
	// DefaultCacheSize bounds the fetched bundles and account bundles kept
	// in memory (each kind).
	DefaultCacheSize = 10_000
	// DefaultCacheTTL is how long a fetched record may be served from the
	// cache at most.
	DefaultCacheTTL = time.Hour
	// DefaultCacheRefresh is the age after which a cache hit is still served
	// at once but refreshed from the network in the background, so the chat
	// client's hot path (GET /v0/account for every inbound message) never
	// waits for the network once a record is known, and keeps working while
	// the network is unreachable.
	DefaultCacheRefresh = time.Minute
	// DefaultNegativeTTL is how long a miss is remembered, so that lookups
	// of random keys cannot turn into a storm of DHT queries.
	DefaultNegativeTTL = 10 * time.Second
)

// Lookup rules. A lookup does not stop at the first valid answer: a hostile
// or lagging holder that answers first would roll the record back. It keeps
// asking the holders the finder names, up to MaxHolders of them, until
// Config.Grace after the first acceptable answer (or until every holder
// asked has answered and the finder's query has ended), and serves the
// best answer by the convergence rules. A record older than the key's floor
// is refused.
const (
	MaxHolders = 32
	// maxRefreshes bounds the background refreshes of cache entries in
	// flight at once.
	maxRefreshes = 64
	// floorExtendSlack: an account floor (void a retention after it was last
	// confirmed) is rewritten for the same version at most this often.
	floorExtendSlack = time.Hour
	// addrTTL is how long a holder's addresses the finder reported are kept.
	addrTTL = time.Minute
)

// ErrUnavailable: the registry network could not answer in time (no holder
// reachable, every fetch failed, only records older than the floor
// offered). Unlike a miss it is not remembered. A miss is
// storage.ErrNotFound.
var ErrUnavailable = errors.New("registry network unavailable")

// HolderFinder streams the peers that hold a shard; the channel closes when
// the query ends (at the latest when ctx does).
type HolderFinder interface {
	Holders(ctx context.Context, shard int) <-chan peer.AddrInfo
}

// Fetcher asks one holder for a record and validates it (the fetch
// client). A holder without the record answers ingest.ErrNoRecord, one that
// does not hold the shard ingest.ErrNotHeld.
type Fetcher interface {
	FetchLatest(ctx context.Context, p peer.ID, device protocol.Key) (*storage.Bundle, error)
	FetchAccount(ctx context.Context, p peer.ID, account protocol.Key) (*storage.Account, error)
}

// FloorStore keeps the floors: per key, the best version served (the
// methods of *storage.Store).
type FloorStore interface {
	Floor(ctx context.Context, kind storage.FloorKind, key protocol.Key, nowMS int64) (storage.Floor, bool, error)
	RaiseFloor(ctx context.Context, kind storage.FloorKind, key protocol.Key, f storage.Floor, nowMS int64, cmp func(a, b storage.Floor) int) (bool, error)
}

// ConsumedChecker reports whether a device's bundle was consumed (the
// method of *storage.Store). The store's bundle floors also stop applying
// once their ref is consumed (storage.Store.Floor).
type ConsumedChecker interface {
	Consumed(ctx context.Context, device protocol.Key, ref protocol.Ref) (bool, error)
}

// AddrBook learns the addresses the finder reports for a holder, so the
// fetcher can dial it (a libp2p peerstore).
type AddrBook interface {
	AddAddrs(p peer.ID, addrs []ma.Multiaddr, ttl time.Duration)
}

// Config configures a Lookup. Zero durations and sizes take the defaults.
type Config struct {
	Holders HolderFinder
	Fetcher Fetcher
	Floors  FloorStore
	// Consumed, if set, says which bundles were consumed: a lookup never
	// serves one, and drops a cache entry that was.
	Consumed ConsumedChecker
	// AddrBook, if set, learns holders' addresses.
	AddrBook AddrBook
	// Self is this node, never asked.
	Self peer.ID
	// ShardCount is the network's shard count (protocol.Shard).
	ShardCount int
	// Retention is the network's retention: a floor is void once honest
	// holders stop serving its record.
	Retention time.Duration
	// Timeout bounds one network query; Grace is how long it keeps
	// collecting answers after the first acceptable one.
	Timeout, Grace time.Duration
	// CacheSize bounds each kind's cache (and the misses remembered);
	// CacheTTL is an entry's longest life; a hit older than CacheRefresh is
	// refreshed in the background; NegativeTTL is how long a miss is
	// remembered.
	CacheSize                           int
	CacheTTL, CacheRefresh, NegativeTTL time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger; default slog.Default().
	Logger *slog.Logger
	// Registerer gets kpnode_lookups_total{kind,result}. Nil: not exported.
	Registerer prometheus.Registerer
}

func (c Config) withDefaults() Config {
	set := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	set(&c.Timeout, DefaultTimeout)
	set(&c.Grace, DefaultGrace)
	set(&c.CacheTTL, DefaultCacheTTL)
	set(&c.CacheRefresh, DefaultCacheRefresh)
	set(&c.NegativeTTL, DefaultNegativeTTL)
	if c.CacheSize == 0 {
		c.CacheSize = DefaultCacheSize
	}
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
	case c.Holders == nil || c.Fetcher == nil || c.Floors == nil:
		return errors.New("lookup: holder finder, fetcher and floor store are required")
	case c.ShardCount < 1 || c.ShardCount > 256:
		return protocol.ErrShardCount
	case c.Retention <= 0:
		return fmt.Errorf("lookup: retention must be positive, got %v", c.Retention)
	case c.Grace <= 0 || c.Grace > c.Timeout:
		return fmt.Errorf("lookup grace must be positive and at most the lookup timeout, got %v", c.Grace)
	case c.Timeout <= 0 || c.CacheTTL <= 0 || c.CacheRefresh <= 0 || c.NegativeTTL <= 0 || c.CacheSize < 1:
		return errors.New("lookup timeout, cache size and cache TTLs must be positive")
	}
	return nil
}

// Lookup finds, caches and serves records of shards the node does not
// hold. Its queries and background refreshes run under the context Start
// was given; Close cancels them and waits for the refreshes.
type Lookup struct {
	cfg      Config
	log      *slog.Logger
	lookups  *prometheus.CounterVec
	bundles  *recordCache[*storage.Bundle]
	accounts *recordCache[*storage.Account]
	// misses maps a key to when a lookup found no record. (The caches are
	// plain LRUs with ages checked on read: golang-lru's expirable LRU runs
	// a goroutine that never ends.)
	misses *lru.Cache[string, time.Time]
	flight singleflight.Group

	mu         sync.Mutex // guards refreshing, ctx, closed and wg.Add
	refreshing map[string]bool
	ctx        context.Context // cancelled before Start and after Close
	cancel     context.CancelFunc
	closed     bool
	wg         sync.WaitGroup
}

// recordCache caches one kind of fetched record.
type recordCache[T any] struct {
	kind      string // "bundle" or "account": metrics label and singleflight key prefix
	floorKind storage.FloorKind
	entries   *lru.Cache[protocol.Key, cached[T]]
	// fetch asks one holder and validates its answer; it returns the
	// record's version as a floor.
	fetch func(ctx context.Context, p peer.ID, key protocol.Key) (T, storage.Floor, error)
	// better reports whether a fetched record replaces a cached one, so a
	// lagging holder cannot roll a cached record back.
	better func(fetched, cached T) bool
	// cmp orders two versions as better does (positive: a is better).
	cmp func(a, b storage.Floor) int
	// gone reports whether a record may no longer be served (a consumed
	// bundle). Nil: always servable.
	gone func(ctx context.Context, key protocol.Key, v T) bool
}

// isGone applies c.gone, if any.
func (c *recordCache[T]) isGone(ctx context.Context, key protocol.Key, v T) bool {
	return c.gone != nil && c.gone(ctx, key, v)
}

type cached[T any] struct {
	v          T
	verifiedAt time.Time // last time a holder confirmed it (or something older)
	triedAt    time.Time // last network attempt, successful or not
}

// New builds a Lookup and registers its metric; it answers
// ErrUnavailable until Start.
func New(cfg Config) (*Lookup, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	dead, cancel := context.WithCancel(context.Background())
	cancel()
	l := &Lookup{cfg: cfg, log: cfg.Logger, ctx: dead, cancel: func() {},
		misses: newLRU[string, time.Time](cfg.CacheSize), refreshing: map[string]bool{},
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_lookups_total",
			Help: "Network lookups for keys of shards the node does not hold, by kind and result."}, []string{"kind", "result"}),
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(l.lookups); err != nil {
			return nil, fmt.Errorf("lookup: metrics: %w", err)
		}
	}
	retentionMS := cfg.Retention.Milliseconds()
	l.bundles = &recordCache[*storage.Bundle]{
		kind:      "bundle",
		floorKind: storage.FloorBundle,
		entries:   newLRU[protocol.Key, cached[*storage.Bundle]](cfg.CacheSize),
		fetch: func(ctx context.Context, p peer.ID, device protocol.Key) (*storage.Bundle, storage.Floor, error) {
			b, err := cfg.Fetcher.FetchLatest(ctx, p, device)
			if err != nil {
				return nil, storage.Floor{}, err
			}
			b.ReceivedAtMS = cfg.Now().UnixMilli()
			// A bundle's floor is void once honest holders stop serving it:
			// after the retention, or at the end of its KeyPackage lifetime.
			until := int64(b.TimestampMS) + retentionMS
			if b.NotAfterMS > 0 && int64(b.NotAfterMS) < until {
				until = int64(b.NotAfterMS)
			}
			return b, storage.Floor{LastResort: b.LastResort, TimestampMS: b.TimestampMS, Ref: b.Ref, UntilMS: until}, nil
		},
		better: BetterBundle,
		cmp:    CmpBundleFloor,
	}
	if cfg.Consumed != nil {
		l.bundles.gone = func(ctx context.Context, device protocol.Key, b *storage.Bundle) bool {
			consumed, err := cfg.Consumed.Consumed(ctx, device, b.Ref)
			if err != nil && ctx.Err() == nil {
				l.log.Warn("lookup: read tombstone", "device", device, "err", err)
			}
			return consumed
		}
	}
	l.accounts = &recordCache[*storage.Account]{
		kind:      "account",
		floorKind: storage.FloorAccount,
		entries:   newLRU[protocol.Key, cached[*storage.Account]](cfg.CacheSize),
		fetch: func(ctx context.Context, p peer.ID, account protocol.Key) (*storage.Account, storage.Floor, error) {
			a, err := cfg.Fetcher.FetchAccount(ctx, p, account)
			if err != nil {
				return nil, storage.Floor{}, err
			}
			now := cfg.Now().UnixMilli()
			if a.UpdatedAtMS <= 0 {
				a.UpdatedAtMS = now
			}
			// An account's floor is void a retention after this node last
			// saw it, as holders prune an account not updated within the
			// retention.
			return a, storage.Floor{Lamport: a.Lamport, PayloadHash: sha256.Sum256(a.Payload), UntilMS: now + retentionMS}, nil
		},
		better: func(fetched, cached *storage.Account) bool {
			return protocol.AccountSupersedes(fetched.Lamport, fetched.Payload, cached.Lamport, cached.Payload)
		},
		cmp: CmpAccountFloor,
	}
	return l, nil
}

// Start lets lookups query the network under ctx until Close.
func (l *Lookup) Start(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return errors.New("lookup: closed")
	}
	l.ctx, l.cancel = context.WithCancel(ctx)
	return nil
}

// Close ends the queries in flight (they answer ErrUnavailable) and waits
// for the background refreshes. Lookups after Close answer from the cache
// or ErrUnavailable.
func (l *Lookup) Close() error {
	l.mu.Lock()
	l.closed = true
	l.cancel()
	l.mu.Unlock()
	l.wg.Wait()
	return nil
}

func (l *Lookup) runCtx() context.Context {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ctx
}

func newLRU[K comparable, V any](size int) *lru.Cache[K, V] {
	c, err := lru.New[K, V](size)
	if err != nil {
		panic(err) // size is validated positive in Config
	}
	return c
}

// BetterBundle reports whether a should be served rather than b, by the
// rule of "latest": a last-resort bundle first, then the greater signed
// timestamp, then the smaller ref.
func BetterBundle(a, b *storage.Bundle) bool {
	if a.LastResort != b.LastResort {
		return a.LastResort
	}
	if a.TimestampMS != b.TimestampMS {
		return a.TimestampMS > b.TimestampMS
	}
	return string(a.Ref[:]) < string(b.Ref[:])
}

// CmpBundleFloor orders bundle versions by the "latest" rule (BetterBundle).
func CmpBundleFloor(a, b storage.Floor) int {
	switch {
	case a.LastResort != b.LastResort:
		if a.LastResort {
			return 1
		}
		return -1
	case a.TimestampMS != b.TimestampMS:
		if a.TimestampMS > b.TimestampMS {
			return 1
		}
		return -1
	case a.Ref != b.Ref:
		if string(a.Ref[:]) < string(b.Ref[:]) {
			return 1
		}
		return -1
	}
	return 0
}

// CmpAccountFloor orders account versions by the convergence rule
// (protocol.AccountSupersedes).
func CmpAccountFloor(a, b storage.Floor) int {
	switch {
	case a.Lamport != b.Lamport:
		if a.Lamport > b.Lamport {
			return 1
		}
		return -1
	case a.PayloadHash != b.PayloadHash:
		if string(a.PayloadHash[:]) < string(b.PayloadHash[:]) {
			return 1
		}
		return -1
	}
	return 0
}

// errMiss: holders answered and none has the record.
var errMiss = errors.New("not found in the network")

// Bundle returns a device's latest bundle as the holders serve it. Errors
// are storage.ErrNotFound (a miss) or ErrUnavailable (wrapped).
func (l *Lookup) Bundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error) {
	return lookupRecord(ctx, l, l.bundles, device)
}

// Account returns an account bundle as the holders serve it. Errors are
// storage.ErrNotFound or ErrUnavailable (wrapped).
func (l *Lookup) Account(ctx context.Context, account protocol.Key) (*storage.Account, error) {
	return lookupRecord(ctx, l, l.accounts, account)
}

// lookupRecord serves key from the cache (refreshing an old entry in the
// background), else from the network, remembering misses (not outages).
func lookupRecord[T any](ctx context.Context, l *Lookup, c *recordCache[T], key protocol.Key) (T, error) {
	var zero T
	flightKey := c.kind + string(key[:])
	now := l.cfg.Now()
	if e, ok := c.entries.Get(key); ok && c.isGone(context.WithoutCancel(ctx), key, e.v) {
		// Consumed since it was cached: never served again.
		c.entries.Remove(key)
	} else if ok && now.Sub(e.verifiedAt) <= l.cfg.CacheTTL {
		l.lookups.WithLabelValues(c.kind, "cache_hit").Inc()
		if now.Sub(e.triedAt) > l.cfg.CacheRefresh {
			l.refresh(flightKey, func() (any, error) { return fetchInto(l, c, key) })
		}
		return e.v, nil
	}
	if at, ok := l.misses.Get(flightKey); ok && now.Sub(at) < l.cfg.NegativeTTL {
		l.lookups.WithLabelValues(c.kind, "negative_hit").Inc()
		return zero, storage.ErrNotFound
	}
	// The shared query runs under the lookup's lifetime, not this request's:
	// a caller that gives up does not fail the others. It ends within the
	// lookup timeout, so waiting for it is bounded.
	v, err, _ := l.flight.Do(flightKey, func() (any, error) {
		v, err := fetchInto(l, c, key)
		if errors.Is(err, errMiss) {
			l.misses.Add(flightKey, l.cfg.Now())
		}
		return v, err
	})
	switch {
	case errors.Is(err, errMiss):
		return zero, fmt.Errorf("%w: %v", storage.ErrNotFound, err)
	case err != nil:
		return zero, err
	}
	return v.(T), nil
}

// refresh runs fn (a refresh of flightKey) in a goroutine Close waits for,
// unless one is already running for that key or maxRefreshes are, or the
// lookup is not running. A foreground lookup of the same key may join it
// (singleflight), so fn returns what a lookup returns.
func (l *Lookup) refresh(flightKey string, fn func() (any, error)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.ctx.Err() != nil || l.refreshing[flightKey] || len(l.refreshing) >= maxRefreshes {
		return
	}
	l.refreshing[flightKey] = true
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer func() {
			l.mu.Lock()
			delete(l.refreshing, flightKey)
			l.mu.Unlock()
		}()
		l.flight.Do(flightKey, fn)
	}()
}

// fetchInto asks the network for key and caches what it finds, unless the
// cache holds a better record. A failed attempt keeps the cached entry and
// is remembered, so an outage costs one attempt per CacheRefresh per key.
func fetchInto[T any](l *Lookup, c *recordCache[T], key protocol.Key) (T, error) {
	v, err := bestAnswer(l, c, key)
	now := l.cfg.Now()
	old, had := c.entries.Peek(key)
	if had && c.isGone(context.Background(), key, old.v) {
		// The answers just fetched may have carried the notice that
		// consumed the cached record.
		c.entries.Remove(key)
		had = false
	}
	if err != nil {
		result := "miss"
		if !errors.Is(err, errMiss) {
			result = "unavailable"
		}
		l.lookups.WithLabelValues(c.kind, result).Inc()
		l.log.Debug("lookup failed", "kind", c.kind, "key", key, "err", err)
		if had {
			old.triedAt = now
			c.entries.Add(key, old)
		}
		return v, err
	}
	l.lookups.WithLabelValues(c.kind, "found").Inc()
	if had && !c.better(v, old.v) {
		old.verifiedAt, old.triedAt = now, now
		c.entries.Add(key, old)
		return old.v, nil
	}
	c.entries.Add(key, cached[T]{v: v, verifiedAt: now, triedAt: now})
	return v, nil
}

// bestAnswer asks the holders of key's shard (as the finder reports them,
// at most MaxHolders) in parallel and returns the best valid answer that
// is not below the key's floor, collected until Grace after the first one,
// then raises the floor to it. With no acceptable answer it returns errMiss
// if the holders that said "no record" outnumber those that could not
// answer, else ErrUnavailable. It runs detached from any caller's context,
// under the lookup's, within Timeout, and returns only when every fetch it
// started has.
func bestAnswer[T any](l *Lookup, c *recordCache[T], key protocol.Key) (T, error) {
	var zero T
	life := l.runCtx()
	shard := protocol.Shard(key, l.cfg.ShardCount)
	floor, hasFloor, err := l.cfg.Floors.Floor(life, c.floorKind, key, l.cfg.Now().UnixMilli())
	if err != nil && life.Err() == nil {
		l.log.Warn("lookup: read floor", "key", key, "err", err)
	}
	ctx, cancel := context.WithTimeout(life, l.cfg.Timeout)
	type result struct {
		v     T
		floor storage.Floor
		err   error
	}
	// Buffered for every fetch, so none blocks once the lookup has decided.
	results := make(chan result, MaxHolders)
	var fetches sync.WaitGroup
	defer func() {
		cancel()
		fetches.Wait()
	}()

	var (
		best                                       T
		bestFloor                                  storage.Floor
		have                                       bool
		asked, answered, notFound, refused, failed int
		grace                                      <-chan time.Time
	)
	// below holds the answers refused below the floor, accepted after all
	// if the floor stops applying (the answer of another holder carried
	// the consume notice of the floor's bundle).
	var below []result
	var graceTimer *time.Timer
	defer func() {
		if graceTimer != nil {
			graceTimer.Stop()
		}
	}()
	var accepted []result
	accept := func(r result) {
		accepted = append(accepted, r)
		if !have || c.cmp(r.floor, bestFloor) > 0 {
			best, bestFloor = r.v, r.floor
		}
		if !have {
			have = true
			graceTimer = time.NewTimer(l.cfg.Grace)
			grace = graceTimer.C
		}
	}
	// stillBelow reads the floor again after an answer of version v below
	// it, and reports whether v is still below: the fetch that brought the
	// answer may have brought the consume notice that voids the floor
	// (storage.Store.Floor).
	stillBelow := func(v storage.Floor) bool {
		f, ok, err := l.cfg.Floors.Floor(life, c.floorKind, key, l.cfg.Now().UnixMilli())
		if err != nil {
			return true
		}
		floor, hasFloor = f, ok
		return hasFloor && c.cmp(v, floor) < 0
	}
	var providers <-chan peer.AddrInfo
	if ctx.Err() == nil {
		providers = l.cfg.Holders.Holders(ctx, shard)
	}
collect:
	for providers != nil || answered < asked {
		select {
		case p, ok := <-providers:
			if !ok {
				providers = nil
				continue
			}
			if p.ID == l.cfg.Self {
				continue
			}
			if len(p.Addrs) > 0 && l.cfg.AddrBook != nil {
				l.cfg.AddrBook.AddAddrs(p.ID, p.Addrs, addrTTL)
			}
			asked++
			if asked >= MaxHolders {
				providers = nil // ask no more; the query ends with ctx
			}
			fetches.Add(1)
			go func() {
				defer fetches.Done()
				v, f, err := c.fetch(ctx, p.ID, key)
				results <- result{v, f, err}
			}()
		case r := <-results:
			answered++
			switch {
			case r.err == nil && c.isGone(life, key, r.v):
				// A holder that has not heard of the consume yet: its
				// answer is stale, as one below the floor is.
				refused++
				l.lookups.WithLabelValues(c.kind, "refused_consumed").Inc()
				l.log.Debug("lookup: refused a consumed record", "kind", c.kind, "key", key)
			case r.err == nil && hasFloor && c.cmp(r.floor, floor) < 0 && stillBelow(r.floor):
				refused++
				below = append(below, r)
				l.lookups.WithLabelValues(c.kind, "refused_below_floor").Inc()
				l.log.Debug("lookup: refused a record older than the floor", "kind", c.kind, "key", key)
			case r.err == nil:
				accept(r)
				// Answers refused below a floor that no longer applies
				// are acceptable now.
				kept := below[:0]
				for _, b := range below {
					switch {
					case hasFloor && c.cmp(b.floor, floor) < 0:
						kept = append(kept, b)
					case !c.isGone(life, key, b.v):
						refused--
						accept(b)
					}
				}
				below = kept
			case errors.Is(r.err, ingest.ErrNoRecord):
				notFound++
			case errors.Is(r.err, ingest.ErrNotHeld):
				// A stale provider record: no answer.
			default:
				failed++
				l.log.Debug("lookup: fetch failed", "kind", c.kind, "err", r.err)
			}
		case <-grace:
			break collect
		case <-ctx.Done():
			break collect
		}
	}
	if len(below) > 0 && hasFloor && c.gone != nil {
		// A NOT_FOUND answer after them may have carried the notice that
		// consumed the floor's bundle.
		if f, ok, err := l.cfg.Floors.Floor(life, c.floorKind, key, l.cfg.Now().UnixMilli()); err == nil {
			floor, hasFloor = f, ok
			for _, b := range below {
				if !hasFloor || c.cmp(b.floor, floor) >= 0 {
					refused--
					accept(b)
				}
			}
		}
	}
	if have && c.gone != nil {
		// A later answer may have carried the notice that consumed one
		// accepted earlier: the best is chosen among those still servable.
		have = false
		for _, r := range accepted {
			switch {
			case c.isGone(life, key, r.v):
				refused++
				l.lookups.WithLabelValues(c.kind, "refused_consumed").Inc()
			case !have || c.cmp(r.floor, bestFloor) > 0:
				best, bestFloor, have = r.v, r.floor, true
			}
		}
	}
	if have {
		if hasFloor && c.cmp(bestFloor, floor) == 0 && bestFloor.UntilMS <= floor.UntilMS+floorExtendSlack.Milliseconds() {
			return best, nil // the floor already says so
		}
		if _, err := l.cfg.Floors.RaiseFloor(life, c.floorKind, key, bestFloor, l.cfg.Now().UnixMilli(), c.cmp); err != nil {
			l.log.Warn("lookup: write floor", "key", key, "err", err)
		}
		return best, nil
	}
	// A miss needs the holders that said "no record" to outnumber those
	// that could not answer (failed, timed out, or lied below the floor): a
	// single provider (stale or hostile) saying NOT_FOUND while the others
	// are out of reach is an outage, not a miss, and must not become a
	// cached 404; an offline holder among honest "no record" answers is.
	if unanswered := failed + refused + (asked - answered); notFound > 0 && notFound >= unanswered {
		return zero, fmt.Errorf("%w: %d of %d holders have no record", errMiss, notFound, asked)
	}
	return zero, fmt.Errorf("%w: %d holders asked, %d answered, %d failed, %d below the floor (%v)",
		ErrUnavailable, asked, answered, failed, refused, context.Cause(ctx))
}
