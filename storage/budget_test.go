package storage

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"
)

// The store budget: when a bundle would take the store over MaxBytes,
// bundles whose KeyPackage lifetime has ended go first, then the oldest
// signed timestamps, never a bundle newer than the one stored; when no room
// can be made the put is ErrStoreFull, changes nothing, and reads go on.
func TestStoreBudgetEvictsInOrderThenRefuses(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	now := clk.Now().UnixMilli()
	sz := int64(bundleBytes(bundle(dev(0), 1, "kp0", false)))
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = clk.Now; o.MaxBytes = 5 * sz })
	ctx := context.Background()
	held := func(want ...int) {
		t.Helper()
		var got []int
		for d := 1; d <= 9; d++ {
			if _, err := s.LatestBundle(ctx, dev(byte(d))); err == nil {
				got = append(got, d)
			} else if !errors.Is(err, ErrNotFound) {
				t.Fatal(err)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("devices served %v, want %v", got, want)
		}
	}
	for d := 1; d <= 5; d++ {
		b := bundle(dev(byte(d)), uint64(now-int64(10-d)*1000), fmt.Sprint("kp", d), false)
		if d == 4 {
			b.NotAfterMS = now - 1000 // ended, held within the clock skew
		}
		mustPut(t, s, b, Stored)
	}
	if s.Bytes() != 5*sz {
		t.Fatalf("bytes %d, want %d", s.Bytes(), 5*sz)
	}
	held(1, 2, 3, 5)

	// (a) The ended KeyPackage goes first, although device 1 is older.
	mustPut(t, s, bundle(dev(6), uint64(now), "kp6", false), Stored)
	assertExact(t, s, Counts{Devices: 5, Bundles: 5})
	held(1, 2, 3, 5, 6)
	if c, _ := s.Bundles(ctx, dev(4)); len(c) != 0 {
		t.Fatal("the ended bundle is still held")
	}
	// (b) Then the oldest signed timestamp.
	mustPut(t, s, bundle(dev(7), uint64(now+1), "kp7", false), Stored)
	assertExact(t, s, Counts{Devices: 5, Bundles: 5})
	held(2, 3, 5, 6, 7)
	if s.Bytes() > s.MaxBytes() {
		t.Fatalf("bytes %d over the budget %d", s.Bytes(), s.MaxBytes())
	}

	// Never for a bundle older than all it would evict: ErrStoreFull, and
	// nothing changes.
	before := s.Bytes()
	_, err := s.PutBundle(ctx, bundle(dev(8), uint64(now-60_000), "kp8", false))
	if !errors.Is(err, ErrStoreFull) {
		t.Fatalf("put of an old bundle into a full store: %v, want ErrStoreFull", err)
	}
	assertExact(t, s, Counts{Devices: 5, Bundles: 5})
	if s.Bytes() != before {
		t.Fatalf("a refused put changed the byte count: %d -> %d", before, s.Bytes())
	}
	held(2, 3, 5, 6, 7)

	// A bundle whose KeyPackage has ended never evicts a usable one.
	ended := bundle(dev(9), uint64(now+2), "kp9", false)
	ended.NotAfterMS = now - 1
	if _, err := s.PutBundle(ctx, ended); !errors.Is(err, ErrStoreFull) {
		t.Fatalf("an ended bundle into a full store: %v, want ErrStoreFull", err)
	}
	held(2, 3, 5, 6, 7)

	// A device's own put at its quota frees its own bytes first: no eviction.
	mustPut(t, s, bundle(dev(7), uint64(now+1), "kp7", false), Duplicate)

	// An account makes room by evicting bundles (oldest first); accounts
	// themselves are never evicted.
	acct := account(dev(100), 1, 1)
	if _, err := s.PutAccount(ctx, acct, AccountConverge); err != nil {
		t.Fatal(err)
	}
	if as := accountBytes(acct); as <= sz || as > 2*sz {
		t.Fatalf("test assumes an account of 1-2 bundles' size, got %d vs %d", as, sz)
	}
	held(5, 6, 7) // devices 2 and 3, the oldest, made room
	assertExact(t, s, Counts{Devices: 3, Bundles: 3, Accounts: 1})
	if s.Bytes() > s.MaxBytes() {
		t.Fatalf("bytes %d over the budget %d", s.Bytes(), s.MaxBytes())
	}
}

// A store full of account bundles refuses a new one: they are never evicted.
func TestStoreBudgetNeverEvictsAccounts(t *testing.T) {
	sz := accountBytes(account(dev(1), 1, 1))
	s := openStore(t, t.TempDir(), func(o *Options) { o.MaxBytes = 2 * sz })
	ctx := context.Background()
	for i := byte(1); i <= 2; i++ {
		if _, err := s.PutAccount(ctx, account(dev(i), 1, 1), AccountConverge); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.PutAccount(ctx, account(dev(3), 1, 1), AccountConverge); !errors.Is(err, ErrStoreFull) {
		t.Fatalf("third account: %v, want ErrStoreFull", err)
	}
	// An update of a held account that does not grow it still fits.
	if _, err := s.PutAccount(ctx, account(dev(1), 2, 2), AccountConverge); err != nil {
		t.Fatalf("update in a full store: %v", err)
	}
	if _, err := s.PutBundle(ctx, bundle(dev(9), 1000, "kp", false)); !errors.Is(err, ErrStoreFull) {
		t.Fatalf("bundle into a store full of accounts: %v, want ErrStoreFull", err)
	}
	for i := byte(1); i <= 2; i++ {
		if _, err := s.Account(ctx, dev(i)); err != nil {
			t.Fatalf("read after ErrStoreFull: %v", err)
		}
	}
	assertExact(t, s, Counts{Accounts: 2})
}

// The byte count survives a reopen (recomputed from the r/ entries and the
// account values) and follows prunes.
func TestStoreBytesRecountedOnOpen(t *testing.T) {
	clk := &clock{now: time.UnixMilli(100 * 24 * 3600 * 1000)}
	dir := t.TempDir()
	s := openStore(t, dir, func(o *Options) { o.Now = clk.Now; o.Retention = time.Hour })
	ctx := context.Background()
	now := uint64(clk.Now().UnixMilli())
	var want int64
	for i := 0; i < 10; i++ {
		b := bundle(dev(byte(i%3)), now-uint64(i)*600_000, fmt.Sprint("kp-", i), i%2 == 0)
		mustPut(t, s, b, Stored)
		want += int64(bundleBytes(b))
	}
	a := account(dev(50), 1, 1)
	if _, err := s.PutAccount(ctx, a, AccountConverge); err != nil {
		t.Fatal(err)
	}
	want += accountBytes(a)
	if s.Bytes() != want {
		t.Fatalf("bytes %d, want %d", s.Bytes(), want)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, func(o *Options) { o.Now = clk.Now; o.Retention = time.Hour })
	if s.Bytes() != want {
		t.Fatalf("bytes after reopen %d, want %d", s.Bytes(), want)
	}
	if st, err := s.Prune(ctx); err != nil || st.Bundles != 3 { // older than the hour: 70, 80, 90 min
		t.Fatalf("prune: %+v %v", st, err)
	}
	assertExact(t, s, Counts{Devices: 3, Bundles: 7, Accounts: 1})
}

// A full disk is ErrStoreFull for the caller (the node answers 507).
func TestDiskFullIsErrStoreFull(t *testing.T) {
	err := mapWriteErr(fmt.Errorf("badger: write vlog: %w", syscall.ENOSPC))
	if !errors.Is(err, ErrStoreFull) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("mapped %v", err)
	}
	if err := mapWriteErr(errors.New("other")); errors.Is(err, ErrStoreFull) {
		t.Fatal("an unrelated error became ErrStoreFull")
	}
}
