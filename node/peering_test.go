package node

import (
	"testing"
	"time"
)

// TestShardPeeringBacksOff: a shard whose searches connect nobody is
// searched ever less often, urgent (no peer at all) or not, up to
// maxPeeringWait; a search that connects someone, or peers coming back,
// starts the backoff over. A lone holder (R = 1, or every other holder
// down) must not query the DHT every few seconds forever.
func TestShardPeeringBacksOff(t *testing.T) {
	var p shardPeering
	t0 := time.Unix(1_000_000, 0)
	searches := func(urgent bool, d time.Duration) int {
		k := 0
		for at := t0; at.Before(t0.Add(d)); at = at.Add(time.Second) {
			if p.begin(7, at, urgent) {
				k++
				p.end(7, at, urgent, 0)
			}
		}
		return k
	}
	// Urgent: 5 s, 10, 20, … 640 s, then every 600 s: about 12 in an hour
	// (720 without backoff).
	if k := searches(true, time.Hour); k < 8 || k > 16 {
		t.Fatalf("urgent searches connecting nobody for an hour: %d, want about 12", k)
	}
	if p.urgent[7] != maxPeeringWait {
		t.Fatalf("urgent wait %v after an hour of empty searches, want %v", p.urgent[7], maxPeeringWait)
	}
	// A search that connects someone resets both backoffs.
	at := t0.Add(2 * time.Hour)
	if !p.begin(7, at, true) {
		t.Fatal("a search after the backoff was refused")
	}
	p.end(7, at, true, 1)
	if p.urgent[7] != urgentPeeringWait || p.wait[7] != peeringInterval {
		t.Fatalf("after a search that connected: urgent %v, wait %v", p.urgent[7], p.wait[7])
	}
	if p.begin(7, at.Add(urgentPeeringWait-time.Second), true) {
		t.Fatal("an urgent search ran before urgentPeeringWait")
	}
	// Peers coming back (settled) forget the urgent backoff.
	p.urgent[7] = maxPeeringWait
	p.settled(7)
	if !p.begin(7, at.Add(urgentPeeringWait), true) {
		t.Fatal("after settled, an urgent search waited more than urgentPeeringWait")
	}
	p.end(7, at.Add(urgentPeeringWait), true, 0)
	// One search at a time per shard.
	var q shardPeering
	if !q.begin(1, t0, false) || q.begin(1, t0.Add(time.Hour), true) {
		t.Fatal("a second search of a shard started while one runs")
	}
	if !q.begin(2, t0, false) {
		t.Fatal("a search of another shard was refused")
	}
}
