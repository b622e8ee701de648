package node

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/kpnode/kpnode/protocol"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	p2pnetwork "github.com/libp2p/go-libp2p/core/network"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
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
// 2 sessions per peer and 8 per node itself (sync_peers.go) and counts every
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
func newHost(cfg Config, netID string, sk crypto.PrivKey, gater *peerGuard, reg prometheus.Registerer) (host.Host, error) {
	cm, err := connmgr.NewConnManager(connLow, connHigh, connmgr.WithGracePeriod(connGrace))
	if err != nil {
		return nil, err
	}
	rm, err := resourceManager(netID)
	if err != nil {
		return nil, err
	}
	h, err := libp2p.New(
		libp2p.Identity(sk),
		libp2p.ListenAddrStrings(cfg.Listen...),
		libp2p.ConnectionManager(cm),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionGater(gater),
		libp2p.PrometheusRegisterer(reg),
		libp2p.UserAgent("kpnode/"+cfg.Version),
	)
	if err != nil {
		rm.Close()
		return nil, fmt.Errorf("libp2p host: %w", err)
	}
	return h, nil
}
