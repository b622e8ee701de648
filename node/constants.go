package node

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"

	"github.com/kpnode/kpnode/protocol"
)

// Mismatched peers. Nodes whose network constants differ never share a
// topic or a stream protocol (the constants' tag is in every ID), so a
// configuration split cannot cost an honest peer score; it would be silent,
// though: two halves of a network that never exchange a record. The node
// therefore watches identify: a peer that speaks kpnode protocols of this
// network name with another tag is logged (one Warn per peer per
// mismatchLogEvery, naming both sets of constants) and counted in
// kpnode_peers_mismatched_total.
const (
	mismatchLogEvery = time.Hour
	maxMismatchPeers = 1024
)

// mismatchWatch is the goroutine that reads identify events. Its owner
// starts it with startMismatchWatch and stops it with close.
type mismatchWatch struct {
	network, tag string // this node's network name and constants tag
	log          *slog.Logger
	metrics      *metrics
	seen         *simplelru.LRU[peer.ID, warned] // peers warned about
	now          func() time.Time
	sub          event.Subscription
	done         chan struct{}
}

func startMismatchWatch(ctx context.Context, n *Node, h host.Host) (*mismatchWatch, error) {
	sub, err := h.EventBus().Subscribe(new(event.EvtPeerIdentificationCompleted), eventbus.Name("kpnode/mismatch"))
	if err != nil {
		return nil, fmt.Errorf("identify events: %w", err)
	}
	// A plain LRU with times, not expirable.LRU, whose cleanup goroutine
	// would outlive close.
	seen, err := simplelru.NewLRU[peer.ID, warned](maxMismatchPeers, nil)
	if err != nil {
		sub.Close()
		return nil, err
	}
	w := &mismatchWatch{network: n.cfg.Network, tag: n.cfg.Constants().Tag(), log: n.log.With("component", "network"),
		metrics: n.metrics, seen: seen, now: time.Now, sub: sub, done: make(chan struct{})}
	go w.run(ctx)
	return w, nil
}

// warned is when a peer was last reported, with the tag it had.
type warned struct {
	tag string
	at  time.Time
}

func (w *mismatchWatch) run(ctx context.Context) {
	defer close(w.done)
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.sub.Out():
			if !ok {
				return
			}
			if ev, ok := e.(event.EvtPeerIdentificationCompleted); ok {
				w.check(ev.Peer, ev.Protocols)
			}
		}
	}
}

// close stops the watcher and waits for its goroutine.
func (w *mismatchWatch) close() {
	w.sub.Close()
	<-w.done
}

// check warns about p if it speaks a kpnode protocol of this network name
// with constants other than this node's. It reports whether it did.
func (w *mismatchWatch) check(p peer.ID, protos []p2pprotocol.ID) bool {
	tag, ok := mismatchedTag(w.network, w.tag, protos)
	if !ok {
		return false
	}
	now := w.now()
	if prev, ok := w.seen.Get(p); ok && prev.tag == tag && now.Sub(prev.at) < mismatchLogEvery {
		return true
	}
	w.seen.Add(p, warned{tag: tag, at: now})
	w.metrics.peerMismatched()
	w.log.Warn("peer runs this network with other network constants; the two never exchange records (same --network, different shard count, --mls-validation or --max-kp-lifetime)",
		"peer", p, "network", w.network, "ours", describeTag(w.tag), "theirs", describeTag(tag))
	return true
}

// mismatchedTag returns the constants tag of the first kpnode fetch or sync
// protocol in protos that names network with a tag other than ours.
// Protocol IDs look like /kpnode/{network}/{tag}/fetch/1.0.0.
func mismatchedTag(network, ours string, protos []p2pprotocol.ID) (string, bool) {
	for _, id := range protos {
		rest, ok := strings.CutPrefix(string(id), "/kpnode/")
		if !ok {
			continue
		}
		parts := strings.SplitN(rest, "/", 4)
		if len(parts) != 4 || (parts[2] != "fetch" && parts[2] != "sync") {
			continue
		}
		name, tag, ok := protocol.ParseNetworkID(parts[0] + "/" + parts[1])
		if ok && name == network && tag != ours {
			return tag, true
		}
	}
	return "", false
}

// describeTag spells a constants tag ("s8-strict-l7776000") out for an
// operator: "shards=8 mls=strict max_kp_lifetime=2160h0m0s". A tag it
// cannot read is returned as it is.
func describeTag(tag string) string {
	parts := strings.Split(tag, "-")
	if len(parts) != 3 || !strings.HasPrefix(parts[0], "s") || !strings.HasPrefix(parts[2], "l") {
		return tag
	}
	shards, err1 := strconv.Atoi(parts[0][1:])
	secs, err2 := strconv.ParseInt(parts[2][1:], 10, 64)
	if err1 != nil || err2 != nil {
		return tag
	}
	return fmt.Sprintf("shards=%d mls=%s max_kp_lifetime=%v (%s)", shards, parts[1], time.Duration(secs)*time.Second, tag)
}
