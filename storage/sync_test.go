package storage

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// The in-memory shard digests follow every put, refresh, eviction, account
// update and prune, and agree with a full scan and with a reopen.
func TestShardDigestsTrackEveryChange(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	dir := t.TempDir()
	s := openStore(t, dir, func(o *Options) { o.MaxPerDevice = 3; o.Now = clk.Now; o.Retention = time.Hour })
	ctx := context.Background()
	now := uint64(clk.Now().UnixMilli())
	for d := 0; d < 20; d++ {
		for i := 0; i < 5; i++ { // 5 per device with a quota of 3: evictions
			mustPutAny(t, s, bundle(dev(byte(d)), now-uint64(i)*1000, fmt.Sprint(d, "-", i), i == 0))
		}
		mustPutAny(t, s, bundle(dev(byte(d)), now+10, fmt.Sprint(d, "-", 1), false)) // a refresh
		if _, err := s.PutAccount(ctx, account(dev(byte(100+d)), 1, 1), AccountConverge); err != nil {
			t.Fatal(err)
		}
		if _, err := s.PutAccount(ctx, account(dev(byte(100+d)), 2, 1), AccountConverge); err != nil {
			t.Fatal(err)
		}
	}
	mustPutAny(t, s, bundle(dev(200), now-2*3600_000, "expired", false))
	if _, err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	check := func(s *Store) {
		t.Helper()
		for _, kind := range []SetKind{BundleSet, AccountSet} {
			total := uint64(0)
			for shard := 0; shard < protocol.DefaultShardCount; shard++ {
				live := s.ShardDigest(kind, shard)
				scanned, children, _, err := s.PrefixDigests(ctx, kind, shard, nil)
				if err != nil {
					t.Fatal(err)
				}
				if live.Fingerprint() != scanned.Fingerprint() {
					t.Fatalf("kind %d shard %d: live digest (%d items) differs from a scan (%d)", kind, shard, live.Count, scanned.Count)
				}
				var sum uint64
				for _, c := range children {
					sum += c.Count
				}
				if sum != scanned.Count {
					t.Fatalf("children hold %d of %d items", sum, scanned.Count)
				}
				total += live.Count
			}
			want := uint64(s.Counts().Bundles)
			if kind == AccountSet {
				want = uint64(s.Counts().Accounts)
			}
			if total != want {
				t.Fatalf("kind %d: digests count %d items, store holds %d", kind, total, want)
			}
		}
	}
	check(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	check(openStore(t, dir, func(o *Options) { o.Now = clk.Now }))
}

func mustPutAny(t *testing.T, s *Store, b *Bundle) {
	t.Helper()
	if _, err := s.PutBundle(context.Background(), b); err != nil {
		t.Fatal(err)
	}
}
