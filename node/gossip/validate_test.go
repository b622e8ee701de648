package gossip

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

const testShards = protocol.DefaultShardCount

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// storeIngester is the node's ingest path on real parts: a protocol.Policy,
// then a real Badger store in a temporary directory.
type storeIngester struct {
	policy protocol.Policy
	store  *storage.Store
}

func newStoreIngester(t testing.TB, policy protocol.Policy, maxPerDevice int) *storeIngester {
	t.Helper()
	store := nodetest.OpenStore(t, storage.Options{MaxPerDevice: maxPerDevice, Logger: discard, ShardCount: testShards})
	return &storeIngester{policy: policy, store: store}
}

func (i *storeIngester) IngestBundle(ctx context.Context, b *protocol.Bundle, _ ingest.Source) (storage.PutOutcome, protocol.BundleInfo, error) {
	info, err := i.policy.ValidateBundle(b, time.Now())
	if err != nil {
		return 0, info, err
	}
	outcome, err := i.store.PutBundle(ctx, &storage.Bundle{Bundle: *b, BundleInfo: info})
	return outcome, info, err
}

func (i *storeIngester) IngestAccount(ctx context.Context, a *protocol.AccountBundle, rule storage.AccountRule, _ ingest.Source) (*storage.Account, storage.PutOutcome, error) {
	lamport, err := i.policy.ValidateAccount(a)
	if err != nil {
		return nil, 0, err
	}
	rec := &storage.Account{AccountBundle: *a, Lamport: lamport}
	outcome, err := i.store.PutAccount(ctx, rec, rule)
	if err != nil {
		return nil, 0, err
	}
	return rec, outcome, nil
}

func testPolicy(mode protocol.MLSMode) protocol.Policy {
	p := protocol.DefaultPolicy()
	p.MLS = mode
	return p
}

func devIn(shard int) ed25519.PrivateKey {
	for {
		pub, priv, _ := ed25519.GenerateKey(rand.Reader)
		if protocol.Shard(protocol.Key(pub), testShards) == shard {
			return priv
		}
	}
}

func bundleMsg(b protocol.Bundle) []byte {
	data, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: pb.FromBundle(&b)}})
	return data
}

func accountMsg(a protocol.AccountBundle) []byte {
	data, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Account{Account: pb.FromAccount(&a)}})
	return data
}

func ms(t time.Time) uint64 { return uint64(t.UnixMilli()) }

// The validators map each outcome of the real ingest path (policy, then a
// Badger store) to the verdict the spec's table gives it.
func TestGossipValidatorsMapEveryOutcome(t *testing.T) {
	ing := newStoreIngester(t, testPolicy(protocol.MLSOff), 2)
	self, other := peer.ID("self"), peer.ID("other")
	v := &validator{self: self, shards: testShards, ing: ing, log: discard}
	now := time.Now()
	ctx := context.Background()

	const shard = 3
	dev := devIn(shard)
	valid := protocol.SignBundle(dev, ms(now), []byte("kp-1"))
	forged := protocol.SignBundle(dev, ms(now), []byte("kp-2"))
	forged.Signature[0] ^= 1
	notPoint := protocol.SignBundle(dev, ms(now), []byte("kp-3"))
	for {
		rand.Read(notPoint.DeviceID[:])
		if protocol.Shard(notPoint.DeviceID, testShards) != shard {
			continue
		}
		if _, err := ing.policy.ValidateBundle(&notPoint, now); protocol.RuleOf(err) == protocol.RuleKeyNotPoint {
			break
		}
	}
	// Quota: two newer bundles fill the device; an older one is over quota.
	quotaDev := devIn(shard)
	newer1 := protocol.SignBundle(quotaDev, ms(now), []byte("new-1"))
	newer2 := protocol.SignBundle(quotaDev, ms(now.Add(-time.Second)), []byte("new-2"))
	older := protocol.SignBundle(quotaDev, ms(now.Add(-time.Hour)), []byte("old"))
	for _, b := range []*protocol.Bundle{&newer1, &newer2} {
		if _, _, err := ing.IngestBundle(ctx, b, ingest.SourceHTTP); err != nil {
			t.Fatal(err)
		}
	}
	wrongSizes, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: &pb.Bundle{DeviceId: make([]byte, 31), Signature: make([]byte, 64)}}})

	bundleCases := []struct {
		name string
		ctx  context.Context
		from peer.ID
		data []byte
		want pubsub.ValidationResult
	}{
		{"stored", ctx, other, bundleMsg(valid), pubsub.ValidationAccept},
		{"duplicate", ctx, other, bundleMsg(valid), pubsub.ValidationIgnore},
		{"refreshed (a newer timestamp for a known ref)", ctx, other, bundleMsg(protocol.SignBundle(dev, ms(now.Add(time.Second)), []byte("kp-1"))), pubsub.ValidationAccept},
		{"over quota (local --max-per-device)", ctx, other, bundleMsg(older), pubsub.ValidationIgnore},
		{"timestamp in the future (local clock)", ctx, other, bundleMsg(protocol.SignBundle(dev, ms(now.Add(time.Hour)), []byte("f"))), pubsub.ValidationIgnore},
		{"timestamp older than retention (local)", ctx, other, bundleMsg(protocol.SignBundle(dev, ms(now.Add(-40*24*time.Hour)), []byte("e"))), pubsub.ValidationIgnore},
		{"store failure (local)", canceled(), other, bundleMsg(protocol.SignBundle(devIn(shard), ms(now), []byte("c"))), pubsub.ValidationIgnore},
		{"own message", ctx, self, []byte("anything"), pubsub.ValidationAccept},
		{"forged signature", ctx, other, bundleMsg(forged), pubsub.ValidationReject},
		{"key not a point", ctx, other, bundleMsg(notPoint), pubsub.ValidationReject},
		{"payload too short", ctx, other, bundleMsg(protocol.Bundle{DeviceID: valid.DeviceID, Payload: []byte{1}, Signature: signed(dev, []byte{1})}), pubsub.ValidationReject},
		{"payload too large", ctx, other, bundleMsg(protocol.SignBundle(dev, ms(now), make([]byte, protocol.MaxPayloadSize))), pubsub.ValidationReject},
		{"device of another shard", ctx, other, bundleMsg(protocol.SignBundle(devIn(shard+1), ms(now), []byte("s"))), pubsub.ValidationReject},
		{"wrong sizes", ctx, other, wrongSizes, pubsub.ValidationReject},
		{"account on a bundle topic", ctx, other, accountMsg(protocol.SignAccount(dev, protocol.EncodeAccountPayload(1, nil))), pubsub.ValidationReject},
		{"undecodable", ctx, other, []byte{0xff, 0xff, 0xff}, pubsub.ValidationReject},
	}
	for _, tc := range bundleCases {
		if got := result(v.bundle(tc.ctx, shard, tc.from, tc.data)); got != tc.want {
			t.Errorf("bundle, %s: %v, want %v", tc.name, got, tc.want)
		}
	}

	acct := devIn(shard)
	v2 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil))
	v1 := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil))
	badSig := protocol.SignAccount(acct, protocol.EncodeAccountPayload(3, nil))
	badSig.Signature[5] ^= 1
	accountCases := []struct {
		name string
		data []byte
		want pubsub.ValidationResult
	}{
		{"stored", accountMsg(v2), pubsub.ValidationAccept},
		{"duplicate", accountMsg(v2), pubsub.ValidationIgnore},
		{"older lamport (stale)", accountMsg(v1), pubsub.ValidationIgnore},
		{"forged signature", accountMsg(badSig), pubsub.ValidationReject},
		{"header missing", accountMsg(protocol.AccountBundle{AccountPub: v2.AccountPub, Payload: []byte("x"), Signature: signed(acct, []byte("x"))}), pubsub.ValidationReject},
		{"payload too large", accountMsg(protocol.SignAccount(acct, append(protocol.EncodeAccountPayload(9, nil), make([]byte, protocol.MaxPayloadSize)...))), pubsub.ValidationReject},
		{"account of another shard", accountMsg(protocol.SignAccount(devIn(shard+1), protocol.EncodeAccountPayload(1, nil))), pubsub.ValidationReject},
		{"bundle on an account topic", bundleMsg(valid), pubsub.ValidationReject},
	}
	for _, tc := range accountCases {
		if got := result(v.account(ctx, shard, other, tc.data)); got != tc.want {
			t.Errorf("account, %s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Lifetimes are checked against the node's clock: an expired or not yet
// valid KeyPackage is Ignore; one whose lifetime is over the network's cap
// (a constant) is Reject.
func TestGossipValidatorMLSLifetimes(t *testing.T) {
	ing := newStoreIngester(t, testPolicy(protocol.MLSStrict), storage.DefaultMaxPerDevice)
	v := &validator{self: "self", shards: testShards, ing: ing, log: discard}
	now := time.Now()
	for _, tc := range []struct {
		name                string
		notBefore, notAfter time.Time
		want                pubsub.ValidationResult
	}{
		{"valid", now.Add(-time.Hour), now.Add(24 * time.Hour), pubsub.ValidationAccept},
		{"expired", now.Add(-48 * time.Hour), now.Add(-24 * time.Hour), pubsub.ValidationIgnore},
		{"not yet valid", now.Add(24 * time.Hour), now.Add(48 * time.Hour), pubsub.ValidationIgnore},
		{"lifetime over the cap", now.Add(-time.Hour), now.Add(365 * 24 * time.Hour), pubsub.ValidationReject},
	} {
		_, dev, _ := ed25519.GenerateKey(rand.Reader)
		kp, _, err := mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: dev, NotBefore: tc.notBefore, NotAfter: tc.notAfter})
		if err != nil {
			t.Fatal(err)
		}
		b := protocol.SignBundle(dev, uint64(now.UnixMilli()), kp)
		shard := protocol.Shard(b.DeviceID, testShards)
		if got := result(v.bundle(context.Background(), shard, "other", bundleMsg(b))); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// fixedIngester answers every record with the same result and remembers
// what it was asked.
type fixedIngester struct {
	outcome storage.PutOutcome
	err     error
	src     ingest.Source
	rule    storage.AccountRule
	calls   int
}

func (f *fixedIngester) IngestBundle(_ context.Context, _ *protocol.Bundle, src ingest.Source) (storage.PutOutcome, protocol.BundleInfo, error) {
	f.calls++
	f.src = src
	if f.err != nil {
		return 0, protocol.BundleInfo{}, f.err
	}
	return f.outcome, protocol.BundleInfo{}, nil
}

func (f *fixedIngester) IngestAccount(_ context.Context, a *protocol.AccountBundle, rule storage.AccountRule, src ingest.Source) (*storage.Account, storage.PutOutcome, error) {
	f.calls++
	f.src, f.rule = src, rule
	if f.err != nil {
		return nil, 0, f.err
	}
	return &storage.Account{AccountBundle: *a}, f.outcome, nil
}

// The validators decide nothing themselves: for a well-formed message of
// the topic's shard, the verdict is exactly ingest.VerdictOf of what the
// ingest path returned, for bundles (from gossip) and account bundles
// (from gossip, under the convergence rule).
func TestGossipValidatorVerdictIsVerdictOf(t *testing.T) {
	ve := func(r protocol.Rule) error { return &protocol.ValidationError{Rule: r, Field: "x", Detail: "y"} }
	const shard = 5
	dev := devIn(shard)
	b := bundleMsg(protocol.SignBundle(dev, ms(time.Now()), []byte("kp")))
	a := accountMsg(protocol.SignAccount(dev, protocol.EncodeAccountPayload(1, nil)))
	_, nodeKey, _ := ed25519.GenerateKey(rand.Reader)
	claim := claimMsg(protocol.SignClaim(nodeKey, ms(time.Now()), protocol.Key(dev.Public().(ed25519.PublicKey)), protocol.Ref{1}))
	consume := consumeMsg(protocol.SignConsume(dev, ms(time.Now()), []protocol.Ref{{1}}))
	for _, tc := range []struct {
		name    string
		outcome storage.PutOutcome
		err     error
		want    ingest.Verdict
	}{
		{"stored", storage.Stored, nil, ingest.Accept},
		{"refreshed", storage.Refreshed, nil, ingest.Accept},
		{"duplicate", storage.Duplicate, nil, ingest.Ignore},
		{"over quota", storage.OverQuota, nil, ingest.Ignore},
		{"signature", 0, ve(protocol.RuleSignature), ingest.Reject},
		{"timestamp_future", 0, ve(protocol.RuleTimestampFuture), ingest.Ignore},
		{"malformed", 0, fmt.Errorf("%w: x", protocol.ErrMalformed), ingest.Reject},
		{"stale", 0, storage.ErrStale, ingest.Ignore},
		{"store full", 0, fmt.Errorf("put: %w", storage.ErrStoreFull), ingest.Ignore},
		{"local failure", 0, errors.New("disk on fire"), ingest.Ignore},
		{"ref not held", 0, storage.ErrRefNotHeld, ingest.Ignore},
		{"consumed", 0, storage.ErrConsumed, ingest.Ignore},
		{"tombstone quota", 0, storage.ErrConsumeQuota, ingest.Ignore},
		{"notice rate", 0, ingest.ErrNoticeRate, ingest.Ignore},
		{"foreign_ref", 0, ve(protocol.RuleForeignRef), ingest.Reject},
		{"consume_foreign_ref", 0, ve(protocol.RuleConsumeForeignRef), ingest.Ignore},
	} {
		if want := ingest.VerdictOf(tc.outcome, tc.err); want != tc.want {
			t.Fatalf("%s: VerdictOf says %v, the table %v", tc.name, want, tc.want)
		}
		for _, kind := range []string{"bundle", "account", "claim", "consume"} {
			ing := &fixedIngester{outcome: tc.outcome, err: tc.err}
			v := &validator{self: "self", shards: testShards, ing: ing, log: discard}
			var got ingest.Verdict
			switch kind {
			case "bundle":
				got = v.bundle(context.Background(), shard, "other", b)
			case "claim":
				got = v.bundle(context.Background(), shard, "other", claim)
			case "consume":
				got = v.bundle(context.Background(), shard, "other", consume)
			default:
				got = v.account(context.Background(), shard, "other", a)
				if ing.rule != storage.AccountConverge {
					t.Errorf("%s, %s: account rule %v, want AccountConverge", tc.name, kind, ing.rule)
				}
			}
			if got != tc.want || ing.calls != 1 || ing.src != ingest.SourceGossip {
				t.Errorf("%s, %s: verdict %v after %d ingest calls from %q, want %v after 1 from gossip", tc.name, kind, got, ing.calls, ing.src, tc.want)
			}
		}
	}
}

// A validator that panics ignores the message and the node keeps running;
// every verdict is counted under its name.
func TestGossipValidatorGuard(t *testing.T) {
	m, reg := testMetrics(t)
	s := &Service{log: discard, metrics: m}
	msg := &pubsub.Message{}
	panics := s.guarded("t", func(context.Context, peer.ID, []byte) ingest.Verdict { panic("boom") })
	if got := panics(context.Background(), "p", msg); got != pubsub.ValidationIgnore {
		t.Errorf("panicking validator: %v, want ignore", got)
	}
	for _, v := range []ingest.Verdict{ingest.Accept, ingest.Reject, ingest.Reject} {
		if got, want := s.guarded("t", func(context.Context, peer.ID, []byte) ingest.Verdict { return v })(context.Background(), "p", msg), result(v); got != want {
			t.Errorf("%v: %v, want %v", v, got, want)
		}
	}
	for verdict, want := range map[string]float64{"accept": 1, "reject": 2, "ignore": 1} {
		if got := nodetest.Counter(t, reg, "kpnode_gossip_validations_total", "verdict", verdict); got != want {
			t.Errorf("kpnode_gossip_validations_total{verdict=%q} = %v, want %v", verdict, got, want)
		}
	}
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func signed(priv ed25519.PrivateKey, msg []byte) (sig [protocol.SignatureSize]byte) {
	copy(sig[:], ed25519.Sign(priv, msg))
	return sig
}

func (f *fixedIngester) IngestClaim(_ context.Context, _ *protocol.ClaimNotice, src ingest.Source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	f.calls++
	f.src = src
	return f.outcome, protocol.ClaimInfo{}, f.err
}

func (f *fixedIngester) IngestConsume(_ context.Context, _ *protocol.ConsumeNotice, src ingest.Source) (storage.PutOutcome, protocol.ConsumeInfo, error) {
	f.calls++
	f.src = src
	return f.outcome, protocol.ConsumeInfo{}, f.err
}

// IngestClaim is the node's claim path (node.ingestClaim): the policy,
// then the store, and under strict MLS a ref held under another device is
// rule foreign_ref.
func (i *storeIngester) IngestClaim(ctx context.Context, n *protocol.ClaimNotice, _ ingest.Source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	info, err := i.policy.ValidateClaim(n, time.Now())
	if err != nil {
		return 0, info, err
	}
	o, err := i.store.PutClaim(ctx, n, info)
	if errors.Is(err, storage.ErrForeignRef) && i.policy.MLS == protocol.MLSStrict {
		return 0, info, &protocol.ValidationError{Rule: protocol.RuleForeignRef, Field: "payload", Detail: "ref of another device", Err: err}
	}
	return o, info, err
}

func (i *storeIngester) IngestConsume(ctx context.Context, n *protocol.ConsumeNotice, _ ingest.Source) (storage.PutOutcome, protocol.ConsumeInfo, error) {
	info, err := i.policy.ValidateConsume(n, time.Now())
	if err != nil {
		return 0, info, err
	}
	o, err := i.store.PutConsume(ctx, n, info)
	return o, info, err
}
