package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
)

// TestRealDiskFull fills a small filesystem named by KPNODE_TEST_SMALL_FS
// (e.g. a 48 MiB tmpfs: mount -t tmpfs -o size=48m tmpfs /mnt/x) and
// checks that writes fail with ErrStoreFull while reads go on. Skipped
// without it.
func TestRealDiskFull(t *testing.T) {
	root := os.Getenv("KPNODE_TEST_SMALL_FS")
	if root == "" {
		t.Skip("KPNODE_TEST_SMALL_FS not set")
	}
	dir, err := os.MkdirTemp(root, "store")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) }) // after the store's Close
	s := openStore(t, dir, func(o *Options) { o.MaxBytes = -1; o.MinFreeDisk = 8 << 20 })
	ctx := context.Background()
	kp := make([]byte, 60<<10)
	var stored int
	var full error
	for i := 0; i < 100000 && full == nil; i++ {
		b := bundle(dev(byte(i)), uint64(1000+i), fmt.Sprint(i), false)
		b.Payload = append(b.Payload, kp...)
		if _, err := s.PutBundle(ctx, b); err != nil {
			full = err
			break
		}
		stored++
	}
	t.Logf("stored %d bundles, then: %v", stored, full)
	if !errors.Is(full, ErrStoreFull) {
		t.Fatalf("write on a full disk: %v, want ErrStoreFull", full)
	}
	if _, err := s.LatestBundle(ctx, dev(0)); err != nil {
		t.Fatalf("read after the disk filled: %v", err)
	}
	want := s.Counts()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, func(o *Options) { o.MaxBytes = -1; o.MinFreeDisk = 8 << 20 })
	if got := s.Counts(); got != want || int(got.Bundles) != stored {
		t.Fatalf("after reopen %+v, want %+v", got, want)
	}
}

// Below the free-disk reserve, writes are ErrStoreFull and change nothing;
// reads go on; writes resume when space is back.
func TestFreeDiskReserveRefusesWrites(t *testing.T) {
	s := openStore(t, t.TempDir(), nil)
	ctx := context.Background()
	mustPut(t, s, bundle(dev(1), 1000, "kp", false), Stored)
	free := int64(1 << 20) // below the default reserve
	s.diskFree = func() (int64, error) { return free, nil }
	if _, err := s.PutBundle(ctx, bundle(dev(2), 1000, "kp2", false)); !errors.Is(err, ErrStoreFull) {
		t.Fatalf("put below the reserve: %v", err)
	}
	if _, err := s.PutAccount(ctx, account(dev(3), 1, 1), AccountConverge); !errors.Is(err, ErrStoreFull) {
		t.Fatalf("account put below the reserve: %v", err)
	}
	if _, err := s.LatestBundle(ctx, dev(1)); err != nil {
		t.Fatalf("read below the reserve: %v", err)
	}
	assertExact(t, s, Counts{Devices: 1, Bundles: 1})
	free = 10 << 30
	mustPut(t, s, bundle(dev(2), 1000, "kp2", false), Stored)
}
