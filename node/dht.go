package node

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	mh "github.com/multiformats/go-multihash"

	"github.com/kpnode/kpnode/protocol"
)

// Provider records live 48 h on the peers that store them and the DHT does
// not refresh them itself. kpnode re-provides every shard it holds hourly:
// eight records per node is cheap, and an hour bounds how long a network that
// grew or churned can miss a holder.
const (
	reprovideInterval = time.Hour
	provideTimeout    = 30 * time.Second
)

// shardCID names a shard in the DHT: CIDv1 raw of sha2-256("kpnode/{network}/shard/{n}").
func shardCID(network string, shard int) cid.Cid {
	sum, err := mh.Sum(protocol.ShardProviderKey(network, shard), mh.SHA2_256, -1)
	if err != nil {
		panic(err) // sha2-256 is always available
	}
	return cid.NewCidV1(cid.Raw, sum)
}

// discovery runs the private Kademlia DHT: server mode on full nodes
// (which provide their shards), client mode on light nodes.
type discovery struct {
	n       *Node
	dht     *dht.IpfsDHT
	log     *slog.Logger
	network string
	// provided is set once every held shard has been provided.
	provided atomic.Bool
}

func startDHT(n *Node, h host.Host) (*discovery, error) {
	mode := dht.ModeServer
	if n.cfg.Light {
		mode = dht.ModeClient
	}
	d, err := dht.New(h,
		dht.Mode(mode),
		dht.ProtocolPrefix(p2pprotocol.ID(protocol.DHTPrefix(n.netID))),
	)
	if err != nil {
		return nil, fmt.Errorf("dht: %w", err)
	}
	return &discovery{n: n, dht: d, log: n.log.With("component", "dht"), network: n.netID}, nil
}

func (d *discovery) close() error { return d.dht.Close() }

// provideLoop announces every held shard as soon as the routing table has
// peers, retries failures with backoff, and re-provides periodically.
func (d *discovery) provideLoop(ctx context.Context) {
	shards := d.n.cfg.Shards.List()
	if d.n.cfg.Light || len(shards) == 0 {
		return
	}
	const firstBackoff = 100 * time.Millisecond
	backoff := firstBackoff
	for {
		ok := d.dht.RoutingTable().Size() > 0 && d.provideAll(ctx, shards)
		wait := reprovideInterval
		if !ok {
			wait = backoff
			backoff = min(2*backoff, 30*time.Second)
		} else {
			d.provided.Store(true)
			backoff = firstBackoff
		}
		if !sleep(ctx, wait) {
			return
		}
	}
}

func (d *discovery) provideAll(ctx context.Context, shards []int) bool {
	all := true
	for _, s := range shards {
		pctx, cancel := context.WithTimeout(ctx, provideTimeout)
		err := d.dht.Provide(pctx, shardCID(d.network, s), true)
		cancel()
		if err != nil {
			d.log.Debug("provide failed", "shard", s, "err", err)
			all = false
			continue
		}
		d.n.metrics.provides.Inc()
	}
	if all {
		d.log.Debug("provided shards", "shards", shards)
	}
	return all
}

// Holders streams the peers that provide a shard (lookup.HolderFinder);
// the channel closes when the DHT query ends or ctx does.
func (d *discovery) Holders(ctx context.Context, shard int) <-chan peer.AddrInfo {
	return d.dht.FindProvidersAsync(ctx, shardCID(d.network, shard), 0)
}
