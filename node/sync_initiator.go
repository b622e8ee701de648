package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// syncSession is the initiator's state of one session. The responder is
// not trusted: a response may only answer what its request asked (children
// of asked ranges, each once; listings of asked ranges, each once, a range
// split or listed, not both; records whose item IDs were wanted, each
// once), within per-response and per-session caps. Anything else bans the
// responder. Queues are bounded, and each round scans the store once per
// asked range that was answered: asked ranges never nest, so a round reads
// each stored item at most once.
type syncSession struct {
	s     *syncService
	p     peer.ID
	shard int
	set   pb.SyncRequest_Set
	kind  storage.SetKind

	queue   []queuedRange       // ranges to ask about
	pending map[string][]uint64 // wanted item IDs by listed prefix, not yet asked for
	order   []string            // prefixes of pending, first asked first
	npend   int                 // item IDs in pending

	rangesIn, idsIn  int    // received in this session
	scanned, scanCap uint64 // items this node scanned in this session
	pulled           int
}

// queuedRange is a range to ask about: our count and fingerprint, and the
// responder's count (its claim, which bounds what the answer may hold).
type queuedRange struct {
	prefix []byte
	count  uint64
	fp     [protocol.FingerprintSize]byte
	claim  uint64
}

// violation ends a session with a peer that broke a budget and bans it.
func (ss *syncSession) violation(reason string) error {
	ss.s.n.guard.penalize(ss.p, "sync", reason)
	return fmt.Errorf("%w: %s", errSyncViolation, reason)
}

// syncShard runs one initiator session: it pulls the records of shard's set
// that p holds and this node lacks, and returns how many it stored.
func (s *syncService) syncShard(ctx context.Context, p peer.ID, shard int, set pb.SyncRequest_Set, wait bool) (pulled int, err error) {
	// A panic on the peer's bytes (records are parsed before they are
	// verified) ends the session, never the process.
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("sync: panic in a session", "peer", p, "shard", shard, "set", set, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("sync: panic: %v", r)
		}
	}()
	if shard < 0 || shard >= len(s.shardLocks) {
		return 0, fmt.Errorf("no shard %d", shard)
	}
	if wait {
		s.shardLocks[shard].Lock()
	} else if !s.shardLocks[shard].TryLock() {
		return 0, errSyncBusy
	}
	defer s.shardLocks[shard].Unlock()
	if err := s.outbound.beginOutbound(ctx, p, wait); err != nil {
		return 0, err
	}
	defer s.outbound.end(p)
	ctx, cancel := context.WithTimeout(ctx, syncSessionLimit)
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)() // the service's close ends it too
	kind := setKind(set)
	root := s.n.store.ShardDigest(kind, shard)
	ss := &syncSession{s: s, p: p, shard: shard, set: set, kind: kind, pending: map[string][]uint64{},
		queue:   []queuedRange{{count: root.Count, fp: root.Fingerprint(), claim: 256}},
		scanCap: syncWorkFactor*root.Count + syncWorkSlack}
	defer func() { pulled = ss.pulled }()
	return 0, ss.run(ctx)
}

func (ss *syncSession) run(ctx context.Context) error {
	s := ss.s
	raw, err := s.h.NewStream(ctx, ss.p, s.proto)
	if err != nil {
		return err
	}
	st := &countingStream{Stream: raw}
	defer func() {
		_ = st.Close()
		s.n.metrics.syncBytes.WithLabelValues("in").Add(float64(st.read))
		s.n.metrics.syncBytes.WithLabelValues("out").Add(float64(st.written))
	}()
	stop := context.AfterFunc(ctx, func() { _ = raw.Reset() })
	defer stop()
	w, r := pbio.NewDelimitedWriter(st), pbio.NewDelimitedReader(st, syncMaxResponse)
	for round := 0; ; round++ {
		req := ss.nextRequest()
		if len(req.Ranges) == 0 && len(req.Want) == 0 {
			break
		}
		if round == syncMaxRounds {
			return fmt.Errorf("%w: %d rounds", errSyncBudget, round)
		}
		if st.read > syncMaxSessionBytes {
			return fmt.Errorf("%w: %d bytes", errSyncBudget, st.read)
		}
		_ = raw.SetDeadline(time.Now().Add(s.n.cfg.StreamTimeout))
		if err := w.WriteMsg(req); err != nil {
			return fmt.Errorf("round %d: %w", round, err)
		}
		var resp pb.SyncResponse
		if err := r.ReadMsg(&resp); err != nil {
			if malformedMsg(err) {
				return ss.violation("malformed_response")
			}
			return fmt.Errorf("round %d: %w", round, err)
		}
		s.n.metrics.syncRounds.Inc()
		switch resp.Status {
		case pb.SyncResponse_STATUS_OK:
		case pb.SyncResponse_STATUS_NOT_HOLDER:
			return errNotHeld
		default:
			return fmt.Errorf("peer answered %v", resp.Status)
		}
		if err := ss.round(ctx, req, &resp); err != nil {
			return err
		}
	}
	_ = raw.CloseWrite()
	// Wait (briefly) for the responder to close its side: it frees this
	// session's slot first, so the next session with it, which may follow
	// at once (SyncNow runs both sets back to back), is never refused for
	// overlapping one that is over.
	_ = raw.SetReadDeadline(time.Now().Add(min(time.Second, s.n.cfg.StreamTimeout)))
	_, _ = io.Copy(io.Discard, io.LimitReader(raw, 1))
	return nil
}

// nextRequest takes the next ranges and wants. The ranges asked are
// chosen so that even an answer that splits or lists each of them in full
// (by the responder's own counts) stays at half the response caps.
func (ss *syncSession) nextRequest() *pb.SyncRequest {
	req := &pb.SyncRequest{Shard: uint32(ss.shard), Set: ss.set}
	var children, ids uint64
	n := 0
	for ; n < len(ss.queue) && n < syncMaxRanges; n++ {
		q := ss.queue[n]
		// A large range is split into at most 256 children, or listed
		// when it holds a single key: up to syncMaxListing IDs (one
		// device's bundles, as many as the responder's own per-device
		// quota keeps).
		c, i := uint64(0), min(q.claim, syncMaxListing)
		if q.claim > syncListThreshold {
			c = min(q.claim, 256)
		}
		if n > 0 && (children+c > syncMaxRespRanges/2 || ids+i > syncMaxRespIDs/2) {
			break
		}
		children, ids = children+c, ids+i
		req.Ranges = append(req.Ranges, &pb.SyncRange{Prefix: q.prefix, Count: q.count, Fingerprint: bytes.Clone(q.fp[:])})
	}
	ss.queue = ss.queue[n:]
	taken := 0
	for len(ss.order) > 0 && taken < syncMaxWant && len(req.Want) < syncMaxListings {
		prefix := ss.order[0]
		ids := ss.pending[prefix]
		k := min(len(ids), syncMaxWant-taken)
		req.Want = append(req.Want, &pb.SyncListing{Prefix: []byte(prefix), Ids: ids[:k:k]})
		taken += k
		if k == len(ids) {
			delete(ss.pending, prefix)
			ss.order = ss.order[1:]
		} else {
			ss.pending[prefix] = ids[k:]
		}
	}
	ss.npend -= taken
	return req
}

// addWants queues wanted IDs under a listed prefix (one entry per prefix,
// so a request never names a prefix twice). It reports false when the
// pending budget is full; the rest waits for the next session.
func (ss *syncSession) addWants(prefix string, ids []uint64) bool {
	if len(ids) == 0 {
		return true
	}
	room := syncMaxPending - ss.npend
	full := len(ids) > room
	ids = ids[:min(len(ids), room)]
	if len(ids) == 0 {
		return false
	}
	if _, ok := ss.pending[prefix]; !ok {
		ss.order = append(ss.order, prefix)
	}
	ss.pending[prefix] = append(ss.pending[prefix], ids...)
	ss.npend += len(ids)
	return !full
}

// round checks a response against its request, ingests the records and
// queues what to ask next.
func (ss *syncSession) round(ctx context.Context, req *pb.SyncRequest, resp *pb.SyncResponse) error {
	const (
		askedRange = iota + 1
		splitRange
		listedRange
	)
	asked := make(map[string]uint8, len(req.Ranges))
	for _, rg := range req.Ranges {
		asked[string(rg.Prefix)] = askedRange
	}
	// Children, grouped by parent, each once.
	if len(resp.Ranges) > syncMaxRespRanges {
		return ss.violation("response_ranges")
	}
	if ss.rangesIn += len(resp.Ranges); ss.rangesIn > syncMaxSessionRanges {
		return ss.violation("session_ranges")
	}
	byParent := map[string][]*pb.SyncRange{}
	seen := make(map[string]bool, len(resp.Ranges))
	for _, rg := range resp.Ranges {
		l := len(rg.Prefix)
		if l == 0 || l >= protocol.KeySize || rg.Count == 0 || len(rg.Fingerprint) != protocol.FingerprintSize {
			return ss.violation("malformed_range")
		}
		parent := string(rg.Prefix[:l-1])
		if st := asked[parent]; st != askedRange && st != splitRange {
			return ss.violation("unasked_range")
		}
		if seen[string(rg.Prefix)] {
			return ss.violation("duplicate_range")
		}
		seen[string(rg.Prefix)] = true
		asked[parent] = splitRange
		byParent[parent] = append(byParent[parent], rg)
	}
	// Listings of asked ranges, each once, not of split ones.
	ids := 0
	for _, l := range resp.Listings {
		if asked[string(l.Prefix)] != askedRange {
			return ss.violation("unasked_listing")
		}
		asked[string(l.Prefix)] = listedRange
		// An ID twice is no violation: two items may share a 64-bit ID
		// (a mined collision); duplicates are dropped below.
		if len(l.Ids) > syncMaxListing {
			return ss.violation("malformed_listing")
		}
		ids += len(l.Ids)
	}
	if ids > syncMaxRespIDs {
		return ss.violation("response_ids")
	}
	if ss.idsIn += ids; ss.idsIn > syncMaxSessionIDs {
		return ss.violation("session_ids")
	}
	if err := ss.ingest(ctx, req, resp); err != nil {
		return err
	}
	// Compare children with ours: one scan per asked range answered.
	for parent, rs := range byParent {
		_, children, _, err := ss.s.n.store.PrefixDigests(ctx, ss.kind, ss.shard, []byte(parent))
		if err != nil {
			return err
		}
		if err := ss.scan(children); err != nil {
			return err
		}
		for _, rg := range rs {
			mine := children[rg.Prefix[len(rg.Prefix)-1]]
			if fp := mine.Fingerprint(); !bytes.Equal(fp[:], rg.Fingerprint) {
				ss.queue = append(ss.queue, queuedRange{prefix: rg.Prefix, count: mine.Count, fp: fp, claim: rg.Count})
			}
		}
	}
	// Listings: want what we lack and have not refused.
	now := ss.s.n.cfg.Now()
	for _, l := range resp.Listings {
		mine, err := ss.s.n.store.PrefixItems(ctx, ss.kind, ss.shard, l.Prefix)
		if err != nil {
			return err
		}
		ss.scanned += uint64(len(mine))
		ss.s.scanned.WithLabelValues("initiator").Add(float64(len(mine)))
		if ss.scanned > ss.scanCap {
			return fmt.Errorf("%w: scanned %d items", errSyncBudget, ss.scanned)
		}
		have := make(map[uint64]bool, len(mine))
		for _, h := range mine {
			have[protocol.ItemID(h)] = true
		}
		var want []uint64
		for _, id := range l.Ids {
			if !have[id] && !ss.s.refused.has(ss.kind, id, now) {
				want = append(want, id)
				have[id] = true // a duplicate in the listing is wanted once
			}
		}
		if !ss.addWants(string(l.Prefix), want) {
			break // the pending budget is full; the next session asks for the rest
		}
	}
	return nil
}

// scan charges the items of a PrefixDigests scan to the session.
func (ss *syncSession) scan(children [256]protocol.Digest) error {
	var n uint64
	for _, c := range children {
		n += c.Count
	}
	ss.scanned += n
	ss.s.scanned.WithLabelValues("initiator").Add(float64(n))
	if ss.scanned > ss.scanCap {
		return fmt.Errorf("%w: scanned %d items", errSyncBudget, ss.scanned)
	}
	return nil
}

// ingest validates and stores the records of a response. Only records
// whose item IDs the request wanted are validated, each item (by its full
// hash) once; any other record, or one whose signature does not verify, is
// a violation (no honest responder holds it). Two different records may
// share a wanted 64-bit ID (a mined collision): the responder sends both,
// and both are accepted. A valid record this node does not keep, and a
// signed one it refuses, is remembered so that it is not pulled again.
func (ss *syncSession) ingest(ctx context.Context, req *pb.SyncRequest, resp *pb.SyncResponse) error {
	wanted := map[uint64][]byte{} // item ID → prefix of its want
	for _, l := range req.Want {
		for _, id := range l.Ids {
			wanted[id] = l.Prefix
		}
	}
	if len(wanted) == 0 && len(resp.Bundles)+len(resp.Accounts) > 0 {
		return ss.violation("unsolicited_record")
	}
	if ss.kind == storage.BundleSet && len(resp.Accounts) > 0 || ss.kind == storage.AccountSet && len(resp.Bundles) > 0 {
		return ss.violation("unsolicited_record")
	}
	got := map[uint64]bool{}       // wanted IDs answered
	gotItem := map[[32]byte]bool{} // items received
	accept := func(key protocol.Key, item [32]byte, ok bool) (uint64, error) {
		id := protocol.ItemID(item)
		prefix, isWanted := wanted[id]
		switch {
		case !ok:
			return id, ss.violation("malformed_record")
		case !isWanted || gotItem[item]:
			return id, ss.violation("unsolicited_record")
		case protocol.Shard(key, ss.s.n.cfg.Shards.Count()) != ss.shard:
			return id, ss.violation("record_of_another_shard")
		case !bytes.HasPrefix(key[:], prefix):
			return id, ss.violation("unsolicited_record")
		}
		got[id], gotItem[item] = true, true
		return id, nil
	}
	now := ss.s.n.cfg.Now()
	for _, m := range resp.Bundles {
		b, err := pb.ToBundle(m)
		if err != nil {
			return ss.violation("malformed_record")
		}
		item, ok := ss.s.claimedBundleItem(b)
		id, err := accept(b.DeviceID, item, ok)
		if err != nil {
			return err
		}
		outcome, _, err := ss.s.n.ingestBundle(ctx, b, sourceSync)
		if err := ss.outcome(id, outcome, err, now); err != nil {
			return err
		}
	}
	for _, m := range resp.Accounts {
		a, err := pb.ToAccount(m)
		if err != nil {
			return ss.violation("malformed_record")
		}
		lamport, err := protocol.AccountLamport(a.Payload)
		id, err := accept(a.AccountPub, protocol.AccountItem(a.AccountPub, lamport, a.Payload), err == nil)
		if err != nil {
			return err
		}
		_, outcome, err := ss.s.n.ingestAccount(ctx, a, storage.AccountConverge, sourceSync)
		if err := ss.outcome(id, outcome, err, now); err != nil {
			return err
		}
	}
	if resp.Truncated {
		if len(got) == 0 {
			return ss.violation("truncated_empty")
		}
		// Asked-for records the responder left out: ask again.
		for _, l := range req.Want {
			var rest []uint64
			for _, id := range l.Ids {
				if !got[id] {
					rest = append(rest, id)
				}
			}
			ss.addWants(string(l.Prefix), rest)
		}
	}
	return nil
}

// outcome handles what ingesting a wanted record gave.
func (ss *syncSession) outcome(id uint64, outcome storage.PutOutcome, err error, now time.Time) error {
	var ve *protocol.ValidationError
	switch {
	case errors.As(err, &ve):
		switch ve.Rule {
		case protocol.RulePayloadTooLarge, protocol.RuleKeyNotPoint, protocol.RuleSignature, protocol.RuleAccountHeader:
			// Not signed by its key, or breaking a network constant: no
			// honest node stores it.
			return ss.violation("invalid_record")
		case protocol.RuleTimestampFuture, protocol.RuleMLS + "_lifetime_not_yet_valid":
			// Valid later: pull it again then.
		default:
			ss.s.refused.add(ss.kind, id, now)
		}
	case errors.Is(err, storage.ErrStale):
		ss.s.refused.add(ss.kind, id, now)
	case err != nil:
		return err
	case outcome == storage.Stored || outcome == storage.Refreshed:
		ss.pulled++
	default: // over quota, or a newer copy held
		ss.s.refused.add(ss.kind, id, now)
	}
	return nil
}

// claimedBundleItem computes a bundle's sync item hash from its bytes,
// without verifying anything: the signed timestamp and the KeyPackageRef,
// parsed the way validation parses them. ok is false when they cannot be
// read.
func (s *syncService) claimedBundleItem(b *protocol.Bundle) (item [32]byte, ok bool) {
	ts, kp, err := protocol.SplitBundlePayload(b.Payload)
	if err != nil || len(b.Payload) > protocol.MaxPayloadSize {
		return item, false
	}
	ref := protocol.KeyPackageRef(kp)
	if s.n.cfg.Policy.MLS != protocol.MLSOff {
		parsed, err := mls.Parse(kp)
		if err != nil {
			return item, false
		}
		ref = protocol.Ref(mls.Ref(parsed.Raw))
	}
	return protocol.BundleItem(b.DeviceID, ts, ref), true
}
