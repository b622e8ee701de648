package storage

import (
	"context"
	"crypto/ed25519"
	"errors"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// RefClaim reads one ref as an owner answering a request that names it
// does: the bundle (unclaimed, then claimed with the winning notice and
// its info), and ErrNotFound for a ref not held, held under another
// device, consumed, or whose lifetime has ended.
func TestRefClaim(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(1_000_000_000_000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.ClockSkew = -1 })
	now := uint64(clk.Now().UnixMilli())
	a := dev(1)
	one, last, gone := bundle(a, now, "one", false), bundle(a, now+1, "last", true), bundle(a, now+2, "gone", false)
	ended := bundle(a, now+3, "ended", false)
	ended.NotAfterMS = int64(now) + 10
	for _, b := range []*Bundle{one, last, gone, ended} {
		mustPut(t, s, b, Stored)
	}
	b, n, _, err := s.RefClaim(ctx, a, one.Ref)
	if err != nil || b.Ref != one.Ref || b.Claimed || n != nil || b.LastResort {
		t.Fatalf("unclaimed: %+v, %v, %v", b, n, err)
	}
	if b, _, _, err := s.RefClaim(ctx, a, last.Ref); err != nil || !b.LastResort {
		t.Fatalf("last resort: %+v, %v", b, err)
	}
	mustClaim(t, s, nodeKey(2), now+200, a, one.Ref, Stored)
	mustClaim(t, s, nodeKey(3), now+100, a, one.Ref, Refreshed) // wins
	b, n, info, err := s.RefClaim(ctx, a, one.Ref)
	if err != nil || !b.Claimed || n == nil || n.NodeKey != protocol.Key(nodeKey(3).Public().(ed25519.PublicKey)) ||
		info.Ref != one.Ref || info.Hash != protocol.ClaimHash(n) {
		t.Fatalf("claimed: %+v, %+v, %+v, %v; want node 3's winning notice", b, n, info, err)
	}
	mustConsume(t, s, a, now, Stored, gone.Ref)
	clk.Advance(time.Second)
	for name, c := range map[string]struct {
		d   protocol.Key
		ref protocol.Ref
	}{"unknown": {a, protocol.Ref{9}}, "another device": {dev(2), one.Ref}, "consumed": {a, gone.Ref}, "ended": {a, ended.Ref}} {
		if _, _, _, err := s.RefClaim(ctx, c.d, c.ref); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: %v; want ErrNotFound", name, err)
		}
	}
}
