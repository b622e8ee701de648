package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// syncItem is one seeded bundle as sync sees it.
type syncItem struct {
	key protocol.Key
	h   [32]byte
}

// syncModel is an honest peer's copy of the node's bundle set, by shard,
// to run real reconciliation sessions against the node.
type syncModel struct {
	shards [][]syncItem
}

func newSyncModel(v *victim, shards int) *syncModel {
	m := &syncModel{shards: make([][]syncItem, shards)}
	for i := range v.bundles {
		k := v.bundles[i].DeviceID
		s := protocol.Shard(k, shards)
		m.shards[s] = append(m.shards[s], syncItem{key: k, h: protocol.BundleItem(k, v.infos[i].TimestampMS, v.infos[i].Ref)})
	}
	return m
}

// digest is the digest of items under prefix, without the items in lack.
func digest(items []syncItem, prefix []byte, lack map[uint64]bool) protocol.Digest {
	var d protocol.Digest
	for _, it := range items {
		if bytes.HasPrefix(it.key[:], prefix) && !lack[protocol.ItemID(it.h)] {
			d.Add(it.h)
		}
	}
	return d
}

// honestSession reconciles shard with the node as an honest initiator that
// lacks the items in lack: the root range, then the differing children,
// then the wanted items. It returns the rounds it ran.
func honestSession(ctx context.Context, h host.Host, nodeID peer.ID, proto string, m *syncModel, shard int, lack map[uint64]bool) (int, error) {
	s, err := h.NewStream(ctx, nodeID, p2pprotocol.ID(proto))
	if err != nil {
		return 0, err
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(30 * time.Second))
	w, r := pbio.NewDelimitedWriter(s), pbio.NewDelimitedReader(s, 16<<20)
	items := m.shards[shard]
	root := digest(items, nil, lack)
	fp := root.Fingerprint()
	req := &pb.SyncRequest{Shard: uint32(shard), Ranges: []*pb.SyncRange{{Count: root.Count, Fingerprint: fp[:]}}}
	rounds := 0
	for ; rounds < 16 && (len(req.Ranges) > 0 || len(req.Want) > 0); rounds++ {
		if err := w.WriteMsg(req); err != nil {
			return rounds, err
		}
		var resp pb.SyncResponse
		if err := r.ReadMsg(&resp); err != nil {
			return rounds, err
		}
		if resp.Status != pb.SyncResponse_STATUS_OK {
			return rounds, fmt.Errorf("honest round answered %v", resp.Status)
		}
		next := &pb.SyncRequest{Shard: uint32(shard)}
		for _, rg := range resp.Ranges {
			d := digest(items, rg.Prefix, lack)
			if f := d.Fingerprint(); !bytes.Equal(f[:], rg.Fingerprint) {
				next.Ranges = append(next.Ranges, &pb.SyncRange{Prefix: rg.Prefix, Count: d.Count, Fingerprint: f[:]})
			}
		}
		for _, l := range resp.Listings {
			want := &pb.SyncListing{Prefix: l.Prefix}
			for _, id := range l.Ids {
				if lack[id] {
					want.Ids = append(want.Ids, id)
				}
			}
			if len(want.Ids) > 0 {
				next.Want = append(next.Want, want)
			}
		}
		req = next
	}
	s.CloseWrite()
	return rounds, nil
}

// honestSyncRounds runs two sessions per shard, each lacking a few items.
func honestSyncRounds(v *victim, h host.Host, shards int) func(context.Context) (int, error) {
	return func(ctx context.Context) (int, error) {
		if err := h.Connect(ctx, v.info); err != nil {
			return 0, err
		}
		m := newSyncModel(v, shards)
		proto := protocol.SyncProtocol(v.netID)
		total := 0
		for i := 0; i < 2*shards; i++ {
			if i > 0 { // paced: an honest node runs a session per shard every 30 s
				select {
				case <-ctx.Done():
					return total, ctx.Err()
				case <-time.After(50 * time.Millisecond):
				}
			}
			shard := i % shards
			lack := map[uint64]bool{}
			items := m.shards[shard]
			for j := 0; j < 4 && len(items) > 0; j++ {
				lack[protocol.ItemID(items[(i*7+j*13)%len(items)].h)] = true
			}
			n, err := honestSession(ctx, h, v.info.ID, proto, m, shard, lack)
			total += n
			if err != nil {
				return total, err
			}
		}
		return total, nil
	}
}

func randomID() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.BigEndian.Uint64(b[:])
}

func randomFP() []byte {
	b := make([]byte, protocol.FingerprintSize)
	rand.Read(b)
	return b
}

// attackSyncResponder: the node is the initiator. The hostile host serves
// sync and answers every round with a response of -resp-kb: in a session's
// first round, listings of the root with one invented item each; then
// invented children of every asked prefix, interleaved so no two
// consecutive ranges share a parent, so the ranges the node asks about next
// get ever deeper children.
func attackSyncResponder(ctx context.Context, o attackOpts) (*attackResult, error) {
	v, err := startVictim(ctx, o, o.seed)
	if err != nil {
		return nil, err
	}
	defer v.close()
	st, err := v.n.Status(ctx)
	if err != nil {
		return nil, err
	}
	r := &attackResult{scenario: "sync-responder", what: fmt.Sprintf("node initiates sync with a hostile responder (%s): %d KiB responses of invented root listings and/or ever deeper children (%d bundles stored)", o.syncMode, o.respKB, o.seed)}
	honest, err := newHost()
	if err != nil {
		return nil, err
	}
	defer honest.Close()
	bad, err := newHost()
	if err != nil {
		return nil, err
	}
	defer bad.Close()
	proto := p2pprotocol.ID(protocol.SyncProtocol(v.netID))
	budget := o.respKB << 10
	var answered atomic.Int64
	var actx atomic.Pointer[context.Context]
	bad.SetStreamHandler(proto, func(s network.Stream) {
		defer s.Reset()
		r, w := pbio.NewDelimitedReader(s, 16<<20), pbio.NewDelimitedWriter(s)
		for {
			c := actx.Load()
			if c == nil || (*c).Err() != nil || answered.Load() >= int64(o.requests) {
				return
			}
			var req pb.SyncRequest
			if err := r.ReadMsg(&req); err != nil {
				return
			}
			if err := w.WriteMsg(hostileSyncResponse(&req, budget, o.syncMode)); err != nil {
				return
			}
			answered.Add(1)
		}
	})
	err = phases(ctx, o, v, r, []host.Host{bad}, honestSyncRounds(v, honest, st.ShardCount),
		func(ctx context.Context, w *cutWatch) (int, error) {
			actx.Store(&ctx)
			if err := bad.Connect(ctx, v.info); err != nil {
				return 0, err
			}
			<-ctx.Done()
			return int(answered.Load()), nil
		})
	if answered.Load() == 0 {
		r.notes = append(r.notes, "the node started no sync session with the hostile responder")
	}
	return r, err
}

// hostileSyncResponse fills about budget bytes with listings and children of
// the asked prefixes.
func hostileSyncResponse(req *pb.SyncRequest, budget int, mode string) *pb.SyncResponse {
	resp := &pb.SyncResponse{Status: pb.SyncResponse_STATUS_OK}
	var asked [][]byte
	for _, rg := range req.Ranges {
		asked = append(asked, rg.Prefix)
	}
	if len(asked) == 0 {
		asked = [][]byte{nil}
	}
	size := 0
	// When the root is asked (a session's first round): half the budget in
	// one-item listings of the root, each a scan of the whole shard.
	if len(asked[0]) == 0 && mode != "deep" {
		share := budget / 2
		if mode == "scan" {
			share = budget
		}
		for size < share {
			resp.Listings = append(resp.Listings, &pb.SyncListing{Ids: []uint64{randomID()}})
			size += 14
		}
	}
	// The rest: invented children of the asked prefixes, parents
	// interleaved; the node asks about them all, one level deeper each round.
	for i := 0; size < budget; i++ {
		p := asked[i%len(asked)]
		if len(p) >= protocol.KeySize-1 {
			size += 40
			continue
		}
		child := append(bytes.Clone(p), byte(i/len(asked)))
		resp.Ranges = append(resp.Ranges, &pb.SyncRange{Prefix: child, Count: 1000 + uint64(i), Fingerprint: randomFP()})
		size += len(child) + 26
	}
	return resp
}

// attackSyncInitiator: the hostile host runs -sessions parallel sessions,
// each sending rounds of 64 want listings naming the empty prefix (8
// invented item IDs each) for shard after shard, until cut off or done.
func attackSyncInitiator(ctx context.Context, o attackOpts) (*attackResult, error) {
	v, err := startVictim(ctx, o, o.seed)
	if err != nil {
		return nil, err
	}
	defer v.close()
	st, err := v.n.Status(ctx)
	if err != nil {
		return nil, err
	}
	r := &attackResult{scenario: "sync-initiator", what: fmt.Sprintf("%d parallel sessions of requests with 64 empty-prefix wants (%d bundles stored)", o.sessions, o.seed)}
	honest, err := newHost()
	if err != nil {
		return nil, err
	}
	defer honest.Close()
	bad, err := newHost()
	if err != nil {
		return nil, err
	}
	defer bad.Close()
	proto := p2pprotocol.ID(protocol.SyncProtocol(v.netID))
	err = phases(ctx, o, v, r, []host.Host{bad}, honestSyncRounds(v, honest, st.ShardCount),
		func(ctx context.Context, w *cutWatch) (int, error) {
			if err := bad.Connect(ctx, v.info); err != nil {
				return 0, err
			}
			var sent atomic.Int64
			var wg sync.WaitGroup
			for k := 0; k < o.sessions; k++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for tries := 0; ctx.Err() == nil && sent.Load() < int64(o.requests) && tries < 10_000; tries++ {
						s, err := bad.NewStream(ctx, v.info.ID, proto)
						if err == nil {
							var n int
							n, err = hostileInitiatorSession(ctx, s, k, st.ShardCount, o.requests, &sent)
							s.Reset()
							if n > 0 {
								w.served()
							}
						}
						// A session refused or reset before its first answer.
						if err != nil && ctx.Err() == nil {
							w.refused()
							select {
							case <-ctx.Done():
							case <-time.After(100 * time.Millisecond):
							}
						}
					}
				}()
			}
			wg.Wait()
			return int(sent.Load()), nil
		})
	return r, err
}

// hostileInitiatorSession sends rounds on s until an error, the context
// ends or limit requests were sent in all; it returns its answered rounds.
func hostileInitiatorSession(ctx context.Context, s network.Stream, k, shards, limit int, sent *atomic.Int64) (int, error) {
	stop := context.AfterFunc(ctx, func() { s.Reset() })
	defer stop()
	w, r := pbio.NewDelimitedWriter(s), pbio.NewDelimitedReader(s, 16<<20)
	rounds := 0
	for ctx.Err() == nil && sent.Add(1) <= int64(limit) {
		req := &pb.SyncRequest{Shard: uint32((k + rounds) % shards)}
		for j := 0; j < 64; j++ {
			l := &pb.SyncListing{}
			for i := 0; i < 8; i++ {
				l.Ids = append(l.Ids, randomID())
			}
			req.Want = append(req.Want, l)
		}
		if err := w.WriteMsg(req); err != nil {
			sent.Add(-1)
			return rounds, err
		}
		var resp pb.SyncResponse
		if err := r.ReadMsg(&resp); err != nil {
			sent.Add(-1)
			return rounds, err
		}
		if resp.Status != pb.SyncResponse_STATUS_OK {
			return rounds, errors.New(resp.Status.String())
		}
		rounds++
	}
	sent.Add(-1)
	return rounds, nil
}
