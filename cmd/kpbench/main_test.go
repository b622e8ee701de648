package main

import (
	"testing"
	"time"
)

// The benchmarks run end to end on a small scale (the figures themselves
// are not asserted: they are measurements, quoted from real runs).
func TestPropagationAndFetchRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts libp2p clusters")
	}
	if err := propagation([]string{"-nodes", "3", "-runs", "3"}); err != nil {
		t.Fatal(err)
	}
	if err := fetchRTT([]string{"-runs", "20"}); err != nil {
		t.Fatal(err)
	}
	if err := catchup([]string{"-missed", "50"}); err != nil {
		t.Fatal(err)
	}
}

func TestLocalBenchmarksRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts nodes")
	}
	if err := getBench([]string{"-requests", "200", "-clients", "4"}); err != nil {
		t.Fatal(err)
	}
	if err := ingestBench([]string{"-count", "20", "-clients", "4"}); err != nil {
		t.Fatal(err)
	}
	if err := memoryBench([]string{"-bundles", "50"}); err != nil {
		t.Fatal(err)
	}
	if err := lookupBench([]string{"-nodes", "4", "-runs", "3"}); err != nil {
		t.Fatal(err)
	}
}

func TestQuantile(t *testing.T) {
	ds := []time.Duration{5, 1, 4, 2, 3}
	if q := quantile(ds, 0.5); q != 3 {
		t.Fatalf("median %v", q)
	}
	if q := quantile(ds, 0.99); q != 5 {
		t.Fatalf("p99 %v", q)
	}
	if q := quantile(nil, 0.5); q != 0 {
		t.Fatalf("empty %v", q)
	}
}

// The claim scenario runs end to end on a small scale.
func TestClaimBenchRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("starts nodes")
	}
	if err := claimBench([]string{"-devices", "5", "-pool", "4", "-requesters", "10", "-runs", "5", "-duration", "2s", "-double-devices", "2"}); err != nil {
		t.Fatal(err)
	}
}
