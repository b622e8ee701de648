package pb

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"
)

// FuzzNoticeConversions: a gossip message with a claim or consume notice
// never makes the conversions panic; they accept exactly 32-byte keys and
// 64-byte signatures, and what they accept converts back to the same
// fields.
func FuzzNoticeConversions(f *testing.F) {
	for _, m := range []*GossipMessage{
		{Body: &GossipMessage_Claim{Claim: &ClaimNotice{NodeKey: make([]byte, 32), Payload: []byte("p"), Signature: make([]byte, 64)}}},
		{Body: &GossipMessage_Consume{Consume: &ConsumeNotice{DeviceId: make([]byte, 32), Payload: []byte("p"), Signature: make([]byte, 64)}}},
		{Body: &GossipMessage_Claim{Claim: &ClaimNotice{NodeKey: make([]byte, 31)}}},
	} {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		var m GossipMessage
		if proto.Unmarshal(data, &m) != nil {
			return
		}
		if c := m.GetClaim(); c != nil || m.GetConsume() == nil {
			n, err := ToClaim(c)
			if ok := c != nil && len(c.NodeKey) == 32 && len(c.Signature) == 64; (err == nil) != ok {
				t.Fatalf("ToClaim: %v", err)
			}
			if err == nil {
				back := FromClaim(n)
				if !bytes.Equal(back.NodeKey, c.NodeKey) || !bytes.Equal(back.Payload, c.Payload) || !bytes.Equal(back.Signature, c.Signature) {
					t.Fatal("claim notice does not convert back")
				}
			}
		}
		if c := m.GetConsume(); c != nil || m.GetClaim() == nil {
			n, err := ToConsume(c)
			if ok := c != nil && len(c.DeviceId) == 32 && len(c.Signature) == 64; (err == nil) != ok {
				t.Fatalf("ToConsume: %v", err)
			}
			if err == nil {
				back := FromConsume(n)
				if !bytes.Equal(back.DeviceId, c.DeviceId) || !bytes.Equal(back.Payload, c.Payload) || !bytes.Equal(back.Signature, c.Signature) {
					t.Fatal("consume notice does not convert back")
				}
			}
		}
	})
}
