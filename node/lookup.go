package node

import (
	"context"
	"fmt"

	"github.com/kpnode/kpnode/node/lookup"
)

// Defaults of the network lookup a node makes for keys of shards it does
// not hold (package lookup).
const (
	DefaultLookupTimeout = lookup.DefaultTimeout
	// DefaultLookupGrace is Config.LookupGrace's default.
	DefaultLookupGrace = lookup.DefaultGrace
	// DefaultCacheSize bounds the fetched bundles and account bundles a node
	// keeps in memory (each kind).
	DefaultCacheSize = lookup.DefaultCacheSize
	// DefaultCacheTTL is how long a fetched record may be served from the
	// cache at most.
	DefaultCacheTTL = lookup.DefaultCacheTTL
	// DefaultCacheRefresh is the age after which a cache hit is refreshed
	// from the network in the background (still served at once).
	DefaultCacheRefresh = lookup.DefaultCacheRefresh
	// DefaultNegativeTTL is how long a miss is remembered.
	DefaultNegativeTTL = lookup.DefaultNegativeTTL
)

// ErrUnavailable: the registry network could not answer in time (no holder
// reachable, every fetch failed, only records older than the floor
// offered). Unlike a miss it is not remembered, and the API answers 503
// (apiError).
var ErrUnavailable = lookup.ErrUnavailable

// startLookup wires the lookup: holders from the DHT, records over the
// fetch client, floors in the store; it runs under ctx until Close.
func (n *Node) startLookup(ctx context.Context) error {
	l, err := lookup.New(lookup.Config{
		Holders:      n.dht,
		Fetcher:      n.fetchClient,
		Floors:       n.store,
		Consumed:     n.store,
		AddrBook:     n.host.Peerstore(),
		Self:         n.host.ID(),
		ShardCount:   n.cfg.Shards.Count(),
		Retention:    n.cfg.Policy.Retention,
		Timeout:      n.cfg.LookupTimeout,
		Grace:        n.cfg.LookupGrace,
		CacheSize:    n.cfg.CacheSize,
		CacheTTL:     n.cfg.CacheTTL,
		CacheRefresh: n.cfg.CacheRefresh,
		NegativeTTL:  n.cfg.NegativeTTL,
		Now:          n.cfg.Now,
		Logger:       n.log.With("component", "lookup"),
		Registerer:   n.registry,
	})
	if err != nil {
		return fmt.Errorf("lookup: %w", err)
	}
	if err := l.Start(ctx); err != nil {
		return fmt.Errorf("lookup: %w", err)
	}
	n.lookup = l
	return nil
}
