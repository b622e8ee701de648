package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/singleflight"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Defaults of the network lookup a node makes for keys of shards it does
// not hold.
const (
	DefaultLookupTimeout = 2 * time.Second
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
)

// lookup finds records of shards this node does not hold: DHT providers of
// the shard, then fetch from them in parallel; the first answer that
// validates wins. Results are cached, misses negative-cached, and concurrent
// lookups of one key share one network query.
type lookup struct {
	n        *Node
	bundles  *recordCache[*storage.Bundle]
	accounts *recordCache[*storage.Account]
	misses   *expirable.LRU[string, struct{}]
	flight   singleflight.Group
}

// recordCache caches one kind of fetched record.
type recordCache[T any] struct {
	kind    string // "bundle" or "account": metrics label and singleflight key prefix
	entries *expirable.LRU[protocol.Key, cached[T]]
	fetch   func(ctx context.Context, p peer.ID, key protocol.Key) (T, error)
	// better reports whether a fetched record replaces a cached one, so a
	// lagging holder cannot roll a cached record back.
	better func(fetched, cached T) bool
}

type cached[T any] struct {
	v          T
	verifiedAt time.Time // last time a holder confirmed it (or something older)
	triedAt    time.Time // last network attempt, successful or not
}

func newLookup(n *Node) *lookup {
	l := &lookup{n: n, misses: expirable.NewLRU[string, struct{}](n.cfg.CacheSize, nil, n.cfg.NegativeTTL)}
	l.bundles = &recordCache[*storage.Bundle]{
		kind:    "bundle",
		entries: expirable.NewLRU[protocol.Key, cached[*storage.Bundle]](n.cfg.CacheSize, nil, n.cfg.CacheTTL),
		fetch: func(ctx context.Context, p peer.ID, device protocol.Key) (*storage.Bundle, error) {
			b, info, err := n.fetch.fetchLatest(ctx, p, device)
			if err != nil {
				return nil, err
			}
			return &storage.Bundle{DeviceID: device, Ref: info.Ref, TimestampMS: info.TimestampMS, LastResort: info.LastResort,
				ReceivedAtMS: n.cfg.Now().UnixMilli(), Payload: b.Payload, Signature: b.Signature}, nil
		},
		better: betterBundle,
	}
	l.accounts = &recordCache[*storage.Account]{
		kind:    "account",
		entries: expirable.NewLRU[protocol.Key, cached[*storage.Account]](n.cfg.CacheSize, nil, n.cfg.CacheTTL),
		fetch: func(ctx context.Context, p peer.ID, account protocol.Key) (*storage.Account, error) {
			a, lamport, updatedAt, err := n.fetch.fetchAccount(ctx, p, account)
			if err != nil {
				return nil, err
			}
			if updatedAt <= 0 {
				updatedAt = n.cfg.Now().UnixMilli()
			}
			return &storage.Account{AccountPub: account, Lamport: lamport, UpdatedAtMS: updatedAt, Payload: a.Payload, Signature: a.Signature}, nil
		},
		better: func(fetched, cached *storage.Account) bool {
			return protocol.AccountSupersedes(fetched.Lamport, fetched.Payload, cached.Lamport, cached.Payload)
		},
	}
	return l
}

// errLookupMiss: no holder answered with a valid record in time.
var errLookupMiss = errors.New("not found in the network")

func (l *lookup) bundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error) {
	return lookupRecord(ctx, l, l.bundles, device)
}

func (l *lookup) account(ctx context.Context, account protocol.Key) (*storage.Account, error) {
	return lookupRecord(ctx, l, l.accounts, account)
}

// lookupRecord serves key from the cache (refreshing an old entry in the
// background), else from the network, remembering misses.
func lookupRecord[T any](ctx context.Context, l *lookup, c *recordCache[T], key protocol.Key) (T, error) {
	var zero T
	flightKey := c.kind + string(key[:])
	now := l.n.cfg.Now()
	if e, ok := c.entries.Get(key); ok && now.Sub(e.verifiedAt) <= l.n.cfg.CacheTTL {
		l.n.metrics.lookups.WithLabelValues(c.kind, "cache_hit").Inc()
		if now.Sub(e.triedAt) > l.n.cfg.CacheRefresh {
			// DoChan does not wait; its buffered channel is dropped.
			l.flight.DoChan(flightKey, func() (any, error) { return fetchInto(l, c, key) })
		}
		return e.v, nil
	}
	if _, ok := l.misses.Get(flightKey); ok {
		l.n.metrics.lookups.WithLabelValues(c.kind, "negative_hit").Inc()
		return zero, storage.ErrNotFound
	}
	v, err, _ := l.flight.Do(flightKey, func() (any, error) {
		v, err := fetchInto(l, c, key)
		if err != nil {
			l.misses.Add(flightKey, struct{}{})
		}
		return v, err
	})
	if err != nil {
		return zero, err
	}
	return v.(T), nil
}

// fetchInto asks the network for key and caches what it finds, unless the
// cache holds a better record. A failed attempt keeps the cached entry and
// is remembered, so an outage costs one attempt per CacheRefresh per key.
func fetchInto[T any](l *lookup, c *recordCache[T], key protocol.Key) (T, error) {
	v, err := firstAnswer(l, protocol.Shard(key, l.n.cfg.Shards.Count()), func(ctx context.Context, p peer.ID) (T, error) {
		return c.fetch(ctx, p, key)
	})
	now := l.n.cfg.Now()
	old, had := c.entries.Peek(key)
	if err != nil {
		l.n.metrics.lookups.WithLabelValues(c.kind, "miss").Inc()
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

// firstAnswer asks every provider of shard (as the DHT reports them) with
// fetch, in parallel, and returns the first valid answer. It gives up after
// the node's lookup timeout. It runs detached from any caller's context so a
// request that gives up does not fail the lookup other callers share.
func firstAnswer[T any](l *lookup, shard int, fetch func(context.Context, peer.ID) (T, error)) (T, error) {
	var zero T
	ctx, cancel := context.WithTimeout(l.n.runCtx, l.n.cfg.LookupTimeout)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	results := make(chan result)
	asked := 0
	self := l.n.host.ID()
	providers := l.n.dht.holders(ctx, shard)
	var lastErr error = errLookupMiss
	for providers != nil || asked > 0 {
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
				l.n.host.Peerstore().AddAddrs(p.ID, p.Addrs, time.Minute)
			}
			asked++
			go func() {
				v, err := fetch(ctx, p.ID)
				select {
				case results <- result{v, err}:
				case <-ctx.Done():
				}
			}()
		case r := <-results:
			asked--
			if r.err == nil {
				return r.v, nil
			}
			if !errors.Is(r.err, errNoRecord) && !errors.Is(r.err, errNotHeld) {
				l.n.log.Debug("lookup: fetch failed", "err", r.err)
			}
			lastErr = r.err
		case <-ctx.Done():
			return zero, fmt.Errorf("%w: %v", errLookupMiss, ctx.Err())
		}
	}
	return zero, fmt.Errorf("%w: %v", errLookupMiss, lastErr)
}
