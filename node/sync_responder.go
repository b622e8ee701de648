package node

import (
	"bytes"
	"context"
	"errors"
	"io"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// handle serves a sync session: request/response rounds until the
// initiator closes its side. Sessions beyond the node's or the peer's
// limits are reset before anything is read (a clean refusal: the
// initiator tries later); a peer that keeps opening them is banned.
func (s *syncService) handle(raw network.Stream) {
	p := raw.Conn().RemotePeer()
	// A panic on a peer's bytes ends its session, never the process.
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("sync: panic serving a session", "peer", p, "panic", r, "stack", string(debug.Stack()))
			_ = raw.Reset()
		}
	}()
	admitted, ok := s.admit(p)
	if !ok {
		_ = raw.Reset()
		return
	}
	var once sync.Once
	release := func() { once.Do(admitted) }
	defer release()
	st := &countingStream{Stream: raw}
	defer func() {
		s.n.metrics.syncBytes.WithLabelValues("in").Add(float64(st.read))
		s.n.metrics.syncBytes.WithLabelValues("out").Add(float64(st.written))
	}()
	ctx, cancel := context.WithTimeout(s.ctx, syncSessionLimit)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = raw.Reset() })
	defer stop()
	r, w := pbio.NewDelimitedReader(st, syncMaxRequest), pbio.NewDelimitedWriter(st)
	rs := &syncResponder{s: s, p: p}
	for {
		_ = raw.SetDeadline(time.Now().Add(s.n.cfg.StreamTimeout))
		var req pb.SyncRequest
		if err := r.ReadMsg(&req); err != nil {
			switch {
			case errors.Is(err, io.EOF):
				// The initiator is done: free the slot before closing, so
				// its next session (it waits for this close) is admitted.
				release()
				_ = raw.Close()
				return
			case malformedMsg(err):
				// Oversized or undecodable: no honest peer sends it.
				s.n.guard.penalize(p, "sync", "malformed_request")
			}
			s.log.Debug("sync: bad request", "peer", p, "err", err)
			_ = raw.Reset()
			return
		}
		resp, reason := rs.serve(ctx, &req)
		if reason != "" {
			s.log.Debug("sync: request refused", "peer", p, "reason", reason)
		}
		if err := w.WriteMsg(resp); err != nil {
			_ = raw.Reset()
			return
		}
		if resp.Status != pb.SyncResponse_STATUS_OK {
			_ = raw.CloseWrite()
			if resp.Status == pb.SyncResponse_STATUS_BAD_REQUEST {
				// Let the status reach the peer before its connections
				// close: wait (briefly) for it to close its side.
				_ = raw.SetReadDeadline(time.Now().Add(min(time.Second, s.n.cfg.StreamTimeout)))
				_, _ = io.Copy(io.Discard, io.LimitReader(raw, syncMaxRequest))
				s.n.guard.penalize(p, "sync", reason)
			}
			_ = raw.Close()
			return
		}
	}
}

// malformedMsg reports whether a read failed on the message itself (over
// the size cap, or not protobuf) rather than on the stream.
func malformedMsg(err error) bool {
	return errors.Is(err, io.ErrShortBuffer) || errors.Is(err, proto.Error)
}

// admit applies the session limits of the responder: at most
// syncMaxSessions inbound sessions in the node, syncMaxPeerSessions per
// peer, and the peer's token bucket. The node-wide limit only refuses
// ("busy"); refusals for a peer's own limits are strikes, and too many ban
// it. release ends an admitted session.
func (s *syncService) admit(p peer.ID) (release func(), ok bool) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, false
	}
	s.wg.Add(1)
	s.mu.Unlock()
	select {
	case s.sessions <- struct{}{}:
	default:
		s.wg.Done()
		s.refusal.WithLabelValues("busy").Inc()
		return nil, false
	}
	ok, reason, ban := s.inbound.tryBegin(p, syncMaxPeerSessions, time.Now())
	if !ok {
		<-s.sessions
		s.wg.Done()
		s.refusal.WithLabelValues(reason).Inc()
		if ban {
			s.n.guard.penalize(p, "sync", reason)
		}
		return nil, false
	}
	return func() {
		s.inbound.end(p)
		<-s.sessions
		s.wg.Done()
	}, true
}

// syncResponder is the responder's state of one session. It follows the
// tree it has shown the initiator: the root may be asked once, in the
// first request; any other range must be a child of a range this
// responder split in this session, asked once; a want must name a range
// this responder listed in this session. So every request costs at most
// one pass over the items under the ranges it names, each item at most
// about twice per session level, and the whole session is held to a work
// budget proportional to the shard.
type syncResponder struct {
	s     *syncService
	p     peer.ID
	shard int
	set   pb.SyncRequest_Set
	kind  storage.SetKind

	rounds  int
	work    uint64 // items scanned plus syncRangeCost per range or want asked
	workCap uint64

	rootAsked, rootListed bool
	split                 map[string]*syncChildren // ranges split in this session → children asked, listed
	listedItems           map[string]uint64        // items under each range listed in this session
}

// syncChildren records, for a range the responder split, which of its 256
// children were asked and which of those it listed.
type syncChildren struct {
	asked, listed [4]uint64
}

func (c *syncChildren) isAsked(b byte) bool  { return c.asked[b>>6]&(1<<(b&63)) != 0 }
func (c *syncChildren) isListed(b byte) bool { return c.listed[b>>6]&(1<<(b&63)) != 0 }
func (c *syncChildren) setAsked(b byte)      { c.asked[b>>6] |= 1 << (b & 63) }
func (c *syncChildren) setListed(b byte)     { c.listed[b>>6] |= 1 << (b & 63) }

// syncRangeCost is the work charged per range or want asked (one seek),
// on top of the items its scans touch.
const syncRangeCost = 1

// Reasons a request is refused (the label of kpnode_peer_penalties_total).
const (
	reasonBadRequest  = "bad_request"   // empty request, wrong shard or set, too many ranges or wants, malformed prefix or IDs
	reasonNested      = "nested_prefix" // prefixes of a request not an antichain (equal or one inside another)
	reasonNotOffered  = "not_offered"   // a range or want the responder did not offer in this session
	reasonRounds      = "rounds"        // more rounds than any honest session
	reasonSessionWork = "session_work"  // the session's work budget is spent (a quiet limit: no ban)
)

// checkRequest applies the per-request rules; it returns a reason, or "".
func (rs *syncResponder) checkRequest(req *pb.SyncRequest) string {
	shards := rs.s.n.cfg.Shards.Count()
	if int(req.Shard) >= shards || len(req.Ranges) > syncMaxRanges || len(req.Want) > syncMaxListings ||
		(req.Set != pb.SyncRequest_SET_BUNDLES && req.Set != pb.SyncRequest_SET_ACCOUNTS) {
		return reasonBadRequest
	}
	if rs.rounds > 1 && (int(req.Shard) != rs.shard || req.Set != rs.set) {
		return reasonBadRequest
	}
	if len(req.Ranges) == 0 && len(req.Want) == 0 {
		// An honest initiator closes its side instead; an empty request
		// would only hold a session slot.
		return reasonBadRequest
	}
	prefixes := make([][]byte, 0, len(req.Ranges)+len(req.Want))
	for _, rg := range req.Ranges {
		if len(rg.Prefix) >= protocol.KeySize {
			return reasonBadRequest
		}
		prefixes = append(prefixes, rg.Prefix)
	}
	ids := 0
	for _, l := range req.Want {
		if len(l.Prefix) >= protocol.KeySize || len(l.Ids) == 0 || !uniqueIDs(l.Ids) {
			return reasonBadRequest
		}
		ids += len(l.Ids)
		prefixes = append(prefixes, l.Prefix)
	}
	if ids > syncMaxWant {
		return reasonBadRequest
	}
	if !antichain(prefixes) {
		return reasonNested
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
	if len(ids) > syncMaxWant {
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
func (rs *syncResponder) offered(req *pb.SyncRequest) string {
	for _, rg := range req.Ranges {
		if len(rg.Prefix) == 0 {
			if rs.rootAsked || rs.rounds > 1 {
				return reasonNotOffered
			}
			rs.rootAsked = true
			continue
		}
		c := rs.split[string(rg.Prefix[:len(rg.Prefix)-1])]
		b := rg.Prefix[len(rg.Prefix)-1]
		if c == nil || c.isAsked(b) {
			return reasonNotOffered
		}
		c.setAsked(b)
	}
	for _, l := range req.Want {
		if len(l.Prefix) == 0 {
			if !rs.rootListed {
				return reasonNotOffered
			}
			continue
		}
		c := rs.split[string(l.Prefix[:len(l.Prefix)-1])]
		if c == nil || !c.isListed(l.Prefix[len(l.Prefix)-1]) {
			return reasonNotOffered
		}
	}
	return ""
}

func (rs *syncResponder) listed(prefix []byte, items int) {
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
func (rs *syncResponder) charge(n uint64) bool {
	rs.work += n
	return rs.work <= rs.workCap
}

// chargeScan charges the items a range scan read, and counts them.
func (rs *syncResponder) chargeScan(items uint64) bool {
	rs.s.scanned.WithLabelValues("responder").Add(float64(items))
	return rs.charge(items)
}

func badRequest(reason string) (*pb.SyncResponse, string) {
	return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_BAD_REQUEST}, reason
}

// workSpent ends the session quietly: the work budget bounds what one
// session costs the responder, and a very large honest catch-up may reach
// it; the initiator's next session continues where this one stopped.
func workSpent() (*pb.SyncResponse, string) {
	return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_UNSPECIFIED}, reasonSessionWork
}

// serve answers one round from the store. A non-empty reason with
// STATUS_BAD_REQUEST is a budget the initiator broke.
func (rs *syncResponder) serve(ctx context.Context, req *pb.SyncRequest) (*pb.SyncResponse, string) {
	s := rs.s
	rs.rounds++
	if rs.rounds > syncMaxRounds+1 {
		return badRequest(reasonRounds)
	}
	if reason := rs.checkRequest(req); reason != "" {
		return badRequest(reason)
	}
	shard := int(req.Shard)
	if !s.n.cfg.Shards.Has(shard) {
		return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_NOT_HOLDER}, ""
	}
	kind := setKind(req.Set)
	if rs.rounds == 1 {
		rs.shard, rs.set, rs.kind = shard, req.Set, kind
		rs.workCap = syncWorkFactor*s.n.store.ShardDigest(kind, shard).Count + syncWorkSlack
		rs.split = map[string]*syncChildren{}
		rs.listedItems = map[string]uint64{}
	}
	if reason := rs.offered(req); reason != "" {
		return badRequest(reason)
	}
	if !rs.charge(uint64(syncRangeCost * (len(req.Ranges) + len(req.Want)))) {
		return workSpent()
	}
	resp := &pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK}
	for _, rg := range req.Ranges {
		if len(rg.Prefix) == 0 {
			root := s.n.store.ShardDigest(kind, shard)
			if fp := root.Fingerprint(); bytes.Equal(fp[:], rg.Fingerprint) || root.Count == 0 {
				continue // the common case, answered from memory
			}
		}
		mine, children, keys, err := s.n.store.PrefixDigests(ctx, kind, shard, rg.Prefix)
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
		if mine.Count <= syncListThreshold || keys == 1 || len(rg.Prefix) == protocol.KeySize-1 {
			items, err := s.n.store.PrefixItems(ctx, kind, shard, rg.Prefix)
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
			dup := make(map[uint64]bool, min(len(items), syncMaxListing))
			for _, h := range items {
				if len(l.Ids) == syncMaxListing {
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
		rs.split[string(rg.Prefix)] = &syncChildren{}
		for b, c := range children {
			if c.Count == 0 {
				continue
			}
			fp := c.Fingerprint()
			resp.Ranges = append(resp.Ranges, &pb.SyncRange{Prefix: append(bytes.Clone(rg.Prefix), byte(b)), Count: c.Count, Fingerprint: fp[:]})
		}
	}
	size := 0
	for _, l := range req.Want {
		if size > syncResponseLimit {
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
		if kind == storage.AccountSet {
			as, _ := s.n.store.AccountsByID(ctx, shard, l.Prefix, ids)
			if !rs.charge(uint64(len(as))) {
				return workSpent()
			}
			for _, a := range as {
				if size > syncResponseLimit {
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
		bs, _ := s.n.store.BundlesByID(ctx, shard, l.Prefix, ids)
		if !rs.charge(uint64(len(bs))) {
			return workSpent()
		}
		for _, b := range bs {
			if size > syncResponseLimit {
				resp.Truncated = true
				break
			}
			resp.Bundles = append(resp.Bundles, pb.FromBundle(&b.Bundle))
			size += len(b.Payload) + 100
		}
	}
	return resp, ""
}
