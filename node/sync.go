package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// Sync limits. A differing range with at most syncListThreshold items on the
// responder's side is listed item by item (8 bytes each); a larger one is
// split into its 256 children. Wants are asked for in batches.
const (
	syncListThreshold = 64
	syncMaxListing    = 4096 // item IDs in one listing (a range of one key may exceed the threshold)
	syncMaxRanges     = 1024 // per request
	syncMaxListings   = 64   // want listings per request
	syncMaxWant       = 512  // item IDs per request
	syncMaxPending    = 1 << 16
	syncMaxRounds     = 512
	syncMaxRequest    = 1 << 20
	syncMaxResponse   = 16 << 20
	syncResponseLimit = 4 << 20 // records per response, before truncating
	syncSessionLimit  = 2 * time.Minute
	// DefaultSyncInterval is how often a node reconciles each shard it holds
	// with a random peer that holds it too.
	DefaultSyncInterval = 30 * time.Second
)

// syncService runs anti-entropy: on connecting to a peer and periodically,
// each shard a node holds is reconciled with a peer that holds it, and the
// node pulls what it lacks. What gossip loses, or a node misses while it is
// offline or partitioned, arrives this way.
type syncService struct {
	n     *Node
	h     host.Host
	proto p2pprotocol.ID
	log   *slog.Logger

	// shardLocks serialise sessions per shard: a node that reconnects to
	// several peers at once pulls the missing records from the first and
	// finds the others already in agreement, instead of pulling them twice.
	shardLocks []sync.Mutex
}

func startSync(ctx context.Context, n *Node, h host.Host) *syncService {
	s := &syncService{n: n, h: h, proto: p2pprotocol.ID(protocol.SyncProtocol(n.netID)),
		log: n.log.With("component", "sync"), shardLocks: make([]sync.Mutex, n.cfg.Shards.Count())}
	h.SetStreamHandler(s.proto, s.handle)
	if !n.cfg.Shards.Empty() {
		h.Network().Notify(&network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
			go s.onConnect(ctx, c.RemotePeer())
		}})
		go s.loop(ctx)
	}
	return s
}

func (s *syncService) close() { s.h.RemoveStreamHandler(s.proto) }

// onConnect reconciles every held shard with a newly connected peer, once
// identify has told whether it speaks sync.
func (s *syncService) onConnect(ctx context.Context, p peer.ID) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(500 * time.Millisecond):
	}
	if protos, err := s.h.Peerstore().SupportsProtocols(p, s.proto); err != nil || len(protos) == 0 {
		return
	}
	s.syncPeer(ctx, p, s.n.cfg.Shards.List(), false)
}

// loop reconciles each held shard with a random peer of its topic.
func (s *syncService) loop(ctx context.Context) {
	for {
		jitter := time.Duration(rand.Int64N(int64(s.n.cfg.SyncInterval / 5)))
		select {
		case <-ctx.Done():
			return
		case <-time.After(s.n.cfg.SyncInterval + jitter):
		}
		for _, shard := range s.n.cfg.Shards.List() {
			peers := s.n.gossip.bundles[shard].ListPeers()
			if len(peers) == 0 {
				continue
			}
			s.syncPeer(ctx, peers[rand.IntN(len(peers))], []int{shard}, false)
		}
	}
}

// syncPeer reconciles shards with p. Unless wait is set, a shard with a
// session already running is skipped: that session brings what p has too,
// or the next round will.
func (s *syncService) syncPeer(ctx context.Context, p peer.ID, shards []int, wait bool) {
	for _, shard := range shards {
		for _, set := range []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_ACCOUNTS} {
			pulled, err := s.syncShard(ctx, p, shard, set, wait)
			switch {
			case errors.Is(err, errNotHeld), errors.Is(err, errSyncBusy):
			case err != nil:
				s.log.Debug("sync failed", "peer", p, "shard", shard, "set", set, "err", err)
			case pulled > 0:
				s.log.Info("sync pulled records", "peer", p, "shard", shard, "set", set, "records", pulled)
			}
		}
	}
}

func setKind(set pb.SyncRequest_Set) storage.SetKind {
	if set == pb.SyncRequest_SET_ACCOUNTS {
		return storage.AccountSet
	}
	return storage.BundleSet
}

// countingStream counts the bytes a sync session moves.
type countingStream struct {
	network.Stream
	read, written int64
}

func (c *countingStream) Read(p []byte) (int, error) {
	n, err := c.Stream.Read(p)
	c.read += int64(n)
	return n, err
}

func (c *countingStream) Write(p []byte) (int, error) {
	n, err := c.Stream.Write(p)
	c.written += int64(n)
	return n, err
}

// errSyncBusy: a session for the shard is already running.
var errSyncBusy = errors.New("a sync session for this shard is running")

// syncShard runs one initiator session: it pulls the records of shard's set
// that p holds and this node lacks, and returns how many it stored. The
// responder is not trusted: it may only answer the ranges asked about, and a
// session is bounded in rounds, pending wants and time.
func (s *syncService) syncShard(ctx context.Context, p peer.ID, shard int, set pb.SyncRequest_Set, wait bool) (int, error) {
	if shard < 0 || shard >= len(s.shardLocks) {
		return 0, fmt.Errorf("no shard %d", shard)
	}
	if wait {
		s.shardLocks[shard].Lock()
	} else if !s.shardLocks[shard].TryLock() {
		return 0, errSyncBusy
	}
	defer s.shardLocks[shard].Unlock()
	ctx, cancel := context.WithTimeout(ctx, syncSessionLimit)
	defer cancel()
	raw, err := s.h.NewStream(ctx, p, s.proto)
	if err != nil {
		return 0, err
	}
	st := &countingStream{Stream: raw}
	defer func() {
		st.Close()
		s.n.metrics.syncBytes.WithLabelValues("in").Add(float64(st.read))
		s.n.metrics.syncBytes.WithLabelValues("out").Add(float64(st.written))
	}()
	stop := context.AfterFunc(ctx, func() { _ = raw.Reset() })
	defer stop()
	w, r := pbio.NewDelimitedWriter(st), pbio.NewDelimitedReader(st, syncMaxResponse)
	kind := setKind(set)
	root := s.n.store.ShardDigest(kind, shard)
	fp := root.Fingerprint()
	var (
		ranges  = []*pb.SyncRange{{Count: root.Count, Fingerprint: fp[:]}} // to ask about
		pending []*pb.SyncListing                                          // wants not yet asked for
		npend   int                                                        // item IDs in pending
		pulled  int
	)
	for round := 0; ; round++ {
		if round == syncMaxRounds {
			return pulled, fmt.Errorf("gave up after %d rounds", round)
		}
		req := &pb.SyncRequest{Shard: uint32(shard), Set: set}
		n := min(len(ranges), syncMaxRanges)
		req.Ranges, ranges = ranges[:n], ranges[n:]
		var asked int
		req.Want, pending, asked = takeWants(pending, syncMaxWant, syncMaxListings)
		npend -= asked
		if len(req.Ranges) == 0 && len(req.Want) == 0 {
			break
		}
		_ = raw.SetDeadline(time.Now().Add(s.n.cfg.StreamTimeout))
		if err := w.WriteMsg(req); err != nil {
			return pulled, fmt.Errorf("round %d: %w", round, err)
		}
		var resp pb.SyncResponse
		if err := r.ReadMsg(&resp); err != nil {
			return pulled, fmt.Errorf("round %d: %w", round, err)
		}
		s.n.metrics.syncRounds.Inc()
		switch resp.Status {
		case pb.SyncResponse_STATUS_OK:
		case pb.SyncResponse_STATUS_NOT_HOLDER:
			return pulled, errNotHeld
		default:
			return pulled, fmt.Errorf("peer answered %v", resp.Status)
		}
		got := map[uint64]bool{}
		stored, received := s.ingest(ctx, p, shard, &resp, got)
		pulled += stored
		if resp.Truncated && received > 0 {
			// Asked-for records the responder left out: ask again. A
			// responder that truncates without sending anything makes no
			// progress and gets no second chance.
			for _, l := range unanswered(req.Want, got) {
				pending, npend = append(pending, l), npend+len(l.Ids)
			}
		}
		asks := map[string]bool{}
		for _, rg := range req.Ranges {
			asks[string(rg.Prefix)] = true
		}
		more, err := s.compareRanges(ctx, kind, shard, childrenOf(asks, resp.Ranges))
		if err != nil {
			return pulled, err
		}
		ranges = append(ranges, more...)
		wants, err := s.wantsFromListings(ctx, kind, shard, listingsOf(asks, resp.Listings))
		if err != nil {
			return pulled, err
		}
		for _, l := range wants {
			if npend+len(l.Ids) > syncMaxPending {
				break // the next session asks for the rest
			}
			pending, npend = append(pending, l), npend+len(l.Ids)
		}
	}
	_ = raw.CloseWrite()
	return pulled, nil
}

// childrenOf keeps the ranges that are children (one more byte) of a range
// that was asked about.
func childrenOf(asked map[string]bool, rs []*pb.SyncRange) []*pb.SyncRange {
	var out []*pb.SyncRange
	for _, rg := range rs {
		if l := len(rg.Prefix); l > 0 && l < protocol.KeySize && asked[string(rg.Prefix[:l-1])] {
			out = append(out, rg)
		}
	}
	return out
}

// listingsOf keeps the listings of ranges that were asked about.
func listingsOf(asked map[string]bool, ls []*pb.SyncListing) []*pb.SyncListing {
	var out []*pb.SyncListing
	for _, l := range ls {
		if asked[string(l.Prefix)] && len(l.Ids) <= syncMaxListing {
			out = append(out, l)
		}
	}
	return out
}

// ingest validates and stores the records of a response, like every other
// path, and records their item IDs in got. It returns how many records it
// stored and how many the response carried.
func (s *syncService) ingest(ctx context.Context, p peer.ID, shard int, resp *pb.SyncResponse, got map[uint64]bool) (stored, received int) {
	received = len(resp.Bundles) + len(resp.Accounts)
	count := s.n.cfg.Shards.Count()
	for _, m := range resp.Bundles {
		b, err := bundleFromPB(m)
		if err == nil && protocol.Shard(b.DeviceID, count) != shard {
			err = fmt.Errorf("%w: device of another shard", errMalformed)
		}
		if err != nil {
			s.log.Debug("sync: malformed bundle", "peer", p, "err", err)
			continue
		}
		outcome, info, err := s.n.ingestBundle(ctx, b, sourceSync)
		if err != nil {
			continue
		}
		got[protocol.ItemID(protocol.BundleItem(b.DeviceID, info.TimestampMS, info.Ref))] = true
		if outcome == storage.Stored || outcome == storage.Refreshed {
			stored++
		}
	}
	for _, m := range resp.Accounts {
		a, err := accountFromPB(m)
		if err == nil && protocol.Shard(a.AccountPub, count) != shard {
			err = fmt.Errorf("%w: account of another shard", errMalformed)
		}
		if err != nil {
			continue
		}
		if lamport, err := protocol.AccountLamport(a.Payload); err == nil {
			got[protocol.ItemID(protocol.AccountItem(a.AccountPub, lamport, a.Payload))] = true
		}
		if _, outcome, err := s.n.ingestAccount(ctx, a, storage.AccountConverge, sourceSync); err == nil && outcome == storage.Stored {
			stored++
		}
	}
	return stored, received
}

// compareRanges returns every range of theirs whose fingerprint differs
// from ours, with our count and fingerprint. Ranges come grouped by parent
// prefix; each parent costs one scan of our store.
func (s *syncService) compareRanges(ctx context.Context, kind storage.SetKind, shard int, theirs []*pb.SyncRange) ([]*pb.SyncRange, error) {
	var out []*pb.SyncRange
	var parent []byte
	var children [256]protocol.Digest
	haveParent := false
	for _, rg := range theirs {
		if len(rg.Prefix) == 0 || len(rg.Prefix) >= protocol.KeySize {
			continue
		}
		pp := rg.Prefix[:len(rg.Prefix)-1]
		if !haveParent || !bytes.Equal(pp, parent) {
			var err error
			if _, children, _, err = s.n.store.PrefixDigests(ctx, kind, shard, pp); err != nil {
				return nil, err
			}
			parent, haveParent = bytes.Clone(pp), true
		}
		mine := children[rg.Prefix[len(rg.Prefix)-1]]
		if fp := mine.Fingerprint(); !bytes.Equal(fp[:], rg.Fingerprint) {
			out = append(out, &pb.SyncRange{Prefix: rg.Prefix, Count: mine.Count, Fingerprint: fp[:]})
		}
	}
	return out, nil
}

// wantsFromListings returns, per listed range, the item IDs we lack.
func (s *syncService) wantsFromListings(ctx context.Context, kind storage.SetKind, shard int, listings []*pb.SyncListing) ([]*pb.SyncListing, error) {
	var out []*pb.SyncListing
	for _, l := range listings {
		if len(l.Prefix) >= protocol.KeySize {
			continue
		}
		mine, err := s.n.store.PrefixItems(ctx, kind, shard, l.Prefix)
		if err != nil {
			return nil, err
		}
		have := make(map[uint64]bool, len(mine))
		for _, h := range mine {
			have[protocol.ItemID(h)] = true
		}
		want := &pb.SyncListing{Prefix: l.Prefix}
		for _, id := range l.Ids {
			if !have[id] {
				want.Ids = append(want.Ids, id)
			}
		}
		if len(want.Ids) > 0 {
			out = append(out, want)
		}
	}
	return out, nil
}

// takeWants splits off at most maxIDs item IDs in at most maxListings
// listings from pending, and says how many IDs it took.
func takeWants(pending []*pb.SyncListing, maxIDs, maxListings int) (batch, rest []*pb.SyncListing, taken int) {
	for len(pending) > 0 && taken < maxIDs && len(batch) < maxListings {
		l := pending[0]
		if taken+len(l.Ids) <= maxIDs {
			batch = append(batch, l)
			taken += len(l.Ids)
			pending = pending[1:]
			continue
		}
		k := maxIDs - taken
		batch = append(batch, &pb.SyncListing{Prefix: l.Prefix, Ids: l.Ids[:k]})
		pending[0] = &pb.SyncListing{Prefix: l.Prefix, Ids: l.Ids[k:]}
		taken = maxIDs
	}
	return batch, pending, taken
}

func unanswered(asked []*pb.SyncListing, got map[uint64]bool) []*pb.SyncListing {
	var out []*pb.SyncListing
	for _, l := range asked {
		rest := &pb.SyncListing{Prefix: l.Prefix}
		for _, id := range l.Ids {
			if !got[id] {
				rest.Ids = append(rest.Ids, id)
			}
		}
		if len(rest.Ids) > 0 {
			out = append(out, rest)
		}
	}
	return out
}

// handle serves a sync session: request/response rounds until the
// initiator closes its side.
func (s *syncService) handle(raw network.Stream) {
	defer raw.Close()
	st := &countingStream{Stream: raw}
	defer func() {
		s.n.metrics.syncBytes.WithLabelValues("in").Add(float64(st.read))
		s.n.metrics.syncBytes.WithLabelValues("out").Add(float64(st.written))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), syncSessionLimit)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = raw.Reset() })
	defer stop()
	r, w := pbio.NewDelimitedReader(st, syncMaxRequest), pbio.NewDelimitedWriter(st)
	for {
		_ = raw.SetDeadline(time.Now().Add(s.n.cfg.StreamTimeout))
		var req pb.SyncRequest
		if err := r.ReadMsg(&req); err != nil {
			if !errors.Is(err, io.EOF) {
				s.log.Debug("sync: bad request", "peer", raw.Conn().RemotePeer(), "err", err)
				_ = raw.Reset()
			}
			return
		}
		resp := s.serve(ctx, &req)
		if err := w.WriteMsg(resp); err != nil {
			_ = raw.Reset()
			return
		}
		if resp.Status != pb.SyncResponse_STATUS_OK {
			return
		}
	}
}

// validRequest bounds the work one request can cause: one root range at
// most, no prefix twice, prefixes shorter than a key, and a bounded number
// of non-empty want listings.
func validRequest(req *pb.SyncRequest, shards int) bool {
	if int(req.Shard) >= shards || len(req.Ranges) > syncMaxRanges || len(req.Want) > syncMaxListings ||
		(req.Set != pb.SyncRequest_SET_BUNDLES && req.Set != pb.SyncRequest_SET_ACCOUNTS) {
		return false
	}
	seen := make(map[string]bool, len(req.Ranges))
	for _, rg := range req.Ranges {
		if len(rg.Prefix) >= protocol.KeySize || seen[string(rg.Prefix)] {
			return false
		}
		seen[string(rg.Prefix)] = true
	}
	ids := 0
	for _, l := range req.Want {
		if len(l.Prefix) >= protocol.KeySize || len(l.Ids) == 0 {
			return false
		}
		ids += len(l.Ids)
	}
	return ids <= syncMaxWant
}

// serve answers one round from the store.
func (s *syncService) serve(ctx context.Context, req *pb.SyncRequest) *pb.SyncResponse {
	if !validRequest(req, s.n.cfg.Shards.Count()) {
		return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_BAD_REQUEST}
	}
	shard := int(req.Shard)
	if !s.n.cfg.Shards.Has(shard) {
		return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_NOT_HOLDER}
	}
	kind := setKind(req.Set)
	resp := &pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK}
	for _, rg := range req.Ranges {
		if len(rg.Prefix) == 0 {
			root := s.n.store.ShardDigest(kind, shard)
			if fp := root.Fingerprint(); bytes.Equal(fp[:], rg.Fingerprint) {
				continue // the common case, answered from memory
			}
		}
		mine, children, keys, err := s.n.store.PrefixDigests(ctx, kind, shard, rg.Prefix)
		if err != nil {
			return &pb.SyncResponse{Status: pb.SyncResponse_STATUS_BAD_REQUEST}
		}
		if fp := mine.Fingerprint(); bytes.Equal(fp[:], rg.Fingerprint) || mine.Count == 0 {
			continue
		}
		// List a small range, and a range of a single key (one device's
		// bundles share its whole key, so splitting cannot separate them).
		if mine.Count <= syncListThreshold || keys == 1 || len(rg.Prefix) == protocol.KeySize-1 {
			items, err := s.n.store.PrefixItems(ctx, kind, shard, rg.Prefix)
			if err != nil {
				continue
			}
			l := &pb.SyncListing{Prefix: rg.Prefix}
			for _, h := range items[:min(len(items), syncMaxListing)] {
				l.Ids = append(l.Ids, protocol.ItemID(h))
			}
			resp.Listings = append(resp.Listings, l)
			continue
		}
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
		ids := make(map[uint64]bool, len(l.Ids))
		for _, id := range l.Ids {
			ids[id] = true
		}
		if kind == storage.AccountSet {
			as, _ := s.n.store.AccountsByID(ctx, shard, l.Prefix, ids)
			for _, a := range as {
				if size > syncResponseLimit {
					resp.Truncated = true
					break
				}
				resp.Accounts = append(resp.Accounts, &pb.AccountBundle{AccountPub: a.AccountPub[:], Payload: a.Payload, Signature: a.Signature[:], UpdatedAtMs: a.UpdatedAtMS})
				size += len(a.Payload) + 100
			}
			continue
		}
		bs, _ := s.n.store.BundlesByID(ctx, shard, l.Prefix, ids)
		for _, b := range bs {
			if size > syncResponseLimit {
				resp.Truncated = true
				break
			}
			resp.Bundles = append(resp.Bundles, storedBundleToPB(b))
			size += len(b.Payload) + 100
		}
	}
	return resp
}

// SyncNow reconciles shard's bundle and account sets with peer p now and
// returns how many records it stored (operators' tools and tests).
func (n *Node) SyncNow(ctx context.Context, p peer.ID, shard int) (int, error) {
	total := 0
	for _, set := range []pb.SyncRequest_Set{pb.SyncRequest_SET_BUNDLES, pb.SyncRequest_SET_ACCOUNTS} {
		pulled, err := n.sync.syncShard(ctx, p, shard, set, true)
		total += pulled
		if err != nil {
			return total, err
		}
	}
	return total, nil
}
