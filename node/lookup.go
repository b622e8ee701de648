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
	// DefaultCacheTTL is how long a fetched record is served from the cache
	// before the network is asked again.
	DefaultCacheTTL = time.Minute
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
	bundles  *expirable.LRU[protocol.Key, *storage.Bundle]
	accounts *expirable.LRU[protocol.Key, *storage.Account]
	misses   *expirable.LRU[string, struct{}]
	flight   singleflight.Group
}

func newLookup(n *Node) *lookup {
	return &lookup{
		n:        n,
		bundles:  expirable.NewLRU[protocol.Key, *storage.Bundle](n.cfg.CacheSize, nil, n.cfg.CacheTTL),
		accounts: expirable.NewLRU[protocol.Key, *storage.Account](n.cfg.CacheSize, nil, n.cfg.CacheTTL),
		misses:   expirable.NewLRU[string, struct{}](n.cfg.CacheSize, nil, n.cfg.NegativeTTL),
	}
}

// errLookupMiss: no holder answered with a valid record in time.
var errLookupMiss = errors.New("not found in the network")

func (l *lookup) bundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error) {
	if b, ok := l.bundles.Get(device); ok {
		l.n.metrics.lookups.WithLabelValues("bundle", "cache_hit").Inc()
		return b, nil
	}
	missKey := "b" + string(device[:])
	if _, ok := l.misses.Get(missKey); ok {
		l.n.metrics.lookups.WithLabelValues("bundle", "negative_hit").Inc()
		return nil, storage.ErrNotFound
	}
	v, err, _ := l.flight.Do(missKey, func() (any, error) {
		b, err := firstAnswer(ctx, l, protocol.Shard(device, l.n.cfg.Shards.Count()), func(ctx context.Context, p peer.ID) (*storage.Bundle, error) {
			pb, info, err := l.n.fetch.fetchLatest(ctx, p, device)
			if err != nil {
				return nil, err
			}
			return &storage.Bundle{DeviceID: device, Ref: info.Ref, TimestampMS: info.TimestampMS, LastResort: info.LastResort,
				ReceivedAtMS: l.n.cfg.Now().UnixMilli(), Payload: pb.Payload, Signature: pb.Signature}, nil
		})
		if err != nil {
			l.misses.Add(missKey, struct{}{})
			l.n.metrics.lookups.WithLabelValues("bundle", "miss").Inc()
			return nil, err
		}
		l.bundles.Add(device, b)
		l.n.metrics.lookups.WithLabelValues("bundle", "found").Inc()
		return b, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*storage.Bundle), nil
}

func (l *lookup) account(ctx context.Context, account protocol.Key) (*storage.Account, error) {
	if a, ok := l.accounts.Get(account); ok {
		l.n.metrics.lookups.WithLabelValues("account", "cache_hit").Inc()
		return a, nil
	}
	missKey := "a" + string(account[:])
	if _, ok := l.misses.Get(missKey); ok {
		l.n.metrics.lookups.WithLabelValues("account", "negative_hit").Inc()
		return nil, storage.ErrNotFound
	}
	v, err, _ := l.flight.Do(missKey, func() (any, error) {
		a, err := firstAnswer(ctx, l, protocol.Shard(account, l.n.cfg.Shards.Count()), func(ctx context.Context, p peer.ID) (*storage.Account, error) {
			ab, lamport, updatedAt, err := l.n.fetch.fetchAccount(ctx, p, account)
			if err != nil {
				return nil, err
			}
			if updatedAt <= 0 {
				updatedAt = l.n.cfg.Now().UnixMilli()
			}
			return &storage.Account{AccountPub: account, Lamport: lamport, UpdatedAtMS: updatedAt, Payload: ab.Payload, Signature: ab.Signature}, nil
		})
		if err != nil {
			l.misses.Add(missKey, struct{}{})
			l.n.metrics.lookups.WithLabelValues("account", "miss").Inc()
			return nil, err
		}
		l.accounts.Add(account, a)
		l.n.metrics.lookups.WithLabelValues("account", "found").Inc()
		return a, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*storage.Account), nil
}

// firstAnswer asks every provider of shard (as the DHT reports them) with
// fetch, in parallel, and returns the first valid answer. It gives up after
// the node's lookup timeout. It runs detached from the caller's context so a
// request that gives up does not fail the lookup other callers share.
func firstAnswer[T any](_ context.Context, l *lookup, shard int, fetch func(context.Context, peer.ID) (T, error)) (T, error) {
	var zero T
	ctx, cancel := context.WithTimeout(context.Background(), l.n.cfg.LookupTimeout)
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
