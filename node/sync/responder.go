package sync

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Responder is one session's responder. It follows the tree it has shown
// the initiator: the root may be asked once, in the first request; any
// other range must be a child of a range this responder split in this
// session, asked once; a want must name a range this responder listed in
// this session. So every request costs at most one pass over the items
// under the ranges it names, each item at most about twice per session
// level, and the whole session is held to a work budget proportional to
// the shard. An initiator that breaks a rule is answered
// STATUS_BAD_REQUEST and penalized.
type Responder struct {
	l     *Local
	p     peer.ID
	shard int
	set   pb.SyncRequest_Set
	kind  storage.SetKind

	rounds  int
	work    uint64 // items scanned plus rangeCost per range or want asked
	workCap uint64

	rootAsked, rootListed bool
	split                 map[string]*children // ranges split in this session → children asked, listed
	listedItems           map[string]uint64    // items under each range listed in this session
}

// NewResponder prepares the responder's side of a session with peer p.
func NewResponder(l *Local, p peer.ID) *Responder { return &Responder{l: l, p: p} }

// children records, for a range the responder split, which of its 256
// children were asked and which of those it listed.
type children struct {
	asked, listed [4]uint64
}

func (c *children) isAsked(b byte) bool  { return c.asked[b>>6]&(1<<(b&63)) != 0 }
func (c *children) isListed(b byte) bool { return c.listed[b>>6]&(1<<(b&63)) != 0 }
func (c *children) setAsked(b byte)      { c.asked[b>>6] |= 1 << (b & 63) }
func (c *children) setListed(b byte)     { c.listed[b>>6] |= 1 << (b & 63) }

// rangeCost is the work charged per range or want asked (one seek), on top
// of the items its scans touch.
const rangeCost = 1

// Reasons a request is refused (the label of kpnode_peer_penalties_total).
const (
	ReasonBadRequest  = "bad_request"   // empty request, wrong shard or set, too many ranges or wants, malformed prefix or IDs
	ReasonNested      = "nested_prefix" // prefixes of a request not an antichain (equal or one inside another)
	ReasonNotOffered  = "not_offered"   // a range or want the responder did not offer in this session
	ReasonRounds      = "rounds"        // more rounds than any honest session
	ReasonSessionWork = "session_work"  // the session's work budget is spent (a quiet limit: no ban)
)

// Run serves the session's rounds over c until the initiator closes its
// side (nil), a request is refused with a final status (an error wrapping
// ErrRefused, and ErrViolation when the initiator broke a rule and was
// penalized), or the stream fails or times out: the initiator must send
// each request within the Local's RoundTimeout. The caller closes c; after
// an error that does not wrap ErrRefused it should reset it.
func (rs *Responder) Run(ctx context.Context, c Conn) error {
	stop := bindContext(ctx, c)
	defer stop()
	r, w := pbio.NewDelimitedReader(c, maxRequest), pbio.NewDelimitedWriter(skipEmpty{c})
	for {
		_ = c.SetDeadline(time.Now().Add(rs.l.RoundTimeout))
		if err := ctx.Err(); err != nil {
			return err
		}
		var req pb.SyncRequest
		if err := r.ReadMsg(&req); err != nil {
			switch {
			case errors.Is(err, io.EOF):
				return nil // the initiator is done
			case malformedMsg(err):
				// Oversized or undecodable: no honest peer sends it.
				rs.l.penalize(rs.p, "malformed_request")
				return fmt.Errorf("%w: malformed_request: %w", ErrViolation, err)
			}
			return err
		}
		resp, reason := rs.serve(ctx, &req)
		if reason != "" {
			rs.l.log().Debug("sync: request refused", "peer", rs.p, "reason", reason)
		}
		if err := w.WriteMsg(resp); err != nil {
			return err
		}
		switch resp.Status {
		case pb.SyncResponse_STATUS_OK:
			continue
		case pb.SyncResponse_STATUS_BAD_REQUEST:
			// Let the status reach the peer before its connections
			// close: wait (briefly) for it to close its side.
			halfClose(c, min(time.Second, rs.l.RoundTimeout), maxRequest)
			rs.l.penalize(rs.p, reason)
			return fmt.Errorf("%w: %w: %s", ErrRefused, ErrViolation, reason)
		case pb.SyncResponse_STATUS_NOT_HOLDER:
			halfClose(c, 0, 0)
			return fmt.Errorf("%w: %w", ErrRefused, ErrNotHeld)
		default:
			halfClose(c, 0, 0)
			if reason == ReasonSessionWork {
				return fmt.Errorf("%w: %w: %s", ErrRefused, ErrBudget, reason)
			}
			return fmt.Errorf("%w: store error", ErrRefused)
		}
	}
}

// checkRequest applies the per-request rules; it returns a reason, or "".
func (rs *Responder) checkRequest(req *pb.SyncRequest) string {
	shards := rs.l.Shards.Count()
	if int(req.Shard) >= shards || len(req.Ranges) > maxRanges || len(req.Want) > maxListings || !validSet(req.Set) {
		return ReasonBadRequest
	}
	if rs.rounds > 1 && (int(req.Shard) != rs.shard || req.Set != rs.set) {
		return ReasonBadRequest
	}
	if len(req.Ranges) == 0 && len(req.Want) == 0 {
		// An honest initiator closes its side instead; an empty request
		// would only hold a session slot.
		return ReasonBadRequest
	}
	prefixes := make([][]byte, 0, len(req.Ranges)+len(req.Want))
	for _, rg := range req.Ranges {
		if len(rg.Prefix) >= protocol.KeySize {
			return ReasonBadRequest
		}
		prefixes = append(prefixes, rg.Prefix)
	}
	ids := 0
	for _, l := range req.Want {
		if len(l.Prefix) >= protocol.KeySize || len(l.Ids) == 0 || !uniqueIDs(l.Ids) {
			return ReasonBadRequest
		}
		ids += len(l.Ids)
		prefixes = append(prefixes, l.Prefix)
	}
	if ids > maxWant {
		return ReasonBadRequest
	}
	if !antichain(prefixes) {
		return ReasonNested
	}
	return ""
}

// antichain reports whether no prefix equals another or is a prefix of
// another. In sorted order a prefix is directly followed by the strings it
// starts, so comparing neighbours suffices. It sorts prefixes.
func antichain(prefixes [][]byte) bool {
	slices.SortFunc(prefixes, bytes.Compare)
	for i := 1; i < len(prefixes); i++ {
		if bytes.HasPrefix(prefixes[i], prefixes[i-1]) {
			return false
		}
	}
	return true
}

func uniqueIDs(ids []uint64) bool {
	if len(ids) > maxWant {
		return false
	}
	seen := make(map[uint64]struct{}, len(ids))
	for _, id := range ids {
		if _, ok := seen[id]; ok {
			return false
		}
		seen[id] = struct{}{}
	}
	return true
}

// offered checks the session rules: ranges the responder offered and not
// yet asked, wants of ranges it listed. It marks the ranges asked.
func (rs *Responder) offered(req *pb.SyncRequest) string {
	for _, rg := range req.Ranges {
		if len(rg.Prefix) == 0 {
			if rs.rootAsked || rs.rounds > 1 {
				return ReasonNotOffered
			}
			rs.rootAsked = true
			continue
		}
		c := rs.split[string(rg.Prefix[:len(rg.Prefix)-1])]
		b := rg.Prefix[len(rg.Prefix)-1]
		if c == nil || c.isAsked(b) {
			return ReasonNotOffered
		}
		c.setAsked(b)
	}
	for _, l := range req.Want {
		if len(l.Prefix) == 0 {
			if !rs.rootListed {
				return ReasonNotOffered
			}
			continue
		}
		c := rs.split[string(l.Prefix[:len(l.Prefix)-1])]
		if c == nil || !c.isListed(l.Prefix[len(l.Prefix)-1]) {
			return ReasonNotOffered
		}
	}
	return ""
}

func (rs *Responder) listed(prefix []byte, items int) {
	rs.listedItems[string(prefix)] = uint64(items)
	if len(prefix) == 0 {
		rs.rootListed = true
		return
	}
	if c := rs.split[string(prefix[:len(prefix)-1])]; c != nil {
		c.setListed(prefix[len(prefix)-1])
	}
}

// charge adds work; false once the session's budget is spent.
func (rs *Responder) charge(n uint64) bool {
	rs.work += n
	return rs.work <= rs.workCap
}

// chargeScan charges the items a range scan read, and counts them.
func (rs *Responder) chargeScan(items uint64) bool {
	rs.l.Metrics.scan("responder", items)
	return rs.charge(items)
}

func badRequest(reason string) (*pb.SyncResponse, string) {
	return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_BAD_REQUEST}, reason
}

// workSpent ends the session quietly: the work budget bounds what one
// session costs the responder, and a very large honest catch-up may reach
// it; the initiator's next session continues where this one stopped.
func workSpent() (*pb.SyncResponse, string) {
	return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_UNSPECIFIED}, ReasonSessionWork
}

// serve answers one round from the store. A non-empty reason with
// STATUS_BAD_REQUEST is a budget the initiator broke.
func (rs *Responder) serve(ctx context.Context, req *pb.SyncRequest) (*pb.SyncResponse, string) {
	set := rs.l.Set
	rs.rounds++
	if rs.rounds > MaxRounds+1 {
		return badRequest(ReasonRounds)
	}
	if reason := rs.checkRequest(req); reason != "" {
		return badRequest(reason)
	}
	shard := int(req.Shard)
	if !rs.l.Shards.Has(shard) {
		return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_NOT_HOLDER}, ""
	}
	kind := setKind(req.Set)
	if rs.rounds == 1 {
		rs.shard, rs.set, rs.kind = shard, req.Set, kind
		rs.workCap = workFactor*set.ShardDigest(kind, shard).Count + workSlack
		rs.split = map[string]*children{}
		rs.listedItems = map[string]uint64{}
	}
	if reason := rs.offered(req); reason != "" {
		return badRequest(reason)
	}
	if !rs.charge(uint64(rangeCost * (len(req.Ranges) + len(req.Want)))) {
		return workSpent()
	}
	resp := &pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK}
	for _, rg := range req.Ranges {
		if len(rg.Prefix) == 0 {
			root := set.ShardDigest(kind, shard)
			if fp := root.Fingerprint(); bytes.Equal(fp[:], rg.Fingerprint) || root.Count == 0 {
				continue // the common case, answered from memory
			}
		}
		mine, kids, keys, err := set.PrefixDigests(ctx, kind, shard, rg.Prefix)
		if err != nil {
			return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_UNSPECIFIED}, ""
		}
		if !rs.chargeScan(mine.Count) {
			return workSpent()
		}
		if fp := mine.Fingerprint(); bytes.Equal(fp[:], rg.Fingerprint) || mine.Count == 0 {
			continue
		}
		// List a small range, and a range of a single key (one device's
		// bundles share its whole key, so splitting cannot separate them).
		if mine.Count <= listThreshold || keys == 1 || len(rg.Prefix) == protocol.KeySize-1 {
			items, err := set.PrefixItems(ctx, kind, shard, rg.Prefix)
			if err != nil {
				return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_UNSPECIFIED}, ""
			}
			if !rs.chargeScan(uint64(len(items))) {
				return workSpent()
			}
			if len(items) == 0 {
				continue
			}
			l := &pb.SyncListing{Prefix: rg.Prefix}
			dup := make(map[uint64]bool, min(len(items), MaxListing))
			for _, h := range items {
				if len(l.Ids) == MaxListing {
					break
				}
				// Two items of one 64-bit ID (a mined collision) are
				// listed once; a want of it brings both.
				if id := protocol.ItemID(h); !dup[id] {
					dup[id] = true
					l.Ids = append(l.Ids, id)
				}
			}
			resp.Listings = append(resp.Listings, l)
			rs.listed(rg.Prefix, len(items))
			continue
		}
		rs.split[string(rg.Prefix)] = &children{}
		for b, c := range kids {
			if c.Count == 0 {
				continue
			}
			fp := c.Fingerprint()
			resp.Ranges = append(resp.Ranges, &pb.SyncRange{Prefix: append(bytes.Clone(rg.Prefix), byte(b)), Count: c.Count, Fingerprint: fp[:]})
		}
	}
	size := 0
	for _, l := range req.Want {
		if size > responseLimit {
			resp.Truncated = true
			break
		}
		// The lookup scans the items under the listed range (as many as
		// when it was listed) and reads the records it returns.
		if !rs.chargeScan(rs.listedItems[string(l.Prefix)]) {
			return workSpent()
		}
		ids := make(map[uint64]bool, len(l.Ids))
		for _, id := range l.Ids {
			ids[id] = true
		}
		if kind == storage.NoticeSet {
			ns, _ := set.NoticesByID(ctx, shard, l.Prefix, ids)
			if !rs.charge(uint64(len(ns))) {
				return workSpent()
			}
			for _, rec := range ns {
				if size > responseLimit {
					resp.Truncated = true
					break
				}
				m, bytes := noticeMsg(rec)
				if m == nil {
					continue
				}
				resp.Notices = append(resp.Notices, m)
				size += bytes
			}
			continue
		}
		if kind == storage.AccountSet {
			as, _ := set.AccountsByID(ctx, shard, l.Prefix, ids)
			if !rs.charge(uint64(len(as))) {
				return workSpent()
			}
			for _, a := range as {
				if size > responseLimit {
					resp.Truncated = true
					break
				}
				m := pb.FromAccount(&a.AccountBundle)
				m.UpdatedAtMs = a.UpdatedAtMS
				resp.Accounts = append(resp.Accounts, m)
				size += len(a.Payload) + 100
			}
			continue
		}
		bs, _ := set.BundlesByID(ctx, shard, l.Prefix, ids)
		if !rs.charge(uint64(len(bs))) {
			return workSpent()
		}
		for _, b := range bs {
			if size > responseLimit {
				resp.Truncated = true
				break
			}
			resp.Bundles = append(resp.Bundles, pb.FromBundle(&b.Bundle))
			size += len(b.Payload) + 100
		}
	}
	return resp, ""
}

// noticeMsg is a stored notice's wire form and about how many bytes it
// takes in a response (nil for an empty record).
func noticeMsg(n *storage.Notice) (*pb.Notice, int) {
	switch {
	case n.Claim != nil:
		return &pb.Notice{Body: &pb.Notice_Claim{Claim: pb.FromClaim(n.Claim)}}, len(n.Claim.Payload) + 120
	case n.Consume != nil:
		return &pb.Notice{Body: &pb.Notice_Consume{Consume: pb.FromConsume(n.Consume)}}, len(n.Consume.Payload) + 120
	}
	return nil, 0
}
