package node

import (
	"context"
	"errors"
	"fmt"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/node/lookup"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
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
// offered). Unlike a miss it is not remembered, and the API answers 503.
var ErrUnavailable = lookup.ErrUnavailable

// startLookup wires the lookup: holders from the DHT, records over the
// fetch client, floors in the store; it runs under ctx until Close.
func (n *Node) startLookup(ctx context.Context) error {
	l, err := lookup.New(lookup.Config{
		Holders:      n.dht,
		Fetcher:      n.fetchClient,
		Floors:       n.store,
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

// lookupBundle and lookupAccount ask the network for a key of a shard the
// node does not hold. An outage is also httpapi.ErrUnavailable, which the
// API answers 503.
func (n *Node) lookupBundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error) {
	b, err := n.lookup.Bundle(ctx, device)
	return b, lookupErr(err)
}

func (n *Node) lookupAccount(ctx context.Context, account protocol.Key) (*storage.Account, error) {
	a, err := n.lookup.Account(ctx, account)
	return a, lookupErr(err)
}

func lookupErr(err error) error {
	if errors.Is(err, lookup.ErrUnavailable) && !errors.Is(err, httpapi.ErrUnavailable) {
		return fmt.Errorf("%w: %w", httpapi.ErrUnavailable, err)
	}
	return err
}
