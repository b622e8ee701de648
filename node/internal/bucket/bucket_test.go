package bucket

import (
	"testing"
	"time"
)

// A bucket lets its burst through at once, then its rate; keys are
// independent; Give returns what a take did not use; a forgotten key
// starts full; a clock stepping back refills nothing.
func TestKeyed(t *testing.T) {
	now := time.Unix(1000, 0)
	k := New[string](2, 2, 3, func() time.Time { return now })
	for i := range 3 {
		if !k.Take("a", 1) {
			t.Fatalf("take %d of the burst refused", i+1)
		}
	}
	if k.Take("a", 1) {
		t.Fatal("a take over the burst passed")
	}
	if !k.Take("b", 3) {
		t.Fatal("another key shares a's bucket")
	}
	now = now.Add(500 * time.Millisecond) // one token back at 2/s
	if !k.Take("a", 1) || k.Take("a", 1) {
		t.Fatal("half a second at 2/s should give back exactly one token")
	}
	k.Give("a", 1)
	if !k.Take("a", 1) {
		t.Fatal("a token given back was not there")
	}
	now = now.Add(-time.Hour)
	if k.Take("a", 1) {
		t.Fatal("a clock stepping back refilled the bucket")
	}
	k.Take("c", 1) // a third key: "b" (least recently used) is forgotten
	if !k.Take("b", 3) {
		t.Fatal("a forgotten key should start with a full bucket")
	}
}
