package node

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/singleflight"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Defaults of the network lookup a node makes for keys of shards it does
// not hold.
const (
	DefaultLookupTimeout = 2 * time.Second
	// DefaultLookupGrace is Config.LookupGrace's default.
	DefaultLookupGrace = 250 * time.Millisecond
	// DefaultCacheSize bounds the fetched bundles and account bundles a node
	// keeps in memory (each kind).
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
	// DefaultNegativeTTL is how long a miss is remembered, so that lookups of
	// random keys cannot turn into a storm of DHT queries.
	DefaultNegativeTTL = 10 * time.Second
	// DefaultOutboxMax caps the acknowledged publications waiting for a
	// holder (Config.OutboxMax).
	DefaultOutboxMax = 10_000
)

// Lookup rules. A lookup does not stop at the first valid answer: a hostile
// or lagging holder that answers first would roll the record back. It keeps
// asking the holders the DHT names, up to lookupMaxHolders of them, until
// Config.LookupGrace after the first acceptable answer (or until every
// holder asked has answered and the DHT query has ended), and serves the
// best answer by the convergence rules. A record older than the key's floor
// (the best version this node has served, kept on disk) is refused.
const (
	lookupMaxHolders = 32
	// maxRefreshes bounds the background refreshes of cache entries in
	// flight at once.
	maxRefreshes = 64
	// floorExtendSlack: an account floor (void a retention after it was last
	// confirmed) is rewritten for the same version at most this often.
	floorExtendSlack = time.Hour
)

// ErrUnavailable: the registry network could not answer in time (no holder
// reachable, every fetch failed, only records older than the floor
// offered). Unlike a miss it is not remembered, and the API answers 503.
var ErrUnavailable = httpapi.ErrUnavailable

// lookup finds records of shards this node does not hold: DHT providers of
// the shard, then fetch from them in parallel, keeping the best answer.
// Results are cached, misses negative-cached, and concurrent lookups of one
// key share one network query.
type lookup struct {
	n        *Node
	bundles  *recordCache[*storage.Bundle]
	accounts *recordCache[*storage.Account]
	// misses maps a key to when a lookup found no record. (The caches are
	// plain LRUs with ages checked on read: golang-lru's expirable LRU runs
	// a goroutine that never ends.)
	misses *lru.Cache[string, time.Time]
	flight singleflight.Group

	mu         sync.Mutex // guards refreshing
	refreshing map[string]bool
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
}

type cached[T any] struct {
	v          T
	verifiedAt time.Time // last time a holder confirmed it (or something older)
	triedAt    time.Time // last network attempt, successful or not
}

func newLookup(n *Node) *lookup {
	l := &lookup{n: n, misses: newLRU[string, time.Time](n.cfg.CacheSize), refreshing: map[string]bool{}}
	retentionMS := n.cfg.Policy.Retention.Milliseconds()
	l.bundles = &recordCache[*storage.Bundle]{
		kind:      "bundle",
		floorKind: storage.FloorBundle,
		entries:   newLRU[protocol.Key, cached[*storage.Bundle]](n.cfg.CacheSize),
		fetch: func(ctx context.Context, p peer.ID, device protocol.Key) (*storage.Bundle, storage.Floor, error) {
			b, info, err := n.fetch.fetchLatest(ctx, p, device)
			if err != nil {
				return nil, storage.Floor{}, err
			}
			// A bundle's floor is void once honest holders stop serving it:
			// after the retention, or at the end of its KeyPackage lifetime.
			until := int64(info.TimestampMS) + retentionMS
			if info.NotAfterMS > 0 && int64(info.NotAfterMS) < until {
				until = int64(info.NotAfterMS)
			}
			return &storage.Bundle{Bundle: *b, BundleInfo: info, ReceivedAtMS: n.cfg.Now().UnixMilli()},
				storage.Floor{LastResort: info.LastResort, TimestampMS: info.TimestampMS, Ref: info.Ref, UntilMS: until}, nil
		},
		better: betterBundle,
		cmp:    cmpBundleFloor,
	}
	l.accounts = &recordCache[*storage.Account]{
		kind:      "account",
		floorKind: storage.FloorAccount,
		entries:   newLRU[protocol.Key, cached[*storage.Account]](n.cfg.CacheSize),
		fetch: func(ctx context.Context, p peer.ID, account protocol.Key) (*storage.Account, storage.Floor, error) {
			a, lamport, updatedAt, err := n.fetch.fetchAccount(ctx, p, account)
			if err != nil {
				return nil, storage.Floor{}, err
			}
			now := n.cfg.Now().UnixMilli()
			if updatedAt <= 0 {
				updatedAt = now
			}
			// An account's floor is void a retention after this node last
			// saw it, as holders prune an account not updated within the
			// retention.
			return &storage.Account{AccountBundle: *a, Lamport: lamport, UpdatedAtMS: updatedAt},
				storage.Floor{Lamport: lamport, PayloadHash: sha256.Sum256(a.Payload), UntilMS: now + retentionMS}, nil
		},
		better: func(fetched, cached *storage.Account) bool {
			return protocol.AccountSupersedes(fetched.Lamport, fetched.Payload, cached.Lamport, cached.Payload)
		},
		cmp: cmpAccountFloor,
	}
	return l
}

func newLRU[K comparable, V any](size int) *lru.Cache[K, V] {
	c, err := lru.New[K, V](size)
	if err != nil {
		panic(err) // size is validated positive in Config
	}
	return c
}

// cmpBundleFloor orders bundle versions by the "latest" rule (betterBundle).
func cmpBundleFloor(a, b storage.Floor) int {
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

// cmpAccountFloor orders account versions by the convergence rule
// (protocol.AccountSupersedes).
func cmpAccountFloor(a, b storage.Floor) int {
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

// errLookupMiss: holders answered and none has the record.
var errLookupMiss = errors.New("not found in the network")

func (l *lookup) bundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error) {
	return lookupRecord(ctx, l, l.bundles, device)
}

func (l *lookup) account(ctx context.Context, account protocol.Key) (*storage.Account, error) {
	return lookupRecord(ctx, l, l.accounts, account)
}

// lookupRecord serves key from the cache (refreshing an old entry in the
// background), else from the network, remembering misses (not outages).
// Errors are storage.ErrNotFound or ErrUnavailable.
func lookupRecord[T any](ctx context.Context, l *lookup, c *recordCache[T], key protocol.Key) (T, error) {
	var zero T
	flightKey := c.kind + string(key[:])
	now := l.n.cfg.Now()
	if e, ok := c.entries.Get(key); ok && now.Sub(e.verifiedAt) <= l.n.cfg.CacheTTL {
		l.n.metrics.lookups.WithLabelValues(c.kind, "cache_hit").Inc()
		if now.Sub(e.triedAt) > l.n.cfg.CacheRefresh {
			l.refresh(flightKey, func() (any, error) { return fetchInto(l, c, key) })
		}
		return e.v, nil
	}
	if at, ok := l.misses.Get(flightKey); ok && now.Sub(at) < l.n.cfg.NegativeTTL {
		l.n.metrics.lookups.WithLabelValues(c.kind, "negative_hit").Inc()
		return zero, storage.ErrNotFound
	}
	// The shared query runs under the node's lifetime, not this request's:
	// a caller that gives up does not fail the others. It ends within the
	// lookup timeout, so waiting for it is bounded.
	v, err, _ := l.flight.Do(flightKey, func() (any, error) {
		v, err := fetchInto(l, c, key)
		if errors.Is(err, errLookupMiss) {
			l.misses.Add(flightKey, l.n.cfg.Now())
		}
		return v, err
	})
	switch {
	case errors.Is(err, errLookupMiss):
		return zero, fmt.Errorf("%w: %v", storage.ErrNotFound, err)
	case err != nil:
		return zero, err
	}
	return v.(T), nil
}

// refresh runs fn (a refresh of flightKey) in a tracked goroutine, unless
// one is already running for that key or maxRefreshes are. A foreground
// lookup of the same key may join it (singleflight), so fn returns what a
// lookup returns.
func (l *lookup) refresh(flightKey string, fn func() (any, error)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.refreshing[flightKey] || len(l.refreshing) >= maxRefreshes {
		return
	}
	l.refreshing[flightKey] = true
	started := l.n.goTracked(func(context.Context) {
		defer func() {
			l.mu.Lock()
			delete(l.refreshing, flightKey)
			l.mu.Unlock()
		}()
		l.flight.Do(flightKey, fn)
	})
	if !started {
		delete(l.refreshing, flightKey)
	}
}

// fetchInto asks the network for key and caches what it finds, unless the
// cache holds a better record. A failed attempt keeps the cached entry and
// is remembered, so an outage costs one attempt per CacheRefresh per key.
func fetchInto[T any](l *lookup, c *recordCache[T], key protocol.Key) (T, error) {
	v, err := bestAnswer(l, c, key)
	now := l.n.cfg.Now()
	old, had := c.entries.Peek(key)
	if err != nil {
		result := "miss"
		if !errors.Is(err, errLookupMiss) {
			result = "unavailable"
		}
		l.n.metrics.lookups.WithLabelValues(c.kind, result).Inc()
		l.n.log.Debug("lookup failed", "kind", c.kind, "key", key, "err", err)
		if had {
			old.triedAt = now
			c.entries.Add(key, old)
		}
		return v, err
	}
	l.n.metrics.lookups.WithLabelValues(c.kind, "found").Inc()
	if had && !c.better(v, old.v) {
		old.verifiedAt, old.triedAt = now, now
		c.entries.Add(key, old)
		return old.v, nil
	}
	c.entries.Add(key, cached[T]{v: v, verifiedAt: now, triedAt: now})
	return v, nil
}

// bestAnswer asks the providers of key's shard (as the DHT reports them,
// at most lookupMaxHolders) in parallel and returns the best valid answer
// that is not below the key's floor, collected until LookupGrace after the
// first one, then raises the floor to it. With no acceptable answer it
// returns errLookupMiss if a holder said it has no record, else
// ErrUnavailable. It runs detached from any caller's context, within the
// node's lookup timeout, and returns only when every fetch it started has.
func bestAnswer[T any](l *lookup, c *recordCache[T], key protocol.Key) (T, error) {
	var zero T
	n := l.n
	shard := protocol.Shard(key, n.cfg.Shards.Count())
	floor, hasFloor, err := n.store.Floor(n.runCtx, c.floorKind, key, n.cfg.Now().UnixMilli())
	if err != nil {
		n.log.Warn("lookup: read floor", "key", key, "err", err)
	}
	ctx, cancel := context.WithTimeout(n.runCtx, n.cfg.LookupTimeout)
	type result struct {
		v     T
		floor storage.Floor
		err   error
	}
	// Buffered for every fetch, so none blocks once the lookup has decided.
	results := make(chan result, lookupMaxHolders)
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
		self                                       = n.host.ID()
	)
	providers := n.dht.holders(ctx, shard)
collect:
	for providers != nil || answered < asked {
		select {
		case p, ok := <-providers:
			if !ok {
				providers = nil
				continue
			}
			if p.ID == self {
				continue
			}
			if len(p.Addrs) > 0 {
				n.host.Peerstore().AddAddrs(p.ID, p.Addrs, time.Minute)
			}
			asked++
			if asked >= lookupMaxHolders {
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
			case r.err == nil && hasFloor && c.cmp(r.floor, floor) < 0:
				refused++
				n.metrics.lookups.WithLabelValues(c.kind, "refused_below_floor").Inc()
				n.log.Debug("lookup: refused a record older than the floor", "kind", c.kind, "key", key)
			case r.err == nil:
				if !have || c.cmp(r.floor, bestFloor) > 0 {
					best, bestFloor = r.v, r.floor
				}
				if !have {
					have = true
					t := time.NewTimer(n.cfg.LookupGrace)
					defer t.Stop()
					grace = t.C
				}
			case errors.Is(r.err, errNoRecord):
				notFound++
			case errors.Is(r.err, errNotHeld):
				// A stale provider record: no answer.
			default:
				failed++
				n.log.Debug("lookup: fetch failed", "kind", c.kind, "err", r.err)
			}
		case <-grace:
			break collect
		case <-ctx.Done():
			break collect
		}
	}
	if have {
		if hasFloor && c.cmp(bestFloor, floor) == 0 && bestFloor.UntilMS <= floor.UntilMS+floorExtendSlack.Milliseconds() {
			return best, nil // the floor already says so
		}
		if _, err := n.store.RaiseFloor(n.runCtx, c.floorKind, key, bestFloor, n.cfg.Now().UnixMilli(), c.cmp); err != nil {
			n.log.Warn("lookup: write floor", "key", key, "err", err)
		}
		return best, nil
	}
	// A miss needs the holders that said "no record" to outnumber those
	// that could not answer (failed, timed out, or lied below the floor): a
	// single provider (stale or hostile) saying NOT_FOUND while the others
	// are out of reach is an outage, not a miss, and must not become a
	// cached 404; an offline holder among honest "no record" answers is.
	if unanswered := failed + refused + (asked - answered); notFound > 0 && notFound >= unanswered {
		return zero, fmt.Errorf("%w: %d of %d holders have no record", errLookupMiss, notFound, asked)
	}
	return zero, fmt.Errorf("%w: %d holders asked, %d answered, %d failed, %d below the floor (%v)",
		ErrUnavailable, asked, answered, failed, refused, context.Cause(ctx))
}
