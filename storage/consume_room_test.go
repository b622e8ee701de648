package storage

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// Consume notices of minted devices naming refs nobody holds fill the
// consume share and are then refused, but evict no bundle; once the share
// is full, a device's consume of a bundle held here still deletes and
// tombstones it.
func TestJunkConsumesEvictNothingAndNeverBlockHonestConsume(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	now := uint64(clk.Now().UnixMilli())
	honest := dev(200)
	var held []*Bundle
	for i := 0; i < 20; i++ {
		held = append(held, bundle(honest, now+uint64(i), string(rune('a'+i))+"-kp", false))
	}
	total := int64(0)
	for _, b := range held {
		total += int64(bundleBytes(b))
	}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.MaxBytes = total + total/20 })
	for _, b := range held {
		mustPut(t, s, b, Stored)
	}
	junk := 0
	for i := 0; ; i++ {
		if i > 100000 {
			t.Fatal("junk consume notices never filled the consume share")
		}
		refs := make([]protocol.Ref, 2)
		for j := range refs {
			refs[j][0], refs[j][1], refs[j][2] = byte(i), byte(i>>8), byte(j)
		}
		n, info := consumeOf(dev(byte(i%100)+1), now, refs...)
		_, err := s.PutConsume(ctx, n, info)
		if errors.Is(err, ErrStoreFull) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		junk++
	}
	left, _, _ := s.BundlesUpTo(ctx, honest, 1<<30)
	if len(left) != len(held) {
		t.Fatalf("%d junk consume notices evicted %d of the honest device's %d bundles", junk, len(held)-len(left), len(held))
	}
	n, info := consumeOf(honest, now, left[0].Ref)
	if out, err := s.PutConsume(ctx, n, info); err != nil || out != Stored {
		t.Fatalf("honest consume of a held bundle with the consume share full: %v, %v; want Stored", out, err)
	}
	if c, err := s.Consumed(ctx, honest, left[0].Ref); err != nil || !c {
		t.Errorf("the honest consume's ref is not tombstoned: %v, %v", c, err)
	}
	after, _, _ := s.BundlesUpTo(ctx, honest, 1<<30)
	if len(after) != len(held)-1 {
		t.Errorf("after the honest consume %d bundles held, want %d", len(after), len(held)-1)
	}
	if _, err := s.PutBundle(ctx, left[0]); !errors.Is(err, ErrConsumed) {
		t.Errorf("the consumed bundle put again: %v, want ErrConsumed", err)
	}
}

// A device's tombstones for refs the store does not hold stop at
// MaxUnheldConsumedPerDevice: the refs over it are not tombstoned, while a
// held ref named in the same notice still is.
func TestUnheldTombstonesCappedPerDevice(t *testing.T) {
	ctx := context.Background()
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	now := uint64(clk.Now().UnixMilli())
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now })
	d := dev(7)
	b := bundle(d, now, "held-kp", false)
	mustPut(t, s, b, Stored)
	refAt := func(i int) protocol.Ref {
		var r protocol.Ref
		r[0], r[1], r[2] = 0xee, byte(i), byte(i>>8)
		return r
	}
	var first []protocol.Ref
	for i := range MaxUnheldConsumedPerDevice - 1 {
		first = append(first, refAt(i))
	}
	n, info := consumeOf(d, now, first...)
	if out, err := s.PutConsume(ctx, n, info); err != nil || out != Stored {
		t.Fatalf("first consume: %v, %v", out, err)
	}
	// Three more unheld refs (one fits under the cap) and the held one.
	n, info = consumeOf(d, now+1, refAt(1000), refAt(1001), refAt(1002), b.Ref)
	if out, err := s.PutConsume(ctx, n, info); err != nil || out != Stored {
		t.Fatalf("second consume: %v, %v", out, err)
	}
	for ref, want := range map[protocol.Ref]bool{refAt(1000): true, refAt(1001): false, refAt(1002): false, b.Ref: true} {
		if c, err := s.Consumed(ctx, d, ref); err != nil || c != want {
			t.Errorf("ref %x consumed %v (%v), want %v", ref[:3], c, err, want)
		}
	}
	if got, _, _ := s.BundlesUpTo(ctx, d, 1<<30); len(got) != 0 {
		t.Errorf("the held bundle survived its consume: %d held", len(got))
	}
	// A notice naming only refs not held, all past the cap, changes
	// nothing: OverQuota.
	n, info = consumeOf(d, now+2, refAt(2000), refAt(2001))
	if out, err := s.PutConsume(ctx, n, info); err != nil || out != OverQuota {
		t.Errorf("a notice of refs not held past the cap: %v, %v; want OverQuota", out, err)
	}
}
