package lookup

import (
	"errors"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/storage"
)

// A light node looked up a device's latest bundle b2 (floor raised to it);
// the device then consumed b2, so every honest holder serves b1 and the
// consume notice. The cache entry is dropped once a refresh brings the
// notice (b1 served from then on), and after a restart (empty cache, same
// floors) the floor of the consumed b2 no longer refuses b1.
func TestConsumedBundleLeavesTheLookup(t *testing.T) {
	w := newWorld(t, nil)
	honest := w.holder("honest")
	w.find.set(false, "honest")
	key := nodetest.SeedKey(40)
	now := time.Now()
	b1, b2 := bundleAt(key, now.Add(-time.Minute), "v1"), bundleAt(key, now, "v2")
	honest.putBundle(b2)
	if got, err := w.lookup.Bundle(t.Context(), b2.DeviceID); err != nil || string(got.Payload) != string(b2.Payload) {
		t.Fatalf("first lookup: %v", err)
	}
	honest.putBundle(b1) // b2 consumed: the holder's latest is b1 now
	honest.consume(key, now.Add(time.Second), b2)
	w.clock.Advance(2 * time.Minute) // past the cache refresh age
	// The stale hit starts a refresh; once it has brought the notice, the
	// lookup serves b1 and never b2 again.
	nodetest.WaitFor(t, "the lookup serves b1", 5*time.Second, func() bool {
		got, err := w.lookup.Bundle(t.Context(), b2.DeviceID)
		return err == nil && string(got.Payload) == string(b1.Payload)
	})
	for range 3 {
		if got, err := w.lookup.Bundle(t.Context(), b2.DeviceID); err != nil || string(got.Payload) != string(b1.Payload) {
			t.Fatalf("after the refresh: %v, %q; want b1", err, got.Payload)
		}
	}
	restarted := w.newLookup(nil)
	got, err := restarted.Bundle(t.Context(), b1.DeviceID)
	if err != nil || string(got.Payload) != string(b1.Payload) {
		t.Fatalf("after a restart: %v (want b1: the floor of the consumed b2 no longer applies)", err)
	}
}

// The floor of a consumed bundle is voided by the answer that carries the
// notice even when another holder's answer below it came first; a holder
// that has not heard of the consume and still serves the consumed bundle
// is refused; a device whose every bundle is consumed is a miss, not the
// consumed bundle from the cache.
func TestConsumedBundleIsNeverServed(t *testing.T) {
	w := newWorld(t, nil)
	release := make(chan struct{})
	lagging := w.holder("lagging")
	informed := w.delayed("informed", release)
	w.find.set(false, "lagging", "informed")
	key := nodetest.SeedKey(41)
	now := time.Now()
	b1, b2 := bundleAt(key, now.Add(-time.Minute), "v1"), bundleAt(key, now, "v2")
	lagging.putBundle(b2)
	informed.putBundle(b2)
	close(release)
	if got, err := w.lookup.Bundle(t.Context(), b2.DeviceID); err != nil || string(got.Payload) != string(b2.Payload) {
		t.Fatalf("first lookup: %v", err)
	}

	// A restarted node (floor b2, empty cache): the lagging holder still
	// serves b2, the informed one b1 with the notice consuming b2.
	informed.putBundle(b1)
	informed.consume(key, now.Add(time.Second), b2)
	restarted := w.newLookup(nil)
	got, err := restarted.Bundle(t.Context(), b1.DeviceID)
	if err != nil || string(got.Payload) != string(b1.Payload) {
		t.Fatalf("after the consume: %v; want b1, not the consumed b2", err)
	}
	if n := nodetest.Value(restarted.lookups.WithLabelValues("bundle", "refused_consumed")); n < 1 {
		t.Errorf("refused_consumed = %v; want the lagging holder's b2 refused", n)
	}

	// Every bundle consumed: the holders answer NOT_FOUND with the notices;
	// the cached b1 goes and the lookup is a miss.
	lagging.delete(b1.DeviceID)
	informed.delete(b1.DeviceID)
	informed.consume(key, now.Add(2*time.Second), b1)
	w.clock.Advance(2 * time.Minute)
	nodetest.WaitFor(t, "the lookup stops serving b1", 5*time.Second, func() bool {
		_, err := restarted.Bundle(t.Context(), b1.DeviceID)
		return errors.Is(err, storage.ErrNotFound)
	})
}

// BenchmarkBundleCacheHit measures a cache hit, with and without the
// tombstone check a hit makes (one store read).
func BenchmarkBundleCacheHit(b *testing.B) {
	for _, check := range []bool{false, true} {
		name := "no_tombstone_check"
		if check {
			name = "tombstone_check"
		}
		b.Run(name, func(b *testing.B) {
			w := newWorld(b, func(c *Config) {
				if !check {
					c.Consumed = nil
				}
			})
			h := w.holder("honest")
			w.find.set(false, "honest")
			bundle := bundleAt(nodetest.SeedKey(42), time.Now(), "v")
			h.putBundle(bundle)
			if _, err := w.lookup.Bundle(b.Context(), bundle.DeviceID); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := w.lookup.Bundle(b.Context(), bundle.DeviceID); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// The floor's bundle consumed, and the only notice of it carried by a
// NOT_FOUND answer that comes after the answer below the floor: that
// answer is accepted after all.
func TestConsumeNoticeInANotFoundAnswerVoidsTheFloor(t *testing.T) {
	w := newWorld(t, nil)
	first := w.holder("first")
	w.find.set(false, "first")
	key := nodetest.SeedKey(43)
	now := time.Now()
	b1, b2 := bundleAt(key, now.Add(-time.Minute), "v1"), bundleAt(key, now, "v2")
	first.putBundle(b2)
	if _, err := w.lookup.Bundle(t.Context(), b2.DeviceID); err != nil {
		t.Fatal(err)
	}
	// Restarted: "first" lags (serves b1, knows nothing of the consume);
	// "informed" answers later, NOT_FOUND, with the notice consuming b2.
	first.putBundle(b1)
	release := make(chan struct{})
	informed := w.delayed("informed", release)
	informed.consume(key, now.Add(time.Second), b2)
	w.find.set(false, "first", "informed")
	restarted := w.newLookup(nil)
	go func() {
		// Release "informed" once the lagging answer was refused (polled
		// with a deadline; the lookup's own timeout bounds the rest).
		defer close(release)
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if nodetest.Value(restarted.lookups.WithLabelValues("bundle", "refused_below_floor")) >= 1 {
				return
			}
		}
	}()
	got, err := restarted.Bundle(t.Context(), b1.DeviceID)
	if err != nil || string(got.Payload) != string(b1.Payload) {
		t.Fatalf("lookup: %v; want b1 (the floor of the consumed b2 is void)", err)
	}
}
