package sync

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Initiator is one session's initiator: it pulls the records of a shard's
// set that the responder holds and this node lacks.
//
// The responder is not trusted: a response may only answer what its
// request asked (children of asked ranges, each once; listings of asked
// ranges, each once, a range split or listed, not both; records whose item
// IDs were wanted, each once), within per-response and per-session caps.
// Anything else is a violation: the session ends with ErrViolation and the
// responder is penalized. Queues are bounded, and each round scans the
// store once per asked range that was answered: asked ranges never nest,
// so a round reads each stored item at most once.
type Initiator struct {
	l     *Local
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
	read             int64  // response bytes read
	wanted           int    // item IDs asked for
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

// NewInitiator prepares a session that reconciles shard's set with peer p.
// It starts from the root of this node's set as it is now.
func NewInitiator(l *Local, p peer.ID, shard int, set pb.SyncRequest_Set) *Initiator {
	kind := setKind(set)
	root := l.Set.ShardDigest(kind, shard)
	return &Initiator{l: l, p: p, shard: shard, set: set, kind: kind, pending: map[string][]uint64{},
		queue:   []queuedRange{{count: root.Count, fp: root.Fingerprint(), claim: 256}},
		scanCap: workFactor*root.Count + workSlack}
}

// Pulled returns how many records the session stored (or refreshed).
func (in *Initiator) Pulled() int { return in.pulled }

// violation ends a session with a peer that broke a budget and penalizes it.
func (in *Initiator) violation(reason string) error {
	in.l.penalize(in.p, reason)
	return fmt.Errorf("%w: %s", ErrViolation, reason)
}

// countingReader counts the bytes the responder sent.
type countingReader struct {
	r io.Reader
	n *int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	*c.n += int64(n)
	return n, err
}

// Run runs the session's rounds over c until nothing differs, an error, or
// ctx ends; each round must be answered within the Local's RoundTimeout.
// At the end it half-closes c, when c can, and waits briefly for the
// responder to close: the responder frees the session's slot first, so a
// next session that follows at once is not refused for overlapping this
// one. The caller closes c.
func (in *Initiator) Run(ctx context.Context, c Conn) error {
	stop := bindContext(ctx, c)
	defer stop()
	w, r := pbio.NewDelimitedWriter(skipEmpty{c}), pbio.NewDelimitedReader(countingReader{c, &in.read}, maxResponse)
	for round := 0; ; round++ {
		req := in.nextRequest()
		if len(req.Ranges) == 0 && len(req.Want) == 0 {
			break
		}
		if round == MaxRounds {
			return fmt.Errorf("%w: %d rounds", ErrBudget, round)
		}
		if in.read > maxSessionBytes {
			return fmt.Errorf("%w: %d bytes", ErrBudget, in.read)
		}
		_ = c.SetDeadline(time.Now().Add(in.l.RoundTimeout))
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := w.WriteMsg(req); err != nil {
			return fmt.Errorf("round %d: %w", round, err)
		}
		var resp pb.SyncResponse
		if err := r.ReadMsg(&resp); err != nil {
			if malformedMsg(err) {
				return in.violation("malformed_response")
			}
			return fmt.Errorf("round %d: %w", round, err)
		}
		in.l.Metrics.round()
		switch resp.Status {
		case pb.SyncResponse_STATUS_OK:
		case pb.SyncResponse_STATUS_NOT_HOLDER:
			return ErrNotHeld
		default:
			return fmt.Errorf("peer answered %v", resp.Status)
		}
		if err := in.round(ctx, req, &resp); err != nil {
			return err
		}
	}
	halfClose(c, min(time.Second, in.l.RoundTimeout), 1)
	return nil
}

// nextRequest takes the next ranges and wants. The ranges asked are
// chosen so that even an answer that splits or lists each of them in full
// (by the responder's own counts) stays at half the response caps.
func (in *Initiator) nextRequest() *pb.SyncRequest {
	req := &pb.SyncRequest{Shard: uint32(in.shard), Set: in.set}
	var children, ids uint64
	n := 0
	for ; n < len(in.queue) && n < maxRanges; n++ {
		q := in.queue[n]
		// A large range is split into at most 256 children, or listed
		// when it holds a single key: up to MaxListing IDs (one device's
		// bundles, as many as the responder's own per-device quota keeps).
		c, i := uint64(0), min(q.claim, MaxListing)
		if q.claim > listThreshold {
			c = min(q.claim, 256)
		}
		if n > 0 && (children+c > maxRespRanges/2 || ids+i > maxRespIDs/2) {
			break
		}
		children, ids = children+c, ids+i
		req.Ranges = append(req.Ranges, &pb.SyncRange{Prefix: q.prefix, Count: q.count, Fingerprint: bytes.Clone(q.fp[:])})
	}
	in.queue = in.queue[n:]
	taken := 0
	for len(in.order) > 0 && taken < maxWant && len(req.Want) < maxListings {
		prefix := in.order[0]
		ids := in.pending[prefix]
		k := min(len(ids), maxWant-taken)
		req.Want = append(req.Want, &pb.SyncListing{Prefix: []byte(prefix), Ids: ids[:k:k]})
		taken += k
		if k == len(ids) {
			delete(in.pending, prefix)
			in.order = in.order[1:]
		} else {
			in.pending[prefix] = ids[k:]
		}
	}
	in.npend -= taken
	in.wanted += taken
	return req
}

// addWants queues wanted IDs under a listed prefix (one entry per prefix,
// so a request never names a prefix twice). It reports false when the
// pending budget is full; the rest waits for the next session.
func (in *Initiator) addWants(prefix string, ids []uint64) bool {
	if len(ids) == 0 {
		return true
	}
	room := maxPending - in.npend
	full := len(ids) > room
	ids = ids[:min(len(ids), room)]
	if len(ids) == 0 {
		return false
	}
	if _, ok := in.pending[prefix]; !ok {
		in.order = append(in.order, prefix)
	}
	in.pending[prefix] = append(in.pending[prefix], ids...)
	in.npend += len(ids)
	return !full
}

// round checks a response against its request, ingests the records and
// queues what to ask next.
func (in *Initiator) round(ctx context.Context, req *pb.SyncRequest, resp *pb.SyncResponse) error {
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
	if len(resp.Ranges) > maxRespRanges {
		return in.violation("response_ranges")
	}
	if in.rangesIn += len(resp.Ranges); in.rangesIn > maxSessionRanges {
		return in.violation("session_ranges")
	}
	byParent := map[string][]*pb.SyncRange{}
	seen := make(map[string]bool, len(resp.Ranges))
	for _, rg := range resp.Ranges {
		l := len(rg.Prefix)
		if l == 0 || l >= protocol.KeySize || rg.Count == 0 || len(rg.Fingerprint) != protocol.FingerprintSize {
			return in.violation("malformed_range")
		}
		parent := string(rg.Prefix[:l-1])
		if st := asked[parent]; st != askedRange && st != splitRange {
			return in.violation("unasked_range")
		}
		if seen[string(rg.Prefix)] {
			return in.violation("duplicate_range")
		}
		seen[string(rg.Prefix)] = true
		asked[parent] = splitRange
		byParent[parent] = append(byParent[parent], rg)
	}
	// Listings of asked ranges, each once, not of split ones.
	ids := 0
	for _, l := range resp.Listings {
		if asked[string(l.Prefix)] != askedRange {
			return in.violation("unasked_listing")
		}
		asked[string(l.Prefix)] = listedRange
		// An ID twice is no violation: two items may share a 64-bit ID
		// (a mined collision); duplicates are dropped below.
		if len(l.Ids) > MaxListing {
			return in.violation("malformed_listing")
		}
		ids += len(l.Ids)
	}
	if ids > maxRespIDs {
		return in.violation("response_ids")
	}
	if in.idsIn += ids; in.idsIn > maxSessionIDs {
		return in.violation("session_ids")
	}
	if err := in.ingest(ctx, req, resp); err != nil {
		return err
	}
	// Compare children with ours: one scan per asked range answered.
	for parent, rs := range byParent {
		_, children, _, err := in.l.Set.PrefixDigests(ctx, in.kind, in.shard, []byte(parent))
		if err != nil {
			return err
		}
		if err := in.scan(children); err != nil {
			return err
		}
		for _, rg := range rs {
			mine := children[rg.Prefix[len(rg.Prefix)-1]]
			if fp := mine.Fingerprint(); !bytes.Equal(fp[:], rg.Fingerprint) {
				in.queue = append(in.queue, queuedRange{prefix: rg.Prefix, count: mine.Count, fp: fp, claim: rg.Count})
			}
		}
	}
	// Listings: want what we lack and have not refused.
	now := in.l.now()
	for _, l := range resp.Listings {
		mine, err := in.l.Set.PrefixItems(ctx, in.kind, in.shard, l.Prefix)
		if err != nil {
			return err
		}
		in.scanned += uint64(len(mine))
		in.l.Metrics.scan("initiator", uint64(len(mine)))
		if in.scanned > in.scanCap {
			return fmt.Errorf("%w: scanned %d items", ErrBudget, in.scanned)
		}
		have := make(map[uint64]bool, len(mine))
		for _, h := range mine {
			have[protocol.ItemID(h)] = true
		}
		var want []uint64
		for _, id := range l.Ids {
			if !have[id] && !in.l.Refused.has(in.kind, id, now) {
				want = append(want, id)
				have[id] = true // a duplicate in the listing is wanted once
			}
		}
		if !in.addWants(string(l.Prefix), want) {
			break // the pending budget is full; the next session asks for the rest
		}
	}
	return nil
}

// scan charges the items of a PrefixDigests scan to the session.
func (in *Initiator) scan(children [256]protocol.Digest) error {
	var n uint64
	for _, c := range children {
		n += c.Count
	}
	in.scanned += n
	in.l.Metrics.scan("initiator", n)
	if in.scanned > in.scanCap {
		return fmt.Errorf("%w: scanned %d items", ErrBudget, in.scanned)
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
func (in *Initiator) ingest(ctx context.Context, req *pb.SyncRequest, resp *pb.SyncResponse) error {
	wanted := map[uint64][]byte{} // item ID → prefix of its want
	for _, l := range req.Want {
		for _, id := range l.Ids {
			wanted[id] = l.Prefix
		}
	}
	if len(wanted) == 0 && len(resp.Bundles)+len(resp.Accounts)+len(resp.Notices) > 0 {
		return in.violation("unsolicited_record")
	}
	if in.kind != storage.BundleSet && len(resp.Bundles) > 0 || in.kind != storage.AccountSet && len(resp.Accounts) > 0 ||
		in.kind != storage.NoticeSet && len(resp.Notices) > 0 {
		return in.violation("unsolicited_record")
	}
	got := map[uint64]bool{}       // wanted IDs answered
	gotItem := map[[32]byte]bool{} // items received
	accept := func(key protocol.Key, item [32]byte, ok bool) (uint64, error) {
		id := protocol.ItemID(item)
		prefix, isWanted := wanted[id]
		switch {
		case !ok:
			return id, in.violation("malformed_record")
		case !isWanted || gotItem[item]:
			return id, in.violation("unsolicited_record")
		case protocol.Shard(key, in.l.Shards.Count()) != in.shard:
			return id, in.violation("record_of_another_shard")
		case !bytes.HasPrefix(key[:], prefix):
			return id, in.violation("unsolicited_record")
		}
		got[id], gotItem[item] = true, true
		return id, nil
	}
	now := in.l.now()
	for _, m := range resp.Bundles {
		b, err := pb.ToBundle(m)
		if err != nil {
			return in.violation("malformed_record")
		}
		item, ok := claimedBundleItem(b, in.l.MLS)
		id, err := accept(b.DeviceID, item, ok)
		if err != nil {
			return err
		}
		outcome, _, err := in.l.Ingester.IngestBundle(ctx, b, ingest.SourceSync)
		if err := in.outcome(id, outcome, err, now); err != nil {
			return err
		}
	}
	for _, m := range resp.Accounts {
		a, err := pb.ToAccount(m)
		if err != nil {
			return in.violation("malformed_record")
		}
		lamport, err := protocol.AccountLamport(a.Payload)
		id, err := accept(a.AccountPub, protocol.AccountItem(a.AccountPub, lamport, a.Payload), err == nil)
		if err != nil {
			return err
		}
		_, outcome, err := in.l.Ingester.IngestAccount(ctx, a, storage.AccountConverge, ingest.SourceSync)
		if err := in.outcome(id, outcome, err, now); err != nil {
			return err
		}
	}
	for _, m := range resp.Notices {
		// The item ID comes from the notice's bytes (its layout), before
		// any signature work: only a wanted notice is verified.
		key, item, claim, consume, ok := claimedNoticeItem(m)
		id, err := accept(key, item, ok)
		if err != nil {
			return err
		}
		var outcome storage.PutOutcome
		if claim != nil && in.l.ClaimBudget != nil && !in.l.ClaimBudget.Take(PeerDevice{in.p, key}, 1) {
			in.l.log().Debug("sync: claim notice over the responder's budget for the device; wanted again next session", "peer", in.p, "device", key)
			continue
		}
		if claim != nil {
			outcome, _, err = in.l.Ingester.IngestClaim(ctx, claim, ingest.SourceSync)
		} else {
			outcome, _, err = in.l.Ingester.IngestConsume(ctx, consume, ingest.SourceSync)
		}
		if err := in.noticeOutcome(id, outcome, err, now); err != nil {
			return err
		}
	}
	if resp.Truncated {
		if len(got) == 0 {
			return in.violation("truncated_empty")
		}
		// Asked-for records the responder left out: ask again.
		for _, l := range req.Want {
			var rest []uint64
			for _, id := range l.Ids {
				if !got[id] {
					rest = append(rest, id)
				}
			}
			in.addWants(string(l.Prefix), rest)
		}
	}
	return nil
}

// outcome handles what ingesting a wanted record gave.
func (in *Initiator) outcome(id uint64, outcome storage.PutOutcome, err error, now time.Time) error {
	var ve *protocol.ValidationError
	switch {
	case errors.As(err, &ve):
		switch ve.Rule {
		case protocol.RulePayloadTooLarge, protocol.RuleKeyNotPoint, protocol.RuleSignature, protocol.RuleAccountHeader:
			// Not signed by its key, or breaking a network constant: no
			// honest node stores it.
			return in.violation("invalid_record")
		case protocol.RuleTimestampFuture, protocol.RuleMLS + "_lifetime_not_yet_valid":
			// Valid later: pull it again then.
		default:
			in.l.Refused.add(in.kind, id, now)
		}
	case errors.Is(err, storage.ErrStale), errors.Is(err, storage.ErrConsumed):
		// Older than what is held, or consumed here (the responder still
		// holds a bundle its device used up: it missed the consume notice,
		// which the notice set's session brings it): never wanted.
		in.l.Refused.add(in.kind, id, now)
	case err != nil:
		return err
	case outcome == storage.Stored || outcome == storage.Refreshed:
		in.pulled++
	default: // over quota, or a newer copy held
		in.l.Refused.add(in.kind, id, now)
	}
	return nil
}

// noticeOutcome handles what ingesting a wanted notice gave. A claim whose
// bundle is not held here is not remembered: the bundle may come later (by
// the bundle set's next session), and then the claim is wanted again. A
// device over its tombstone quota is not either: its tombstones expire.
func (in *Initiator) noticeOutcome(id uint64, outcome storage.PutOutcome, err error, now time.Time) error {
	var ve *protocol.ValidationError
	switch {
	case errors.As(err, &ve):
		switch ve.Rule {
		case protocol.RuleKeyNotPoint, protocol.RuleSignature, protocol.RuleClaimNoticeLength, protocol.RuleClaimLayout,
			protocol.RuleConsumeTooLarge, protocol.RuleConsumeLayout, protocol.RuleForeignRef:
			// Not signed by its key, or a forgery no honest node stores
			// (foreign_ref: a claim naming a ref of another device, under
			// strict MLS; gossip Rejects it too).
			return in.violation("invalid_record")
		case protocol.RuleTimestampFuture:
			// Valid later: pull it again then.
		default:
			in.l.Refused.add(in.kind, id, now)
		}
	case errors.Is(err, storage.ErrRefNotHeld), errors.Is(err, storage.ErrConsumeQuota):
	case errors.Is(err, storage.ErrConsumed), errors.Is(err, storage.ErrForeignRef):
		in.l.Refused.add(in.kind, id, now)
	case err != nil:
		return err
	case outcome == storage.Stored || outcome == storage.Refreshed:
		in.pulled++
	case outcome == storage.OverQuota:
		// The device's tombstone quota: it frees up as tombstones expire.
	default: // a winning claim of the ref is held
		in.l.Refused.add(in.kind, id, now)
	}
	return nil
}

// claimedNoticeItem reads a notice's key (its device) and sync item hash
// from its bytes, without verifying anything, and converts it. ok is false
// when the notice is empty or its layout cannot be read.
func claimedNoticeItem(m *pb.Notice) (key protocol.Key, item [32]byte, claim *protocol.ClaimNotice, consume *protocol.ConsumeNotice, ok bool) {
	switch body := m.GetBody().(type) {
	case *pb.Notice_Claim:
		n, err := pb.ToClaim(body.Claim)
		if err != nil {
			return key, item, nil, nil, false
		}
		ts, dev, ref, err := protocol.DecodeClaimPayload(n.Payload)
		if err != nil {
			return key, item, nil, nil, false
		}
		return dev, protocol.ClaimItem(protocol.ClaimInfo{TimestampMS: ts, DeviceID: dev, Ref: ref, Hash: protocol.ClaimHash(n)}), n, nil, true
	case *pb.Notice_Consume:
		n, err := pb.ToConsume(body.Consume)
		if err != nil || len(n.Payload) > protocol.MaxConsumePayloadSize {
			return key, item, nil, nil, false
		}
		ts, refs, err := protocol.DecodeConsumePayload(n.Payload)
		if err != nil {
			return key, item, nil, nil, false
		}
		info := protocol.ConsumeInfo{TimestampMS: ts, Refs: refs, Hash: sha256.Sum256(n.Payload)}
		return n.DeviceID, protocol.ConsumeItem(n.DeviceID, info), nil, n, true
	}
	return key, item, nil, nil, false
}

// claimedBundleItem computes a bundle's sync item hash from its bytes,
// without verifying anything: the signed timestamp and the KeyPackageRef,
// parsed the way validation parses them. ok is false when they cannot be
// read.
func claimedBundleItem(b *protocol.Bundle, mode protocol.MLSMode) (item [32]byte, ok bool) {
	ts, kp, err := protocol.SplitBundlePayload(b.Payload)
	if err != nil || len(b.Payload) > protocol.MaxPayloadSize {
		return item, false
	}
	ref := protocol.KeyPackageRef(kp)
	if mode != protocol.MLSOff {
		parsed, err := mls.Parse(kp)
		if err != nil {
			return item, false
		}
		ref = protocol.Ref(mls.Ref(parsed.Raw))
	}
	return protocol.BundleItem(b.DeviceID, ts, ref), true
}
