package gossip

import (
	"context"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// FuzzGossipMessage: the gossip decoder and the record conversions never
// panic, and only accept exact key and signature sizes; the validators
// never panic either, and accept only a record of their topic's kind and
// shard.
func FuzzGossipMessage(f *testing.F) {
	seed, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: &pb.Bundle{
		DeviceId: make([]byte, 32), Payload: []byte("12345678kp"), Signature: make([]byte, 64)}}})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Account{Account: &pb.AccountBundle{
		AccountPub: make([]byte, 32), Payload: []byte("x"), Signature: make([]byte, 64), UpdatedAtMs: 1}}})
	f.Add(seed)
	f.Add([]byte{0xff, 0xff})
	seed, _ = proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Claim{Claim: &pb.ClaimNotice{
		NodeKey: make([]byte, 32), Payload: protocol.ClaimPayload(1, protocol.Key{}, protocol.Ref{}), Signature: make([]byte, 64)}}})
	f.Add(seed)
	seed, _ = proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Consume{Consume: &pb.ConsumeNotice{
		DeviceId: make([]byte, 32), Payload: protocol.ConsumePayload(1, []protocol.Ref{{}}), Signature: make([]byte, 64)}}})
	f.Add(seed)
	v := &validator{self: "self", shards: testShards, ing: &fixedIngester{outcome: storage.Stored}, log: discard}
	f.Fuzz(func(t *testing.T, data []byte) {
		const shard = 0
		bv := v.bundle(context.Background(), shard, "other", data)
		av := v.account(context.Background(), shard, "other", data)
		gm, err := decode(data)
		if err != nil {
			if bv != ingest.Reject || av != ingest.Reject {
				t.Fatalf("undecodable message: %v, %v", bv, av)
			}
			return
		}
		b, err := pb.ToBundle(gm.GetBundle())
		if err == nil {
			if len(gm.GetBundle().DeviceId) != 32 || len(gm.GetBundle().Signature) != 64 || b == nil {
				t.Fatal("accepted a bundle with wrong sizes")
			}
		}
		want := err == nil && protocol.Shard(b.DeviceID, testShards) == shard
		if c, err := pb.ToClaim(gm.GetClaim()); err == nil {
			if len(gm.GetClaim().NodeKey) != 32 || len(gm.GetClaim().Signature) != 64 {
				t.Fatal("accepted a claim notice with wrong sizes")
			}
			_, dev, _, lerr := protocol.DecodeClaimPayload(c.Payload)
			want = lerr == nil && protocol.Shard(dev, testShards) == shard
		}
		if c, err := pb.ToConsume(gm.GetConsume()); err == nil {
			if len(gm.GetConsume().DeviceId) != 32 || len(gm.GetConsume().Signature) != 64 {
				t.Fatal("accepted a consume notice with wrong sizes")
			}
			want = protocol.Shard(c.DeviceID, testShards) == shard
		}
		if (bv == ingest.Accept) != want {
			t.Fatalf("bundle topic's validator: %v, want accept %v", bv, want)
		}
		a, err := pb.ToAccount(gm.GetAccount())
		if err == nil {
			if len(gm.GetAccount().AccountPub) != 32 || len(gm.GetAccount().Signature) != 64 || a == nil {
				t.Fatal("accepted an account bundle with wrong sizes")
			}
		}
		if want := err == nil && protocol.Shard(a.AccountPub, testShards) == shard; (av == ingest.Accept) != want {
			t.Fatalf("account validator: %v, want accept %v", av, want)
		}
	})
}
