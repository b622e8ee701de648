package node

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Outbox worker. An entry is published to its topic once the topic has a
// peer (only holders subscribe to a shard's topics); a holder is then asked
// for the record over fetch, first outboxFirstCheck later and then with
// exponential backoff up to outboxMaxBackoff, publishing again each time the
// holder does not have it. The entry is deleted once a holder serves it (or
// something that supersedes it; a consume notice: a holder's answer
// carries it, or two holders' complete answers list none of its refs), or when it can no longer be delivered
// because it no longer validates (its signed timestamp is older than the
// retention). It survives restarts: the worker reloads the outbox at start.
const (
	outboxFirstCheck = time.Second
	outboxMaxBackoff = 5 * time.Minute
	// outboxBatch bounds the entries handled per round; outboxIdle is how
	// often the worker looks again with nothing due or everything waiting
	// for a holder (a topic peer event normally wakes it first).
	outboxBatch        = 64
	outboxIdle         = 30 * time.Second
	outboxHoldersAsked = 2
	outboxOpTimeout    = 5 * time.Second
	// outboxMaxBytes bounds the outbox on disk besides Config.OutboxMax:
	// 10,000 KeyPackages of a few KB fit many times over, 10,000 records at
	// the 64 KiB cap do not.
	outboxMaxBytes = 64 << 20
)

// DefaultOutboxMax caps the acknowledged publications waiting for a holder
// (Config.OutboxMax).
const DefaultOutboxMax = 10_000

func (n *Node) wakeOutbox() {
	select {
	case n.outboxWake <- struct{}{}:
	default:
	}
}

// outboxLoop runs the outbox until ctx ends.
func (n *Node) outboxLoop(ctx context.Context) {
	watched := map[*pubsub.Topic]bool{}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.outboxWake:
		case <-timer.C:
		}
		next := n.outboxRound(ctx, watched)
		wait := outboxIdle
		if next > 0 {
			wait = min(wait, max(0, time.Duration(next-n.cfg.Now().UnixMilli())*time.Millisecond))
		}
		timer.Stop()
		select {
		case <-timer.C:
		default:
		}
		timer.Reset(wait)
	}
}

// outboxTopic returns the gossip topic an entry is published on.
func (n *Node) outboxTopic(e storage.OutboxKind, key protocol.Key) *pubsub.Topic {
	shard := protocol.Shard(key, n.cfg.Shards.Count())
	if e == storage.OutboxAccount {
		return n.gossip.AccountTopic(shard)
	}
	return n.gossip.BundleTopic(shard)
}

// outboxRound handles the entries due now whose topic has a holder, and
// returns when the next one is due (Unix ms, 0 if none). For a topic with
// no peer it starts a watcher that wakes the worker when one joins.
func (n *Node) outboxRound(ctx context.Context, watched map[*pubsub.Topic]bool) int64 {
	if n.gossip == nil {
		return 0
	}
	peers := map[*pubsub.Topic][]peer.ID{}
	blocked := func(kind storage.OutboxKind, key protocol.Key) bool {
		t := n.outboxTopic(kind, key)
		ps, ok := peers[t]
		if !ok {
			ps = t.ListPeers()
			peers[t] = ps
			if len(ps) == 0 {
				n.outboxNeedsHolders(protocol.Shard(key, n.cfg.Shards.Count()))
			}
		}
		if len(ps) == 0 && !watched[t] {
			watched[t] = n.watchTopic(t)
		}
		return len(ps) == 0
	}
	now := n.cfg.Now().UnixMilli()
	due, next, err := n.outbox.Due(ctx, now, outboxBatch, blocked)
	if err != nil {
		if ctx.Err() == nil {
			n.log.Warn("outbox: read", "err", err)
		}
		return now + outboxIdle.Milliseconds()
	}
	for _, e := range due {
		if ctx.Err() != nil {
			return 0
		}
		n.outboxAttempt(ctx, e, peers[n.outboxTopic(e.Kind, e.Key)])
	}
	if len(due) > 0 {
		return n.cfg.Now().UnixMilli() // look again at once: more may be due
	}
	return next
}

// watchTopic wakes the worker whenever a peer joins t (the topic's event
// handler also reports the peers already there). It reports whether the
// watcher runs.
func (n *Node) watchTopic(t *pubsub.Topic) bool {
	h, err := t.EventHandler()
	if err != nil {
		n.log.Warn("outbox: topic events", "topic", t.String(), "err", err)
		return false
	}
	started := n.goTracked(func(ctx context.Context) {
		defer h.Cancel()
		for {
			ev, err := h.NextPeerEvent(ctx)
			if err != nil {
				return
			}
			if ev.Type == pubsub.PeerJoin {
				n.wakeOutbox()
			}
		}
	})
	if !started {
		h.Cancel()
	}
	return started
}

// outboxAttempt handles one due entry: confirm that a holder has it (if it
// was published before), else publish it, and schedule the next attempt.
func (n *Node) outboxAttempt(ctx context.Context, e *storage.OutboxEntry, holders []peer.ID) {
	log := n.log.With("outbox", e.Seq, "kind", string(e.Kind), "key", e.Key)
	if e.Attempts > 0 {
		if held, err := n.outboxHeld(ctx, e, holders); err == nil && held {
			if err := n.outbox.Remove(ctx, e.Seq); err != nil {
				log.Warn("outbox: remove", "err", err)
				return
			}
			n.outboxDone.WithLabelValues("confirmed").Inc()
			log.Debug("outbox: a holder has the publication", "attempts", e.Attempts)
			return
		}
	}
	if n.outboxConsumed(ctx, e) {
		// Consumed since it was queued, here or elsewhere (the holder's
		// answer just above carries the device's consume notices, which
		// the fetch client ingested): no holder would take it, and
		// re-sending it would only spread a KeyPackage that must not be
		// handed out.
		if err := n.outbox.Remove(ctx, e.Seq); err == nil {
			n.outboxDone.WithLabelValues("dropped").Inc()
			log.Debug("outbox: dropping a consumed bundle")
		}
		return
	}
	if verr := n.outboxValid(e); verr != nil {
		// Only a record that no longer validates (too old) gets here; no
		// holder would accept it.
		if err := n.outbox.Remove(ctx, e.Seq); err == nil {
			n.outboxDone.WithLabelValues("dropped").Inc()
			log.Warn("outbox: dropping a publication no holder would accept any more", "err", verr)
		}
		return
	}
	pctx, cancel := context.WithTimeout(ctx, outboxOpTimeout)
	err := n.gossipEntry(pctx, e)
	cancel()
	if err != nil && ctx.Err() == nil {
		log.Debug("outbox: publish", "err", err)
	}
	attempts := e.Attempts + 1
	backoff := outboxMaxBackoff
	if attempts <= 20 {
		backoff = min(outboxMaxBackoff, outboxFirstCheck<<(attempts-1))
	}
	if err := n.outbox.Reschedule(ctx, e.Seq, attempts, n.cfg.Now().Add(backoff).UnixMilli()); err != nil && ctx.Err() == nil {
		log.Warn("outbox: reschedule", "err", err)
	}
}

// outboxConsumed reports whether e is a bundle whose (device, ref) is
// tombstoned by a consume notice.
func (n *Node) outboxConsumed(ctx context.Context, e *storage.OutboxEntry) bool {
	if e.Kind != storage.OutboxBundle {
		return false
	}
	// The ref as the store keys it (validation derives it).
	info, err := n.cfg.Policy.ValidateBundle(&protocol.Bundle{DeviceID: e.Key, Payload: e.Payload, Signature: e.Signature}, n.cfg.Now())
	if err != nil {
		return false // outboxValid decides about a bundle that does not validate
	}
	consumed, err := n.store.Consumed(ctx, e.Key, info.Ref)
	return err == nil && consumed
}

// gossipEntry publishes a record on its topic.
func (n *Node) gossipEntry(ctx context.Context, e *storage.OutboxEntry) error {
	switch e.Kind {
	case storage.OutboxAccount:
		return n.gossip.PublishAccount(ctx, &protocol.AccountBundle{AccountPub: e.Key, Payload: e.Payload, Signature: e.Signature}, e.UpdatedAtMS)
	case storage.OutboxConsume:
		return n.gossip.PublishConsume(ctx, &protocol.ConsumeNotice{DeviceID: e.Key, Payload: e.Payload, Signature: e.Signature})
	}
	return n.gossip.PublishBundle(ctx, &protocol.Bundle{DeviceID: e.Key, Payload: e.Payload, Signature: e.Signature})
}

// outboxValid reports whether a holder would still accept the record. Only
// permanent failures count: a record refused for a transient reason (the
// clock window) is kept.
func (n *Node) outboxValid(e *storage.OutboxEntry) error {
	var err error
	switch e.Kind {
	case storage.OutboxAccount:
		_, err = n.cfg.Policy.ValidateAccount(&protocol.AccountBundle{AccountPub: e.Key, Payload: e.Payload, Signature: e.Signature})
	case storage.OutboxConsume:
		_, err = n.cfg.Policy.ValidateConsume(&protocol.ConsumeNotice{DeviceID: e.Key, Payload: e.Payload, Signature: e.Signature}, n.cfg.Now())
	default:
		_, err = n.cfg.Policy.ValidateBundle(&protocol.Bundle{DeviceID: e.Key, Payload: e.Payload, Signature: e.Signature}, n.cfg.Now())
	}
	var ve *protocol.ValidationError
	if errors.As(err, &ve) && ve.Transient() {
		return nil
	}
	return err
}

// outboxHeld asks up to outboxHoldersAsked holders whether they have the
// entry's record: for a bundle, the same KeyPackage (ref) with the same or
// a newer signed timestamp among the device's bundles; for an account
// bundle, the same one or one that supersedes it. A holder that cannot be
// asked is skipped. A consume notice is confirmed by outboxConsumeHeld.
func (n *Node) outboxHeld(ctx context.Context, e *storage.OutboxEntry, holders []peer.ID) (bool, error) {
	if e.Kind == storage.OutboxConsume {
		return n.outboxConsumeHeld(ctx, e, holders)
	}
	var lastErr error = fetch.ErrNoRecord
	for i, p := range holders {
		if i == outboxHoldersAsked {
			break
		}
		fctx, cancel := context.WithTimeout(ctx, outboxOpTimeout)
		held, err := n.holderHas(fctx, p, e)
		cancel()
		if err == nil {
			return held, nil
		}
		lastErr = err
	}
	return false, lastErr
}

// consumeSeen is what one holder's KIND_ALL answer says of a consume
// notice.
type consumeSeen int

const (
	// consumeUnseen: the holder lists a named ref, its answer was
	// truncated, or it could not be read.
	consumeUnseen consumeSeen = iota
	// consumeNoneListed: a complete answer lists none of the named refs
	// (a holder that never had the bundles answers so too).
	consumeNoneListed
	// consumeHeld: the answer carries the notice itself among the
	// device's consume notices.
	consumeHeld
)

// outboxConsumeHeld asks up to outboxHoldersAsked holders about a consume
// entry. It is confirmed by one holder whose answer carries the notice
// (FetchResponse.consumed), or by two distinct holders whose complete
// answers list none of the refs it names: a holder that never had the
// bundles lists none of them too, and a truncated answer proves nothing.
func (n *Node) outboxConsumeHeld(ctx context.Context, e *storage.OutboxEntry, holders []peer.ID) (bool, error) {
	var lastErr error = fetch.ErrNoRecord
	noneListed := 0
	for i, p := range holders {
		if i == outboxHoldersAsked {
			break
		}
		fctx, cancel := context.WithTimeout(ctx, outboxOpTimeout)
		seen, err := n.holderConsumed(fctx, p, e)
		cancel()
		switch {
		case err != nil:
			lastErr = err
			continue
		case seen == consumeHeld:
			return true, nil
		case seen == consumeNoneListed:
			noneListed++
		}
		lastErr = nil
	}
	if noneListed >= 2 {
		return true, nil
	}
	return false, lastErr
}

func (n *Node) holderHas(ctx context.Context, p peer.ID, e *storage.OutboxEntry) (bool, error) {
	if e.Kind == storage.OutboxAccount {
		a, err := n.fetchClient.FetchAccount(ctx, p, e.Key)
		if errors.Is(err, fetch.ErrNoRecord) {
			return false, nil
		} else if err != nil {
			return false, err
		}
		mine, err := n.cfg.Policy.ValidateAccount(&protocol.AccountBundle{AccountPub: e.Key, Payload: e.Payload, Signature: e.Signature})
		if err != nil {
			return false, err
		}
		same := a.Signature == e.Signature && string(a.Payload) == string(e.Payload)
		return same || protocol.AccountSupersedes(a.Lamport, a.Payload, mine, e.Payload), nil
	}
	ts, kp, err := protocol.SplitBundlePayload(e.Payload)
	if err != nil {
		return false, err
	}
	ref := protocol.KeyPackageRef(kp)
	resp, err := n.fetchClient.Request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: e.Key[:]})
	if errors.Is(err, fetch.ErrNoRecord) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	for _, b := range resp.Bundles {
		hts, hkp, err := protocol.SplitBundlePayload(b.Payload)
		if err == nil && hts >= ts && protocol.KeyPackageRef(hkp) == ref {
			return true, nil
		}
	}
	return false, nil
}

// holderConsumed reports what holder p's KIND_ALL answer for the device
// says of a consume entry: whether it carries the notice, else whether it
// is complete and lists none of the refs the entry names (refs computed as
// this node's policy computes them; a bundle that does not validate here
// is skipped).
func (n *Node) holderConsumed(ctx context.Context, p peer.ID, e *storage.OutboxEntry) (consumeSeen, error) {
	_, refs, err := protocol.DecodeConsumePayload(e.Payload)
	if err != nil {
		return consumeUnseen, err
	}
	named := make(map[protocol.Ref]bool, len(refs))
	for _, r := range refs {
		named[r] = true
	}
	resp, err := n.fetchClient.Request(ctx, p, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: e.Key[:]})
	if errors.Is(err, fetch.ErrNoRecord) {
		return consumeNoneListed, nil
	} else if err != nil {
		return consumeUnseen, err
	}
	for _, m := range resp.GetConsumed() {
		if bytes.Equal(m.GetDeviceId(), e.Key[:]) && bytes.Equal(m.GetPayload(), e.Payload) && bytes.Equal(m.GetSignature(), e.Signature[:]) {
			return consumeHeld, nil
		}
	}
	if strings.HasPrefix(resp.GetError(), "truncated") {
		return consumeUnseen, nil
	}
	now := n.cfg.Now()
	for _, m := range resp.Bundles {
		b, err := pb.ToBundle(m)
		if err != nil || b.DeviceID != e.Key {
			continue
		}
		if info, err := n.cfg.Policy.ValidateBundle(b, now); err == nil && named[info.Ref] {
			return consumeUnseen, nil
		}
	}
	return consumeNoneListed, nil
}
