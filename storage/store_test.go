package storage

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func openStore(t *testing.T, dir string, mutate func(*Options)) *Store {
	t.Helper()
	opts := Options{Dir: dir, NoSync: true}
	if mutate != nil {
		mutate(&opts)
	}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func dev(n byte) protocol.Key { var k protocol.Key; k[0] = n; k[31] = 0xd; return k }

func bundle(d protocol.Key, ts uint64, kp string, lastResort bool) *Bundle {
	b := &Bundle{Bundle: protocol.Bundle{DeviceID: d}, BundleInfo: protocol.BundleInfo{TimestampMS: ts, LastResort: lastResort, Ref: protocol.KeyPackageRef([]byte(kp))}}
	b.Payload = protocol.BundlePayload(ts, []byte(kp))
	b.Signature[0] = byte(ts)
	return b
}

func mustPut(t *testing.T, s *Store, b *Bundle, want PutOutcome) {
	t.Helper()
	got, err := s.PutBundle(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("PutBundle(ts=%d) = %v, want %v", b.TimestampMS, got, want)
	}
}

func latestTS(t *testing.T, s *Store, d protocol.Key) uint64 {
	t.Helper()
	b, err := s.LatestBundle(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	return b.TimestampMS
}

func TestLatestIsGreatestSignedTimestampNotArrival(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	d := dev(1)
	mustPut(t, s, bundle(d, 2000, "new", false), Stored)
	mustPut(t, s, bundle(d, 1000, "old", false), Stored)
	if got := latestTS(t, s, d); got != 2000 {
		t.Fatalf("latest = %d, want 2000 (an older bundle arriving later must not become latest)", got)
	}
	b, _ := s.LatestBundle(context.Background(), d)
	if string(b.Payload[8:]) != "new" {
		t.Fatalf("latest payload %q", b.Payload[8:])
	}
}

func TestLatestTieBreaksOnSmallerRef(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	d := dev(2)
	a, b := bundle(d, 5000, "kp-a", false), bundle(d, 5000, "kp-b", false)
	want := a.Ref
	if string(b.Ref[:]) < string(a.Ref[:]) {
		want = b.Ref
	}
	mustPut(t, s, a, Stored)
	mustPut(t, s, b, Stored)
	got, err := s.LatestBundle(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	if got.Ref != want {
		t.Fatalf("tie broken to %s, want the smaller ref %s", got.Ref, want)
	}
}

func TestLatestPrefersLastResort(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	d := dev(3)
	mustPut(t, s, bundle(d, 1000, "lr-old", true), Stored)
	mustPut(t, s, bundle(d, 1500, "lr-new", true), Stored)
	mustPut(t, s, bundle(d, 3000, "one-time", false), Stored)
	b, err := s.LatestBundle(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	if !b.LastResort || b.TimestampMS != 1500 {
		t.Fatalf("got ts=%d lastResort=%v, want the latest last-resort bundle (1500)", b.TimestampMS, b.LastResort)
	}
}

func TestSameRefKeepsNewerTimestamp(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	d := dev(4)
	mustPut(t, s, bundle(d, 2000, "kp", false), Stored)
	mustPut(t, s, bundle(d, 2000, "kp", false), Duplicate)
	mustPut(t, s, bundle(d, 1000, "kp", false), Duplicate) // replay of an older signing
	mustPut(t, s, bundle(d, 3000, "kp", false), Refreshed)
	all, err := s.Bundles(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].TimestampMS != 3000 {
		t.Fatalf("held %d bundles, first ts %d; want one at 3000", len(all), all[0].TimestampMS)
	}
	if c := s.Counts(); c.Bundles != 1 || c.Devices != 1 {
		t.Fatalf("counts %+v", c)
	}
}

func TestMaxPerDeviceKeepsNewest(t *testing.T) {
	s := openStore(t, t.TempDir(), func(o *Options) { o.MaxPerDevice = 3 })
	d := dev(5)
	for ts := uint64(1); ts <= 5; ts++ {
		mustPut(t, s, bundle(d, ts*1000, fmt.Sprint("kp", ts), false), Stored)
	}
	mustPut(t, s, bundle(d, 500, "ancient", false), OverQuota)
	all, err := s.Bundles(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	for _, b := range all {
		got = append(got, b.TimestampMS)
	}
	if fmt.Sprint(got) != "[5000 4000 3000]" {
		t.Fatalf("kept %v, want [5000 4000 3000]", got)
	}
	if c := s.Counts(); c.Bundles != 3 {
		t.Fatalf("bundle count %d, want 3", c.Bundles)
	}
	// An evicted ref may come back if it is newer than the oldest kept.
	mustPut(t, s, bundle(d, 4500, "kp1", false), Stored)
	if c := s.Counts(); c.Bundles != 3 {
		t.Fatalf("bundle count %d after re-add, want 3", c.Bundles)
	}
}

func TestNotFound(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	if _, err := s.LatestBundle(context.Background(), dev(9)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("LatestBundle: %v", err)
	}
	if _, err := s.Account(context.Background(), dev(9)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Account: %v", err)
	}
}

func account(k protocol.Key, lamport uint64, extra byte) *Account {
	p := protocol.EncodeAccountPayload(lamport, []protocol.Key{{extra}})
	return &Account{AccountBundle: protocol.AccountBundle{AccountPub: k, Payload: p}, Lamport: lamport}
}

func TestAccountMustIncrease(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	ctx := context.Background()
	k := dev(6)
	if _, err := s.PutAccount(ctx, account(k, 0, 1), AccountMustIncrease); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutAccount(ctx, account(k, 1, 2), AccountMustIncrease); err != nil {
		t.Fatal(err)
	}
	for _, l := range []uint64{0, 1} {
		if _, err := s.PutAccount(ctx, account(k, l, 3), AccountMustIncrease); !errors.Is(err, ErrStale) {
			t.Fatalf("lamport %d: err %v, want ErrStale", l, err)
		}
	}
	a, err := s.Account(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if a.Lamport != 1 || a.UpdatedAtMS == 0 {
		t.Fatalf("stored lamport %d updated_at %d", a.Lamport, a.UpdatedAtMS)
	}
}

func TestAccountConvergesOnSmallerHashAtEqualLamport(t *testing.T) {
	ctx := context.Background()
	x, y := account(dev(7), 4, 1), account(dev(7), 4, 2)
	hx, hy := sha256.Sum256(x.Payload), sha256.Sum256(y.Payload)
	winner := x
	if string(hy[:]) < string(hx[:]) {
		winner = y
	}
	for _, order := range [][2]*Account{{x, y}, {y, x}} {
		s := openStore(t, t.TempDir(), nil)
		for _, a := range order {
			c := *a
			if _, err := s.PutAccount(ctx, &c, AccountConverge); err != nil && !errors.Is(err, ErrStale) {
				t.Fatal(err)
			}
		}
		got, err := s.Account(ctx, dev(7))
		if err != nil {
			t.Fatal(err)
		}
		if string(got.Payload) != string(winner.Payload) {
			t.Fatal("nodes seeing the two bundles in different orders did not converge")
		}
		c := *winner
		if out, err := s.PutAccount(ctx, &c, AccountConverge); err != nil || out != Duplicate {
			t.Fatalf("re-put of the held bundle: %v %v", out, err)
		}
	}
}

func TestPruneByRetention(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.Retention = time.Hour })
	ctx := context.Background()
	now := uint64(clk.Now().UnixMilli())
	old, fresh := dev(1), dev(2)
	mustPut(t, s, bundle(old, now-2*3600_000, "old", false), Stored)
	mustPut(t, s, bundle(fresh, now-2*3600_000, "old", false), Stored)
	mustPut(t, s, bundle(fresh, now, "fresh", false), Stored)
	if _, err := s.PutAccount(ctx, account(dev(3), 1, 1), AccountMustIncrease); err != nil {
		t.Fatal(err)
	}
	// A replay of the old bundle does not extend its life.
	mustPut(t, s, bundle(old, now-2*3600_000, "old", false), Duplicate)

	st, err := s.Prune(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Bundles != 2 || st.Accounts != 0 {
		t.Fatalf("pruned %+v, want 2 bundles and no account", st)
	}
	if _, err := s.LatestBundle(ctx, old); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired device still served: %v", err)
	}
	if got := latestTS(t, s, fresh); got != now {
		t.Fatalf("fresh device latest %d", got)
	}
	if c := s.Counts(); c != (Counts{Devices: 1, Bundles: 1, Accounts: 1}) {
		t.Fatalf("counts after prune %+v", c)
	}
	clk.Advance(2 * time.Hour)
	if st, err = s.Prune(ctx); err != nil || st.Accounts != 1 || st.Bundles != 1 {
		t.Fatalf("second prune %+v %v", st, err)
	}
	// The pruned ref can be stored again when signed anew.
	mustPut(t, s, bundle(old, uint64(clk.Now().UnixMilli()), "old", false), Stored)
}

func TestDataSurvivesReopen(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s := openStore(t, dir, func(o *Options) { o.NoSync = false })
	mustPut(t, s, bundle(dev(1), 1000, "a", true), Stored)
	mustPut(t, s, bundle(dev(1), 2000, "b", false), Stored)
	mustPut(t, s, bundle(dev(2), 1000, "c", false), Stored)
	if _, err := s.PutAccount(ctx, account(dev(3), 7, 1), AccountMustIncrease); err != nil {
		t.Fatal(err)
	}
	want := s.Counts()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, dir, nil)
	if got := s2.Counts(); got != want || want != (Counts{Devices: 2, Bundles: 3, Accounts: 1}) {
		t.Fatalf("counts after reopen %+v, before %+v", got, want)
	}
	if b, err := s2.LatestBundle(ctx, dev(1)); err != nil || !b.LastResort || string(b.Payload[8:]) != "a" {
		t.Fatalf("latest after reopen: %+v %v", b, err)
	}
	if a, err := s2.Account(ctx, dev(3)); err != nil || a.Lamport != 7 {
		t.Fatalf("account after reopen: %+v %v", a, err)
	}
}

func TestConcurrentPutsKeepCountsExact(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.MaxPerDevice = 10; o.Now = clk.Now; o.Retention = time.Hour })
	// Expired bundles on the same devices, pruned while the puts run.
	for i := 0; i < 20; i++ {
		mustPutAny(t, s, bundle(dev(byte(i%4)), uint64(clk.Now().Add(-2*time.Hour).UnixMilli())+uint64(i), fmt.Sprint("old", i), false))
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 5; i++ {
			if _, err := s.Prune(context.Background()); err != nil {
				t.Error(err)
			}
		}
	}()
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				d := dev(byte(i % 4))
				b := bundle(d, uint64(clk.Now().UnixMilli())+uint64(i*8+w), fmt.Sprintf("w%d-%d", w, i%20), false)
				if _, err := s.PutBundle(context.Background(), b); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got := s.Counts()
	var live []protocol.Digest
	for shard := 0; shard < protocol.DefaultShardCount; shard++ {
		live = append(live, s.ShardDigest(BundleSet, shard))
	}
	if err := s.recount(); err != nil {
		t.Fatal(err)
	}
	if want := s.Counts(); got != want {
		t.Fatalf("live counts %+v drifted from a recount %+v", got, want)
	}
	for shard, d := range live {
		if d.Fingerprint() != s.ShardDigest(BundleSet, shard).Fingerprint() {
			t.Fatalf("shard %d: live digest drifted from a recount", shard)
		}
	}
	if got.Devices != 4 || got.Bundles != 40 {
		t.Fatalf("counts %+v, want 4 devices with 10 bundles each", got)
	}
}

func TestStartAndCloseAreIdempotent(t *testing.T) {
	s, err := Open(Options{Dir: t.TempDir(), NoSync: true, PruneInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.Start(ctx)
	s.Start(ctx)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutBundle(context.Background(), bundle(dev(1), 1, "x", false)); err == nil {
		t.Fatal("put after close succeeded")
	}
}

func TestOptionsValidate(t *testing.T) {
	if _, err := Open(Options{}); err == nil {
		t.Fatal("Open without Dir succeeded")
	}
	if _, err := Open(Options{Dir: t.TempDir(), MaxPerDevice: -1}); err == nil {
		t.Fatal("negative MaxPerDevice accepted")
	}
}

// A burst of concurrent writes to one device (a device publishing its
// one-time KeyPackages through many gossip validators at once) all succeed.
func TestBurstToOneDeviceNeverFails(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.PutBundle(context.Background(), bundle(dev(1), uint64(1000+i), fmt.Sprint("kp", i), false)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if c := s.Counts(); c.Bundles != DefaultMaxPerDevice {
		t.Fatalf("held %d bundles, want the newest %d", c.Bundles, DefaultMaxPerDevice)
	}
}

// An account pruned here is not revived by a peer that still holds the same
// version; a newer lamport revives it; the tombstone ends after a retention.
func TestPrunedAccountLeavesATombstone(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.Retention = time.Hour })
	ctx := context.Background()
	k := dev(5)
	if _, err := s.PutAccount(ctx, account(k, 3, 1), AccountConverge); err != nil {
		t.Fatal(err)
	}
	clk.Advance(2 * time.Hour)
	if st, err := s.Prune(ctx); err != nil || st.Accounts != 1 {
		t.Fatalf("prune: %+v %v", st, err)
	}
	for _, rule := range []AccountRule{AccountConverge, AccountMustIncrease} {
		if _, err := s.PutAccount(ctx, account(k, 3, 1), rule); !errors.Is(err, ErrStale) {
			t.Fatalf("rule %d: the pruned version came back: %v", rule, err)
		}
	}
	clk.Advance(2 * time.Hour)
	if _, err := s.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutAccount(ctx, account(k, 3, 1), AccountConverge); err != nil {
		t.Fatalf("after the tombstone's time: %v", err)
	}
	clk.Advance(2 * time.Hour)
	s.Prune(ctx)
	if _, err := s.PutAccount(ctx, account(k, 4, 1), AccountConverge); err != nil {
		t.Fatalf("a newer lamport must revive a pruned account: %v", err)
	}
}
