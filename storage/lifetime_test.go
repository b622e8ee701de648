package storage

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// Issue 7, problem 6: a KeyPackage whose MLS lifetime has ended was still
// served as latest, and offered by sync, until the retention. It is now
// left out at once, and pruned once ClockSkew has passed.
func TestEndedKeyPackageIsNotServedThenPruned(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now })
	ctx := context.Background()
	now := clk.Now().UnixMilli()
	d := dev(1)
	withEnd := func(b *Bundle, end time.Duration) *Bundle { b.NotAfterMS = now + end.Milliseconds(); return b }
	lr := withEnd(bundle(d, uint64(now-3000), "lr", true), 10*time.Minute)
	soon := withEnd(bundle(d, uint64(now-1000), "soon", false), 10*time.Minute)
	later := withEnd(bundle(d, uint64(now-2000), "later", false), time.Hour)
	opaque := bundle(d, uint64(now-5000), "opaque", false) // no lifetime: --mls-validation=off
	for _, b := range []*Bundle{lr, soon, later, opaque} {
		mustPut(t, s, b, Stored)
	}
	if b, err := s.LatestBundle(ctx, d); err != nil || b.Ref != lr.Ref || b.NotAfterMS != lr.NotAfterMS {
		t.Fatalf("latest before the end: %+v %v", b, err)
	}
	shard := protocol.Shard(d, s.opts.ShardCount)
	allIDs := map[uint64]bool{}
	for _, b := range []*Bundle{lr, soon, later, opaque} {
		allIDs[protocol.ItemID(protocol.BundleItem(d, b.TimestampMS, b.Ref))] = true
	}

	clk.Advance(11 * time.Minute) // lr and soon have ended
	b, err := s.LatestBundle(ctx, d)
	if err != nil || b.Ref != later.Ref {
		t.Fatalf("latest after lr and soon ended: %+v %v, want the newest usable one", b, err)
	}
	if got, want := heldTS(t, s, d), fmtTS(later, opaque); got != want {
		t.Fatalf("Bundles serves %s, want only the usable ones %s", got, want)
	}
	synced, err := s.BundlesByID(ctx, shard, nil, allIDs)
	if err != nil || len(synced) != 2 {
		t.Fatalf("sync offers %d bundles (%v), want the 2 usable ones", len(synced), err)
	}
	for _, b := range synced {
		if b.Ref == lr.Ref || b.Ref == soon.Ref {
			t.Fatal("sync offers a bundle whose KeyPackage lifetime ended")
		}
	}
	// Held (not pruned) while a peer's validation may still accept it, so
	// it is a duplicate, not new, if a peer sends it.
	if st, err := s.Prune(ctx); err != nil || st.LifetimeEnded != 0 {
		t.Fatalf("prune within the skew: %+v %v", st, err)
	}
	mustPut(t, s, soon, Duplicate)
	if c := s.Counts(); c.Bundles != 4 {
		t.Fatalf("held %d bundles within the skew, want 4", c.Bundles)
	}

	clk.Advance(5 * time.Minute) // past the end plus the 5 min skew
	if st, err := s.Prune(ctx); err != nil || st.LifetimeEnded != 2 || st.Bundles != 0 {
		t.Fatalf("prune after the skew: %+v %v", st, err)
	}
	assertExact(t, s, Counts{Devices: 1, Bundles: 2})
	want, _ := wantDigests([]*Bundle{later, opaque}, nil, s.opts.ShardCount)
	if got := s.ShardDigest(BundleSet, shard); got.Fingerprint() != want[shard].Fingerprint() {
		t.Fatalf("shard digest holds %d items, want %d", got.Count, want[shard].Count)
	}

	clk.Advance(time.Hour) // later has ended too; opaque never ends by lifetime
	if b, err := s.LatestBundle(ctx, d); err != nil || b.Ref != opaque.Ref {
		t.Fatalf("latest: %+v %v, want the bundle without a lifetime", b, err)
	}
	clk.Advance(10 * time.Minute)
	if n, err := s.pruneLifetimes(ctx); err != nil || n != 1 {
		t.Fatalf("lifetime prune: %d %v", n, err)
	}
	mustPut(t, s, withEnd(bundle(d, uint64(now), "gone", true), 0), Stored)
	if b, err := s.LatestBundle(ctx, d); err != nil || b.Ref != opaque.Ref {
		t.Fatalf("an ended last-resort bundle was preferred: %+v %v", b, err)
	}
}

func fmtTS(bs ...*Bundle) string {
	var ts []uint64
	for _, b := range bs {
		ts = append(ts, b.TimestampMS)
	}
	return fmt.Sprint(ts)
}

// A device whose every bundle has ended is not found; the store's own loop
// prunes the bundles every LifetimePruneInterval.
func TestLifetimePruneLoop(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	s := openStore(t, t.TempDir(), func(o *Options) {
		o.Now = clk.Now
		o.LifetimePruneInterval = 5 * time.Millisecond
		o.PruneInterval = time.Hour
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.Start(ctx)
	d := dev(2)
	b := bundle(d, uint64(clk.Now().UnixMilli()), "kp", false)
	b.NotAfterMS = clk.Now().UnixMilli()
	mustPut(t, s, b, Stored)
	clk.Advance(time.Second)
	if _, err := s.LatestBundle(ctx, d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("latest of a device whose only bundle ended: %v", err)
	}
	clk.Advance(protocol.DefaultClockSkew)
	deadline := time.Now().Add(5 * time.Second)
	for s.Counts().Bundles != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the prune loop did not remove the ended bundle")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if c := s.Counts(); c != (Counts{}) {
		t.Fatalf("counts %+v", c)
	}
}
