package gossip

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/ingest"
	keyed "github.com/kpnode/kpnode/node/internal/bucket"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

func claimMsg(n protocol.ClaimNotice) []byte {
	data, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Claim{Claim: pb.FromClaim(&n)}})
	return data
}

func consumeMsg(n protocol.ConsumeNotice) []byte {
	data, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Consume{Consume: pb.FromConsume(&n)}})
	return data
}

func pub(k ed25519.PrivateKey) protocol.Key { return protocol.Key(k.Public().(ed25519.PublicKey)) }

// nodeIdentity is a node's Ed25519 identity: the key that signs its claim
// notices, and the peer ID derived from it.
func nodeIdentity(t testing.TB) (ed25519.PrivateKey, peer.ID) {
	t.Helper()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	lpub, err := crypto.UnmarshalEd25519PublicKey(priv.Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(lpub)
	if err != nil {
		t.Fatal(err)
	}
	return priv, id
}

// Checks a notice fails before the ingest path (so before any signature
// work): the device's shard (a claim's, read from its payload layout),
// the claim payload's length and layout, the wire sizes. Each is Reject,
// and the ingest path is never called.
func TestGossipValidatorNoticeChecksBeforeIngest(t *testing.T) {
	const shard = 4
	dev, elsewhere := devIn(shard), devIn(shard+1)
	nodeKey, _ := nodeIdentity(t)
	now := ms(time.Now())
	short := protocol.SignClaim(nodeKey, now, pub(dev), protocol.Ref{1})
	short.Payload = short.Payload[:len(short.Payload)-1]
	domain := protocol.SignClaim(nodeKey, now, pub(dev), protocol.Ref{1})
	domain.Payload[3] ^= 1
	wrongSizes, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Claim{Claim: &pb.ClaimNotice{NodeKey: make([]byte, 31), Signature: make([]byte, 64)}}})
	emptyConsume, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Consume{}})
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"claim of a device of another shard", claimMsg(protocol.SignClaim(nodeKey, now, pub(elsewhere), protocol.Ref{1}))},
		{"consume notice of a device of another shard", consumeMsg(protocol.SignConsume(elsewhere, now, []protocol.Ref{{1}}))},
		{"claim payload one byte short", claimMsg(short)},
		{"claim payload of another domain", claimMsg(domain)},
		{"claim with a 31-byte node key", wrongSizes},
		{"consume with no notice", emptyConsume},
	} {
		ing := &fixedIngester{outcome: storage.Stored}
		v := &validator{self: "self", shards: testShards, ing: ing, log: discard}
		if got := v.bundle(context.Background(), shard, "other", tc.data); got != ingest.Reject || ing.calls != 0 {
			t.Errorf("%s: %v after %d ingest calls, want reject after none", tc.name, got, ing.calls)
		}
	}
}

// Each forwarding peer has a budget of notices: over it a notice is
// Ignored before the ingest path and counted; other peers, and bundles,
// are not affected; the budget refills.
func TestGossipValidatorPeerNoticeBudget(t *testing.T) {
	const shard = 1
	dev := devIn(shard)
	nodeKey, _ := nodeIdentity(t)
	m, reg := testMetrics(t)
	clock := time.Unix(5000, 0)
	ing := &fixedIngester{outcome: storage.Stored}
	v := &validator{self: "self", shards: testShards, ing: ing, log: discard, metrics: m,
		notices: keyed.New[peer.ID](16, 2, 3, func() time.Time { return clock })}
	ctx := context.Background()
	notice := func(i int) []byte {
		if i%2 == 0 {
			return claimMsg(protocol.SignClaim(nodeKey, ms(time.Now()), pub(dev), protocol.Ref{byte(i)}))
		}
		return consumeMsg(protocol.SignConsume(dev, ms(time.Now()), []protocol.Ref{{byte(i)}}))
	}
	for i := range 3 {
		if got := v.bundle(ctx, shard, "flooder", notice(i)); got != ingest.Accept {
			t.Fatalf("notice %d within the budget: %v", i, got)
		}
	}
	calls := ing.calls
	for i := 3; i < 10; i++ {
		if got := v.bundle(ctx, shard, "flooder", notice(i)); got != ingest.Ignore {
			t.Fatalf("notice %d over the budget: %v, want ignore", i, got)
		}
	}
	if ing.calls != calls {
		t.Fatalf("notices over the budget reached the ingest path (%d calls)", ing.calls-calls)
	}
	if got := nodetest.Counter(t, reg, "kpnode_gossip_notices_refused_total", "reason", "peer_budget"); got != 7 {
		t.Fatalf("kpnode_gossip_notices_refused_total{reason=peer_budget} = %v, want 7", got)
	}
	if got := v.bundle(ctx, shard, "honest", notice(10)); got != ingest.Accept {
		t.Fatalf("another peer's notice: %v", got)
	}
	if got := v.bundle(ctx, shard, "flooder", bundleMsg(protocol.SignBundle(dev, ms(time.Now()), []byte("kp")))); got != ingest.Accept {
		t.Fatalf("a bundle from the flooder: %v (bundles have the byte budget, not the notice one)", got)
	}
	clock = clock.Add(time.Second) // 2 back at 2/s
	for i := range 3 {
		want := ingest.Accept
		if i == 2 {
			want = ingest.Ignore
		}
		if got := v.bundle(ctx, shard, "flooder", notice(20+i)); got != want {
			t.Fatalf("after a second, notice %d: %v, want %v", i, got, want)
		}
	}
}

// A claim notice over its origin's rate for the device is Ignored; when
// the forwarder is the origin itself and keeps going, it is Rejected once
// its strikes run out (and counted), while the same notices forwarded by
// another peer stay Ignored.
func TestGossipValidatorOriginFlood(t *testing.T) {
	const shard = 6
	dev := devIn(shard)
	nodeKey, origin := nodeIdentity(t)
	m, reg := testMetrics(t)
	clock := time.Unix(5000, 0)
	ing := &fixedIngester{err: fmt.Errorf("claim: %w", ingest.ErrClaimRate)}
	v := &validator{self: "self", shards: testShards, ing: ing, log: discard, metrics: m,
		floods: keyed.New[peer.ID](16, floodRate, floodBurst, func() time.Time { return clock })}
	ctx := context.Background()
	claim := func(i int) []byte {
		return claimMsg(protocol.SignClaim(nodeKey, ms(time.Now()), pub(dev), protocol.Ref{byte(i), byte(i >> 8)}))
	}
	for i := range 3 * floodBurst {
		if got := v.bundle(ctx, shard, "forwarder", claim(i)); got != ingest.Ignore {
			t.Fatalf("claim %d over the origin's rate from another forwarder: %v, want ignore", i, got)
		}
	}
	for i := range floodBurst {
		if got := v.bundle(ctx, shard, origin, claim(i)); got != ingest.Ignore {
			t.Fatalf("the origin's own claim %d over its rate, within its strikes: %v, want ignore", i, got)
		}
	}
	for i := range 5 {
		if got := v.bundle(ctx, shard, origin, claim(1000+i)); got != ingest.Reject {
			t.Fatalf("the origin's own claim %d far over its rate: %v, want reject", i, got)
		}
	}
	if got := nodetest.Counter(t, reg, "kpnode_gossip_notices_refused_total", "reason", "origin_flood"); got != 5 {
		t.Fatalf("kpnode_gossip_notices_refused_total{reason=origin_flood} = %v, want 5", got)
	}
	// Other notice rates (the origin's total, a device's consume notices)
	// never Reject.
	ing.err = ingest.ErrNoticeRate
	if got := v.bundle(ctx, shard, origin, claim(2000)); got != ingest.Ignore {
		t.Fatalf("the origin over its total rate: %v, want ignore", got)
	}
	ing.err = fmt.Errorf("claim: %w", ingest.ErrClaimRate)
	clock = clock.Add(2 * time.Second / floodRate)
	if got := v.bundle(ctx, shard, origin, claim(3000)); got != ingest.Ignore {
		t.Fatalf("a strike back after a pause: %v, want ignore", got)
	}
}

// On go-libp2p's in-memory network: a claim notice and a consume notice
// one service publishes reach a holder of the device's shard, which stores
// both (the claimed ref is marked, the consumed bundle deleted). A peer
// that then floods forged claim notices is Rejected and loses score, while
// an honest peer's claims keep being stored.
func TestServiceCarriesNotices(t *testing.T) {
	mn, hs := nodetest.Mocknet(t, 3)
	ctx := t.Context()
	const shard = 3
	held, err := protocol.ParseShardSet("3", testShards)
	if err != nil {
		t.Fatal(err)
	}
	a := newTestService(t, ctx, hs[0], held)
	b := newTestService(t, ctx, hs[1], held)
	c := newTestService(t, ctx, hs[2], protocol.NoShards(testShards)) // an honest light publisher
	if err := mn.ConnectAllButSelf(); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "the topics to form", 10*time.Second, func() bool { return a.TopicPeers(shard) == 1 && c.TopicPeers(shard) == 2 })

	dev := devIn(shard)
	now := time.Now()
	var refs []protocol.Ref
	for i := range 6 {
		bd := protocol.SignBundle(dev, ms(now.Add(-time.Minute)), []byte{'k', 'p', byte(i)})
		for _, s := range []*testService{a, b} {
			if _, _, err := s.ing.IngestBundle(ctx, &bd, ingest.SourceHTTP); err != nil {
				t.Fatal(err)
			}
		}
		info, _ := b.ing.policy.ValidateBundle(&bd, now)
		refs = append(refs, info.Ref)
	}
	aKey, _ := nodeIdentity(t)
	claim := protocol.SignClaim(aKey, ms(now), pub(dev), refs[0])
	consume := protocol.SignConsume(dev, ms(now), []protocol.Ref{refs[1]})
	for _, s := range []*testService{a} { // a stores before publishing, as a node does
		if _, _, err := s.ing.IngestClaim(ctx, &claim, ingest.SourceHTTP); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.ing.IngestConsume(ctx, &consume, ingest.SourceHTTP); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.PublishClaim(ctx, &claim); err != nil {
		t.Fatal(err)
	}
	if err := a.PublishConsume(ctx, &consume); err != nil {
		t.Fatal(err)
	}
	oneTime := func(s *testService) int {
		counts, err := s.ing.store.ClaimCounts(ctx, pub(dev))
		if err != nil {
			t.Fatal(err)
		}
		return counts.OneTime
	}
	nodetest.WaitFor(t, "b to store the claim and apply the consume notice", 10*time.Second, func() bool {
		gone, _ := b.ing.store.Consumed(ctx, pub(dev), refs[1])
		return gone && oneTime(b) == 4
	})

	// a floods forged claim notices.
	for i := range 5 {
		forged := protocol.SignClaim(aKey, ms(now), pub(dev), refs[2+i%4])
		forged.Signature[i] ^= 1
		if err := a.PublishClaim(ctx, &forged); err != nil {
			t.Fatal(err)
		}
	}
	nodetest.WaitFor(t, "b to reject the forged notices and a's score to go negative", 10*time.Second, func() bool {
		return nodetest.Counter(t, b.reg, "kpnode_gossip_validations_total", "verdict", "reject") >= 3 && b.scores.of(hs[0].ID()) < 0
	})
	if got := oneTime(b); got != 4 {
		t.Fatalf("b has %d one-time bundles unclaimed after the forgeries, want 4", got)
	}
	// An honest peer's claim still goes through.
	cKey, _ := nodeIdentity(t)
	honest := protocol.SignClaim(cKey, ms(now), pub(dev), refs[2])
	if err := c.PublishClaim(ctx, &honest); err != nil {
		t.Fatal(err)
	}
	nodetest.WaitFor(t, "b to store the honest claim", 10*time.Second, func() bool { return oneTime(b) == 3 })
}
