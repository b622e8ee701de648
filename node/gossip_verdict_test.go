package node

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// verdict: only proof of a malformed or forged record is Reject; whatever
// depends on this node's own policy, clock or state is Ignore. Pinned for
// every rule.
func TestVerdictOfEveryOutcome(t *testing.T) {
	ve := func(r protocol.Rule) error { return &protocol.ValidationError{Rule: r, Field: "x", Detail: "y"} }
	mlsRule := func(r mls.Rule) protocol.Rule { return protocol.RuleMLS + "_" + protocol.Rule(r) }
	for _, tc := range []struct {
		name string
		err  error
		want pubsub.ValidationResult
	}{
		{"accepted", nil, pubsub.ValidationAccept},
		// Proof against the record or its sender: the same on every node of
		// the network (its constants are in the topic name).
		{"payload_too_large", ve(protocol.RulePayloadTooLarge), pubsub.ValidationReject},
		{"key_not_point", ve(protocol.RuleKeyNotPoint), pubsub.ValidationReject},
		{"signature", ve(protocol.RuleSignature), pubsub.ValidationReject},
		{"payload_too_short", ve(protocol.RulePayloadTooShort), pubsub.ValidationReject},
		{"account_header", ve(protocol.RuleAccountHeader), pubsub.ValidationReject},
		{"mls (unclassified)", ve(protocol.RuleMLS), pubsub.ValidationReject},
		{"mls_malformed", ve(mlsRule(mls.RuleMalformed)), pubsub.ValidationReject},
		{"mls_non_minimal_length", ve(mlsRule(mls.RuleNonMinimalLength)), pubsub.ValidationReject},
		{"mls_trailing_bytes", ve(mlsRule(mls.RuleTrailingBytes)), pubsub.ValidationReject},
		{"mls_version", ve(mlsRule(mls.RuleVersion)), pubsub.ValidationReject},
		{"mls_cipher_suite", ve(mlsRule(mls.RuleCipherSuite)), pubsub.ValidationReject},
		{"mls_key_size", ve(mlsRule(mls.RuleKeySize)), pubsub.ValidationReject},
		{"mls_leaf_source", ve(mlsRule(mls.RuleLeafSource)), pubsub.ValidationReject},
		{"mls_signature_key", ve(mlsRule(mls.RuleSignatureKey)), pubsub.ValidationReject},
		{"mls_leaf_signature", ve(mlsRule(mls.RuleLeafSignature)), pubsub.ValidationReject},
		{"mls_keypackage_signature", ve(mlsRule(mls.RuleKeyPackageSignature)), pubsub.ValidationReject},
		{"mls_init_key_equals_encryption_key", ve(mlsRule(mls.RuleInitKeyReuse)), pubsub.ValidationReject},
		{"mls_lifetime_too_long (a network constant)", ve(mlsRule(mls.RuleLifetimeTooLong)), pubsub.ValidationReject},
		{"mls_credential", ve(mlsRule(mls.RuleCredential)), pubsub.ValidationReject},
		{"mls_unsupported_extension", ve(mlsRule(mls.RuleUnsupportedExtension)), pubsub.ValidationReject},
		{"malformed message", fmt.Errorf("%w: no bundle", errMalformed), pubsub.ValidationReject},
		{"wrapped rule", fmt.Errorf("bundle: %w", ve(protocol.RuleSignature)), pubsub.ValidationReject},
		// This node's clock and retention: Ignore.
		{"timestamp_future (clock skew)", ve(protocol.RuleTimestampFuture), pubsub.ValidationIgnore},
		{"timestamp_expired (retention)", ve(protocol.RuleTimestampExpired), pubsub.ValidationIgnore},
		{"mls_lifetime_not_yet_valid (clock)", ve(mlsRule(mls.RuleNotYetValid)), pubsub.ValidationIgnore},
		{"mls_lifetime_expired (clock)", ve(mlsRule(mls.RuleExpired)), pubsub.ValidationIgnore},
		// This node's state and failures: Ignore.
		{"stale account (tombstone or older lamport)", storage.ErrStale, pubsub.ValidationIgnore},
		{"store lookup miss", storage.ErrNotFound, pubsub.ValidationIgnore},
		{"store full (local --max-store-bytes or disk)", fmt.Errorf("put: %w", storage.ErrStoreFull), pubsub.ValidationIgnore},
		{"context cancelled", context.Canceled, pubsub.ValidationIgnore},
		{"deadline", context.DeadlineExceeded, pubsub.ValidationIgnore},
		{"disk full or any local error", errors.New("write: no space left on device"), pubsub.ValidationIgnore},
	} {
		if got := verdict(tc.err); got != tc.want {
			t.Errorf("%s: verdict %v, want %v", tc.name, got, tc.want)
		}
	}
}

// The validators map each outcome of a real node's ingest path to the
// verdict the spec's table gives it.
func TestGossipValidatorsMapEveryOutcome(t *testing.T) {
	n, _ := testNode(t, func(c *Config) { c.MaxPerDevice = 2 })
	g := n.gossip
	count := n.cfg.Shards.Count()
	self, other := n.PeerID(), peer.ID("other")
	now := time.Now()
	ctx := context.Background()

	devIn := func(shard int) ed25519.PrivateKey {
		for {
			pub, priv, _ := ed25519.GenerateKey(rand.Reader)
			if protocol.Shard(protocol.Key(pub), count) == shard {
				return priv
			}
		}
	}
	bundleMsg := func(b protocol.Bundle) []byte {
		data, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: pb.FromBundle(&b)}})
		return data
	}
	accountMsg := func(a protocol.AccountBundle) []byte {
		data, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Account{Account: pb.FromAccount(&a)}})
		return data
	}
	ms := func(t time.Time) uint64 { return uint64(t.UnixMilli()) }
	const shard = 3
	dev := devIn(shard)
	valid := protocol.SignBundle(dev, ms(now), []byte("kp-1"))
	forged := protocol.SignBundle(dev, ms(now), []byte("kp-2"))
	forged.Signature[0] ^= 1
	notPoint := protocol.SignBundle(dev, ms(now), []byte("kp-3"))
	for {
		rand.Read(notPoint.DeviceID[:])
		if protocol.Shard(notPoint.DeviceID, count) != shard {
			continue
		}
		if _, err := n.cfg.Policy.ValidateBundle(&notPoint, now); protocol.RuleOf(err) == protocol.RuleKeyNotPoint {
			break
		}
	}
	// Quota: two newer bundles fill the device; an older one is over quota.
	quotaDev := devIn(shard)
	newer1 := protocol.SignBundle(quotaDev, ms(now), []byte("new-1"))
	newer2 := protocol.SignBundle(quotaDev, ms(now.Add(-time.Second)), []byte("new-2"))
	older := protocol.SignBundle(quotaDev, ms(now.Add(-time.Hour)), []byte("old"))
	for _, b := range []*protocol.Bundle{&newer1, &newer2} {
		if err := n.SubmitBundle(ctx, b); err != nil {
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
	topic := protocol.BundleTopic(n.netID, shard)
	for _, tc := range bundleCases {
		m := &pubsub.Message{Message: &pubsubpb.Message{Data: tc.data, Topic: &topic}}
		if got := g.validateBundle(tc.ctx, self, shard, tc.from, m); got != tc.want {
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
	atopic := protocol.AccountTopic(n.netID, shard)
	for _, tc := range accountCases {
		m := &pubsub.Message{Message: &pubsubpb.Message{Data: tc.data, Topic: &atopic}}
		if got := g.validateAccount(ctx, self, shard, other, m); got != tc.want {
			t.Errorf("account, %s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Lifetimes are checked against the node's clock: an expired or not yet
// valid KeyPackage is Ignore; one whose lifetime is over the network's cap
// (a constant) is Reject.
func TestGossipValidatorMLSLifetimes(t *testing.T) {
	n, _ := testNode(t, func(c *Config) { c.Policy.MLS = protocol.MLSStrict })
	now := time.Now()
	count := n.cfg.Shards.Count()
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
		shard := protocol.Shard(b.DeviceID, count)
		data, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: pb.FromBundle(&b)}})
		topic := protocol.BundleTopic(n.netID, shard)
		m := &pubsub.Message{Message: &pubsubpb.Message{Data: data, Topic: &topic}}
		if got := n.gossip.validateBundle(context.Background(), n.PeerID(), shard, "other", m); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
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
