package sync

import (
	"context"
	gosync "sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// Session pacing per peer. Each peer has a token bucket of sessions: a
// session takes a token, a token comes back every peerRefill, and the
// bucket holds at most peerBurst(shards) tokens: enough for the burst of
// sessions an honest node runs when it connects (three sets of every shard)
// and, sustained, one session every peerRefill — several times what the
// periodic loop needs at the default interval. The initiator paces itself
// with the same bucket (less two tokens of slack for network jitter), so an
// honest initiator is never refused. Both sides forget a well-behaved
// peer's bucket when its last connection closes.
const (
	peerRefill = 500 * time.Millisecond
	// More than maxStrikes sessions refused for the per-peer
	// concurrency, or more than the burst plus maxStrikes refused for
	// the rate, each count decaying by one per peerRefill, ban the
	// peer. The rate allows a burst more: an honest node that restarts
	// starts with a full bucket of its own while the responder still
	// remembers its sessions from before.
	maxStrikes = 8
	// maxTracked bounds the per-peer table; peers with nothing running
	// and a full bucket are forgotten first.
	maxTracked = 4096
)

func peerBurst(shards int) float64 { return float64(3*shards + 4) }

type peerState struct {
	active      int
	tokens      float64
	strikes     float64   // refusals for concurrency
	rateStrikes float64   // refusals for the rate
	at          time.Time // when tokens and strikes were last brought up to date
}

// peerPacer paces sessions per peer: concurrency, a token bucket, strikes.
type peerPacer struct {
	mu    gosync.Mutex
	burst float64
	peers map[peer.ID]*peerState
}

func newPeerPacer(shards int) *peerPacer {
	return &peerPacer{burst: peerBurst(shards), peers: map[peer.ID]*peerState{}}
}

// state returns p's entry brought up to now. Call with mu held.
func (sp *peerPacer) state(p peer.ID, now time.Time) *peerState {
	st, ok := sp.peers[p]
	if !ok {
		if len(sp.peers) >= maxTracked {
			sp.sweep(now)
		}
		st = &peerState{tokens: sp.burst, at: now}
		sp.peers[p] = st
		return st
	}
	if d := now.Sub(st.at); d > 0 {
		k := float64(d) / float64(peerRefill)
		st.tokens = min(sp.burst, st.tokens+k)
		st.strikes = max(0, st.strikes-k)
		st.rateStrikes = max(0, st.rateStrikes-k)
		st.at = now
	}
	return st
}

// sweep forgets idle peers. Call with mu held.
func (sp *peerPacer) sweep(now time.Time) {
	for p, st := range sp.peers {
		k := float64(now.Sub(st.at)) / float64(peerRefill)
		if st.active == 0 && st.tokens+k >= sp.burst && max(st.strikes, st.rateStrikes)-k <= 0 {
			delete(sp.peers, p)
		}
	}
}

// tryBegin starts a session with p if fewer than maxActive run and a token
// is left. reason says which limit refused it ("peer_sessions",
// "peer_rate"); ban says p has been refused too often.
func (sp *peerPacer) tryBegin(p peer.ID, maxActive int, now time.Time) (ok bool, reason string, ban bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	st := sp.state(p, now)
	switch {
	case st.active >= maxActive:
		st.strikes++
		return false, "peer_sessions", st.strikes > maxStrikes
	case st.tokens < 1:
		st.rateStrikes++
		return false, "peer_rate", st.rateStrikes > sp.burst+maxStrikes
	}
	st.active++
	st.tokens--
	return true, "", false
}

// forget drops p's entry when p has gone (its last connection closed),
// unless a session still runs or it has strikes: a peer that reconnects
// starts with a full bucket, as an honest node that restarted does.
func (sp *peerPacer) forget(p peer.ID, now time.Time) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if st, ok := sp.peers[p]; ok {
		st = sp.state(p, now)
		if st.active == 0 && st.strikes == 0 && st.rateStrikes == 0 {
			delete(sp.peers, p)
		}
	}
}

func (sp *peerPacer) end(p peer.ID) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if st, ok := sp.peers[p]; ok && st.active > 0 {
		st.active--
	}
}

// beginOutbound paces this node's own sessions with p: one at a time, and
// no faster than the responder's bucket (less two tokens of slack). With
// wait, it waits for its turn (or ctx); without, a busy peer is ErrBusy.
func (sp *peerPacer) beginOutbound(ctx context.Context, p peer.ID, wait bool) error {
	for {
		now := time.Now()
		sp.mu.Lock()
		st := sp.state(p, now)
		if st.active == 0 && st.tokens >= 3 {
			st.active++
			st.tokens--
			sp.mu.Unlock()
			return nil
		}
		sp.mu.Unlock()
		if !wait {
			return ErrBusy
		}
		t := time.NewTimer(peerRefill / 4)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}
