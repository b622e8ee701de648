package testnet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// hostKey returns the Ed25519 identity key of host h, so that a test can
// sign claim notices as the node key of h's own peer ID (the forwarder is
// the origin).
func hostKey(t *testing.T, h host.Host) ed25519.PrivateKey {
	t.Helper()
	raw, err := h.Peerstore().PrivKey(h.ID()).Raw()
	if err != nil || len(raw) != ed25519.PrivateKeySize {
		t.Fatalf("host key: %d bytes, %v", len(raw), err)
	}
	return ed25519.PrivateKey(raw)
}

func newKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// noticeData is the gossip message of a claim or a consume notice.
func noticeData(t *testing.T, claim *protocol.ClaimNotice, consume *protocol.ConsumeNotice) []byte {
	t.Helper()
	m := &pb.GossipMessage{}
	if claim != nil {
		m.Body = &pb.GossipMessage_Claim{Claim: pb.FromClaim(claim)}
	} else {
		m.Body = &pb.GossipMessage_Consume{Consume: pb.FromConsume(consume)}
	}
	data, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// The limits the flood is held to (protocol/README.md, "Against hostile
// peers"; node/notices.go): an origin key's claim notices of one device on
// gossip are held to what an honest node's own claims may be, 20/s, with a
// burst of 60 (the claim limit's 40 and half again for gossip's jitter).
const (
	originClaimBurst = 60
	originClaimRate  = 20
)

// Issue 9, "What it must show" (4): raw libp2p peers, joined to the gossip
// topic of a device's shard with go-libp2p-pubsub directly, flood claim and
// consume notices:
//
//   - the first signs valid claim notices for the device's whole pool with
//     its own identity key and with a freshly minted node key, far over an
//     honest node's claim rate: the victim marks no more of the pool claimed
//     than the per-origin limits allow, and the sender's score falls below
//     the graylist threshold (or it is cut off);
//   - the second sends forgeries: claim notices with bad signatures, claim
//     notices naming another device's refs, consume notices with bad
//     signatures, and consume notices of its own device naming the victim
//     device's refs: nothing is marked or deleted, and it is graylisted.
//
// Meanwhile a chat client's claims of another device through the victim's
// HTTP API keep being served, and afterwards the flooded device's pool still
// hands out one-time bundles on every node.
//
// The network is simulated, in virtual time: the flood arrives as fast as
// the attackers send it, however loaded the machine running the test is, so
// the limits it is held to do not depend on the machine's speed.
func TestHostileNoticeFlood(t *testing.T) {
	synctest.Test(t, hostileNoticeFlood)
}

func hostileNoticeFlood(t *testing.T) {
	const poolSize = 200
	board := newScoreBoard()
	nw := startSim(t, simnet.Options{Full: 2, ShardCount: protocol.DefaultShardCount, NodeConfig: func(i int, cfg *node.Config) {
		cfg.Shards = protocol.AllShards(protocol.DefaultShardCount)
		cfg.MaxPerDevice = poolSize + 50
		if i == 0 {
			cfg.PeerScoreInspect = board.inspect
		}
	}})
	nodes := []*node.Node{nw.Nodes[0].Node, nw.Nodes[1].Node}
	victim := nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// A: the flooded device; B: another device, whose refs the forgeries
	// name; H: the device honest clients claim during the flood.
	a := newPool(t, nil, poolSize, true)
	b := newPool(t, nil, 3, true)
	hp := newPool(t, nil, 60, true)
	for _, p := range []*pool{a, b, hp} {
		p.submit(t, ctx, victim)
	}
	for _, p := range []*pool{a, b, hp} {
		p.waitHeld(t, ctx, nodes)
	}
	shard := protocol.Shard(a.id, protocol.DefaultShardCount)

	// Honest claims of H through the victim's API, 10/s, all through the
	// flood: each must be served (a one-time or, once H's pool is used up,
	// the last-resort bundle), never refused.
	honestStop := make(chan struct{})
	var honestMu sync.Mutex
	var honestFailures []string
	honestServed := 0
	var honestWG sync.WaitGroup
	honestWG.Add(1)
	go func() {
		defer honestWG.Done()
		api := handlerAPI(victim, "192.0.2.9:4000")
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-honestStop:
				return
			case <-tick.C:
			}
			code, cb, raw, err := api.claim(ctx, hp.id)
			honestMu.Lock()
			if err != nil || code != http.StatusOK || cb.DeviceID != hp.id.String() {
				honestFailures = append(honestFailures, fmt.Sprintf("http %d %s (%v)", code, raw, err))
			} else {
				honestServed++
			}
			honestMu.Unlock()
		}
	}()

	// Phase 1: valid but excessive claim notices for all of A's pool, signed
	// by the sender's own identity key and by a minted node key.
	h1 := simHost(t, nw)
	floodKey := hostKey(t, h1)
	minted := newKey(t)
	att1 := newGossipAttacker(t, ctx, h1, victim, shard, pubsub.WithPeerOutboundQueueSize(4096))
	floodStart := time.Now()
	for i, ref := range a.refs {
		ts := uint64(time.Now().UnixMilli())
		own := protocol.SignClaim(floodKey, ts, a.id, ref)
		other := protocol.SignClaim(minted, ts, a.id, a.refs[len(a.refs)-1-i])
		for _, n := range []*protocol.ClaimNotice{&own, &other} {
			if err := att1.topic.Publish(ctx, noticeData(t, n, nil)); err != nil {
				t.Fatal(err)
			}
		}
	}
	floodSent := time.Since(floodStart)
	waitCutOff(t, ctx, board, victim, att1.id, "the sender of excessive claim notices")
	// Its notices are taken at most until it is cut off: until now.
	phase1 := time.Since(floodStart)

	// Phase 2: forgeries from a second peer, sent over and over until it is
	// cut off and the honest client has been served 20 claims meanwhile.
	h2 := simHost(t, nw)
	att2 := newGossipAttacker(t, ctx, h2, victim, shard, pubsub.WithPeerOutboundQueueSize(4096))
	forger, thief := newKey(t), newKey(t)
	floodCtx, stopFlood := context.WithCancel(ctx)
	defer stopFlood()
	forgeries := 0
	flooded := make(chan error, 1)
	go func() {
		for i := 0; floodCtx.Err() == nil; i++ {
			ref := a.refs[i%len(a.refs)]
			ts := uint64(time.Now().UnixMilli())
			badSig := protocol.SignClaim(forger, ts, a.id, ref)
			badSig.Signature[i%64] ^= 0x01
			foreign := protocol.SignClaim(forger, ts, a.id, b.refs[i%len(b.refs)])
			badConsume := protocol.SignConsume(a.dev, ts, []protocol.Ref{ref})
			badConsume.Signature[(i+7)%64] ^= 0x80
			stolen := protocol.SignConsume(thief, ts, []protocol.Ref{ref})
			for _, data := range [][]byte{
				noticeData(t, &badSig, nil), noticeData(t, &foreign, nil),
				noticeData(t, nil, &badConsume), noticeData(t, nil, &stolen),
			} {
				if err := att2.topic.Publish(floodCtx, data); err != nil {
					if floodCtx.Err() == nil {
						flooded <- err
					}
					close(flooded)
					return
				}
				forgeries++
			}
			time.Sleep(10 * time.Millisecond) // 400 notices a second, steadily (virtual time)
		}
		close(flooded)
	}()
	waitCutOff(t, ctx, board, victim, att2.id, "the sender of forged notices")
	served := func() int { honestMu.Lock(); defer honestMu.Unlock(); return honestServed + len(honestFailures) }
	nodetest.WaitFor(t, "20 honest claims during the flood", 10*time.Second, func() bool { return served() >= 20 })
	stopFlood()
	if err := <-flooded; err != nil {
		t.Fatalf("forger: %v", err)
	}
	floodTime := time.Since(floodStart)
	close(honestStop)
	honestWG.Wait()

	honestMu.Lock()
	if len(honestFailures) > 0 {
		t.Fatalf("%d honest claims refused during the flood (%d served), first: %s", len(honestFailures), honestServed, honestFailures[0])
	}
	honestMu.Unlock()

	// What the flood achieved, on both nodes: A's pool marked claimed at
	// most at the per-origin limits of the two origin keys over the phase-1
	// flood; nothing of A or B deleted; B's refs not marked under A.
	bound := 2 * (originClaimBurst + int(originClaimRate*phase1.Seconds()+0.999))
	for i, n := range nodes {
		api := handlerAPI(n, "192.0.2.10:4000")
		got, err := api.count(ctx, a.id)
		if err != nil {
			t.Fatal(err)
		}
		marked := poolSize - got.OneTime
		t.Logf("node %d: %d of A's %d one-time bundles marked claimed by the flood (bound %d); B %+v", i, marked, poolSize, bound, mustCount(t, ctx, api, b.id))
		if marked > bound || got.OneTime == 0 {
			t.Fatalf("node %d: the flood marked %d of %d one-time bundles claimed, over the limits' %d", i, marked, poolSize, bound)
		}
		if !holdsAll(ctx, n, a.id, append(append([]protocol.Ref{}, a.refs...), a.lrRef)) || !holdsAll(ctx, n, b.id, b.refs) {
			t.Fatalf("node %d: forged or foreign consume notices deleted bundles", i)
		}
		if bc := mustCount(t, ctx, api, b.id); bc.OneTime != len(b.refs) {
			t.Fatalf("node %d: claim notices naming B's refs under A marked B's bundles: %+v", i, bc)
		}
		// The flooded device still hands out one-time bundles.
		code, cb, raw, err := api.claim(ctx, a.id)
		if err != nil || code != http.StatusOK || cb.LastResort {
			t.Fatalf("node %d: claim of the flooded device: http %d %s last_resort %v (%v), want a one-time bundle", i, code, raw, cb.LastResort, err)
		}
		a.checkClaim(t, cb)
	}
	rejected := nodetest.Scrape(t, victim.Handler(), "kpnode_notices_rejected_total")
	penalties := nodetest.Scrape(t, victim.Handler(), "kpnode_peer_penalties_total")
	s1, _ := board.min(att1.id)
	s2, _ := board.min(att2.id)
	t.Logf("flood of %d notices over %v (phase 1 sent in %v, its sender cut off after %v); victim: %.0f notices rejected, %.0f peer penalties; lowest scores: excessive sender %.0f, forger %.0f; %d honest claims served meanwhile",
		2*poolSize+forgeries, floodTime.Round(time.Millisecond), floodSent.Round(time.Millisecond), phase1.Round(time.Millisecond), rejected, penalties, s1, s2, honestServed)
	if rejected == 0 {
		t.Fatal("the victim rejected no notice")
	}
}

func mustCount(t *testing.T, ctx context.Context, api *apiClient, dev protocol.Key) countBody {
	t.Helper()
	got, err := api.count(ctx, dev)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// waitCutOff waits until the victim's gossipsub score of attacker is below
// the graylist threshold (−400), or the victim has cut it off.
func waitCutOff(t *testing.T, ctx context.Context, board *scoreBoard, victim *node.Node, attacker peer.ID, who string) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := eventually(wctx, func() bool {
		if s, ok := board.min(attacker); ok && s < -400 {
			return true
		}
		for _, p := range victim.ConnectedPeers() {
			if p == attacker {
				return false
			}
		}
		return true
	}); err != nil {
		s, _ := board.score(attacker)
		t.Fatalf("%s was neither graylisted nor cut off: score %v; victim's notice metrics:\n%s", who, s, noticeMetrics(victim))
	}
}

// noticeMetrics returns the victim's notice metric lines, for a failure's
// message.
func noticeMetrics(n *node.Node) string {
	rec := httptest.NewRecorder()
	n.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	var out []string
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if strings.HasPrefix(line, "kpnode_notices_") || strings.HasPrefix(line, "kpnode_gossip_notices_") || strings.HasPrefix(line, "kpnode_peer_penalties") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
