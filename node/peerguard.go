package node

import (
	"log/slog"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/prometheus/client_golang/prometheus"
)

// Peer bans. A peer that breaks a protocol budget (a request that is cheap
// to send and expensive to answer, a response that answers what was not
// asked, more sessions or rounds than allowed) is hostile or broken: honest
// peers stay far below every budget. It is cut off at once and refused for
// banDuration: its connections are closed, the connection gater refuses
// new ones both ways, and its gossipsub score drops below the graylist
// threshold, so nothing it sends is processed.
const (
	banDuration = 15 * time.Minute
	// maxBans bounds the ban list (peer IDs cost nothing to mint); the
	// oldest ban is forgotten first.
	maxBans = 10_000
)

// peerGuard remembers banned peers. It is a libp2p connection gater and
// the source of gossipsub's app-specific score. Safe for concurrent use.
type peerGuard struct {
	// bans maps a peer to the end of its ban. (expirable.LRU would do the
	// expiry itself, but it runs a goroutine that never ends.)
	bans      *lru.Cache[peer.ID, time.Time]
	now       func() time.Time
	log       *slog.Logger
	penalties *prometheus.CounterVec
	host      host.Host // set once the host exists; nil before
}

func newPeerGuard(log *slog.Logger, reg prometheus.Registerer, now func() time.Time) *peerGuard {
	bans, err := lru.New[peer.ID, time.Time](maxBans)
	if err != nil {
		panic(err) // only for a size < 1
	}
	g := &peerGuard{
		bans: bans,
		now:  now,
		log:  log,
		penalties: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kpnode_peer_penalties_total",
			Help: "Peers cut off for breaking a protocol budget, by protocol and reason."}, []string{"protocol", "reason"}),
	}
	reg.MustRegister(g.penalties)
	return g
}

// penalize bans p for banDuration and closes its connections. proto names
// the protocol (sync, fetch, gossip) and reason the budget it broke; both
// label kpnode_peer_penalties_total and the log line.
// Penalize implements ingest.Penalizer.
func (g *peerGuard) Penalize(p peer.ID, proto, reason string) { g.penalize(p, proto, reason) }

func (g *peerGuard) penalize(p peer.ID, proto, reason string) {
	if p == "" || (g.host != nil && p == g.host.ID()) {
		return
	}
	g.penalties.WithLabelValues(proto, reason).Inc()
	g.bans.Add(p, g.now().Add(banDuration))
	g.log.Info("peer cut off for breaking a budget", "peer", p, "protocol", proto, "reason", reason, "for", banDuration)
	if g.host != nil {
		_ = g.host.Network().ClosePeer(p)
	}
}

// banned reports whether p is banned now.
func (g *peerGuard) banned(p peer.ID) bool {
	until, ok := g.bans.Peek(p)
	if ok && !g.now().Before(until) {
		g.bans.Remove(p)
		return false
	}
	return ok
}

// Banned reports whether p is banned now (gossip graylists it).
func (g *peerGuard) Banned(p peer.ID) bool { return g.banned(p) }

// The connection gater: a banned peer can neither be dialled nor connect.

func (g *peerGuard) InterceptPeerDial(p peer.ID) bool { return !g.banned(p) }

func (g *peerGuard) InterceptAddrDial(peer.ID, ma.Multiaddr) bool { return true }

func (g *peerGuard) InterceptAccept(network.ConnMultiaddrs) bool { return true }

func (g *peerGuard) InterceptSecured(_ network.Direction, p peer.ID, _ network.ConnMultiaddrs) bool {
	return !g.banned(p)
}

func (g *peerGuard) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) { return true, 0 }
