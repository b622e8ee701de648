package storage

import (
	"context"
	"os"
	"testing"
)

// TestOpenInMemory pins the in-memory mode: no Dir needed, nothing written
// to the working directory, records readable back, the free-disk check off.
func TestOpenInMemory(t *testing.T) {
	t.Chdir(t.TempDir())
	s := openStore(t, "", func(o *Options) { o.InMemory = true; o.MinFreeDisk = 1 << 62 })
	mustPut(t, s, bundle(dev(1), 1000, "kp1", false), Stored)
	got, err := s.Bundles(context.Background(), dev(1))
	if err != nil || len(got) != 1 {
		t.Fatalf("Bundles = %d, %v; want 1 bundle", len(got), err)
	}
	if c := s.Counts(); c.Bundles != 1 || c.Devices != 1 {
		t.Fatalf("Counts = %+v, want 1 bundle of 1 device", c)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(".")
	if err != nil || len(ents) != 0 {
		t.Fatalf("working dir holds %d entries (%v), want none", len(ents), err)
	}
}

func TestOptionsValidateInMemoryNeedsNoDir(t *testing.T) {
	o := Options{InMemory: true}
	o.setDefaults()
	if err := o.Validate(); err != nil {
		t.Fatalf("Validate() = %v, want nil", err)
	}
	o.InMemory = false
	if err := o.Validate(); err == nil {
		t.Fatal("Validate() without Dir nor InMemory = nil, want an error")
	}
}
