package node

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/kpnode/kpnode/protocol"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	p2pnetwork "github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	p2pconnmgr "github.com/libp2p/go-libp2p/p2p/net/connmgr"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus"
)

// identityFile is the node's libp2p private key inside the data dir.
const identityFile = "identity.key"

// LoadOrCreateIdentity reads the node's libp2p Ed25519 key from dataDir,
// creating it (mode 0600) on first start, so the peer ID is stable across
// restarts. It refuses a key file others can read.
func LoadOrCreateIdentity(dataDir string) (crypto.PrivKey, error) {
	path := filepath.Join(dataDir, identityFile)
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dataDir, 0o700); err != nil {
			return nil, err
		}
		sk, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			return nil, err
		}
		raw, err := crypto.MarshalPrivateKey(sk)
		if err != nil {
			return nil, err
		}
		// Write to a temporary file and rename, so a crash never leaves a
		// half-written identity behind.
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, raw, 0o600); err != nil {
			return nil, fmt.Errorf("write identity: %w", err)
		}
		if err := os.Rename(tmp, path); err != nil {
			return nil, fmt.Errorf("write identity: %w", err)
		}
		return sk, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read identity: %w", err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("identity %s has mode %v; it must not be readable by others (chmod 600)", path, fi.Mode().Perm())
	}
	sk, err := crypto.UnmarshalPrivateKey(raw)
	if err != nil {
		return nil, fmt.Errorf("identity %s: %w", path, err)
	}
	return sk, nil
}

// Connection manager watermarks: a registry node needs a few dozen peers
// (gossip mesh D=6 per topic, DHT buckets, fetch peers), far below the
// library's 160/192, which matters on a laptop or phone beside a chat client.
const (
	connLow   = 64
	connHigh  = 128
	connGrace = time.Minute
)

// Per-peer and per-protocol stream limits for kpnode's own protocols,
// enforced by libp2p's resource manager before a handler runs.
//
// Fetch: a peer gets at most 16 concurrent inbound fetch streams, the node
// at most 512. A light node looking up keys for its many clients asks one
// holder for several keys at once, so 16 leaves it room; what a served
// stream may allocate is bounded separately by the fetch response budgets
// (fetch.go), so these limits bound only handler goroutines and stream
// buffers (a stream waiting for its request costs a few KiB for at most
// StreamTimeout).
//
// Sync keeps the same values here on purpose: its responder admits at most
// 2 sessions per peer and 8 per node itself (node/sync/peers.go) and counts every
// refused stream as a strike toward a ban, which a lower limit here would
// hide (the resource manager resets the stream before the handler sees it).
const (
	fetchStreamsPerPeer = 16
	fetchStreamsPerNode = 512
	syncStreamsPerPeer  = 16
	syncStreamsPerNode  = 512
)

func resourceManager(network string) (p2pnetwork.ResourceManager, error) {
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	for _, l := range []struct {
		id             string
		perPeer, total int
	}{
		{protocol.FetchProtocol(network), fetchStreamsPerPeer, fetchStreamsPerNode},
		{protocol.SyncProtocol(network), syncStreamsPerPeer, syncStreamsPerNode},
	} {
		p := p2pprotocol.ID(l.id)
		limits.AddProtocolLimit(p, rcmgr.BaseLimit{StreamsInbound: l.total, StreamsOutbound: l.total, Streams: 2 * l.total, Memory: 64 << 20}, rcmgr.BaseLimitIncrease{})
		limits.AddProtocolPeerLimit(p, rcmgr.BaseLimit{StreamsInbound: l.perPeer, StreamsOutbound: l.perPeer, Streams: 2 * l.perPeer, Memory: 8 << 20}, rcmgr.BaseLimitIncrease{})
	}
	return rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits.AutoScale()))
}

// newHost builds the libp2p host: TCP and QUIC, the persisted identity,
// deliberate connection and resource limits, metrics on reg.
func newHost(cfg Config, sk crypto.PrivKey, gater connmgr.ConnectionGater, reg prometheus.Registerer) (host.Host, error) {
	opts, closeRM, err := hostOptions(cfg, gater)
	if err != nil {
		return nil, err
	}
	h, err := libp2p.New(append(opts,
		libp2p.Identity(sk),
		libp2p.ListenAddrStrings(cfg.Listen...),
		libp2p.PrometheusRegisterer(reg),
	)...)
	if err != nil {
		closeRM()
		return nil, fmt.Errorf("libp2p host: %w", err)
	}
	return h, nil
}

// HostOptions returns the libp2p options a kpnode host is built with —
// connection manager watermarks, the resource manager's per-protocol
// stream limits, the connection gater g (if not nil), the user agent — for
// a caller that builds the host itself and passes it as Config.Host. The
// caller adds the identity, transports and listen addresses (and, for a
// simulation, libp2p.DisableMetrics). cfg's Network, Shards, Policy and
// Version are used.
func HostOptions(cfg Config, g *Gater) ([]libp2p.Option, error) {
	var gater connmgr.ConnectionGater
	if g != nil {
		gater = g
	}
	opts, _, err := hostOptions(cfg, gater)
	return opts, err
}

func hostOptions(cfg Config, gater connmgr.ConnectionGater) (opts []libp2p.Option, closeRM func(), err error) {
	cm, err := p2pconnmgr.NewConnManager(connLow, connHigh, p2pconnmgr.WithGracePeriod(connGrace))
	if err != nil {
		return nil, nil, err
	}
	rm, err := resourceManager(cfg.Constants().NetworkID(cfg.Network))
	if err != nil {
		return nil, nil, err
	}
	opts = []libp2p.Option{
		libp2p.ConnectionManager(cm),
		libp2p.ResourceManager(rm),
		libp2p.UserAgent("kpnode/" + cfg.Version),
	}
	if gater != nil {
		opts = append(opts, libp2p.ConnectionGater(gater))
	}
	return opts, func() { rm.Close() }, nil
}

// Gater is a libp2p connection gater that enforces a node's peer bans: a
// banned peer can neither be dialled nor connect. Build a host with it
// (HostOptions), then pass both as Config.Host and Config.Gater; until the
// node is created it lets every peer through. One Gater serves one node.
type Gater struct {
	guard atomic.Pointer[peerGuard]
}

var _ connmgr.ConnectionGater = (*Gater)(nil)

// NewGater returns a Gater not yet bound to a node.
func NewGater() *Gater { return &Gater{} }

func (g *Gater) bind(guard *peerGuard) error {
	if !g.guard.CompareAndSwap(nil, guard) {
		return errors.New("the connection gater already serves another node")
	}
	return nil
}

func (g *Gater) banned(p peer.ID) bool {
	guard := g.guard.Load()
	return guard != nil && guard.banned(p)
}

// InterceptPeerDial refuses to dial a banned peer.
func (g *Gater) InterceptPeerDial(p peer.ID) bool { return !g.banned(p) }

// InterceptAddrDial allows every address.
func (g *Gater) InterceptAddrDial(peer.ID, ma.Multiaddr) bool { return true }

// InterceptAccept allows every inbound connection until its peer is known.
func (g *Gater) InterceptAccept(p2pnetwork.ConnMultiaddrs) bool { return true }

// InterceptSecured refuses a connection, either way, with a banned peer.
func (g *Gater) InterceptSecured(_ p2pnetwork.Direction, p peer.ID, _ p2pnetwork.ConnMultiaddrs) bool {
	return !g.banned(p)
}

// InterceptUpgraded allows every upgraded connection.
func (g *Gater) InterceptUpgraded(p2pnetwork.Conn) (bool, control.DisconnectReason) { return true, 0 }
