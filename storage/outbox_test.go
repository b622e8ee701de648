package storage

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/kpnode/kpnode/protocol"
)

// The outbox on disk: entries survive reopening, are deduplicated, come
// back due in order, and leave when removed.
func TestOutboxStore(t *testing.T) {
	dir := t.TempDir()
	open := func() *Store {
		s, err := Open(Options{Dir: dir, NoSync: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ctx := context.Background()
	s := open()
	o, err := s.OpenOutbox(ctx, 3, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var entries []*OutboxEntry
	for i := range 3 {
		e := &OutboxEntry{Kind: OutboxAccount, Payload: []byte{byte(i)}, UpdatedAtMS: int64(i), NextAttemptMS: 100}
		e.Key[0], e.Signature[0] = byte(i), byte(i)
		if err := o.Add(ctx, e); err != nil {
			t.Fatal(err)
		}
		entries = append(entries, e)
	}
	dup := *entries[1]
	if err := o.Add(ctx, &dup); err != nil || dup.Seq != entries[1].Seq || o.Len() != 3 {
		t.Fatalf("duplicate: %v seq %d len %d", err, dup.Seq, o.Len())
	}
	extra := &OutboxEntry{Kind: OutboxBundle}
	extra.Key[0] = 9
	if err := o.Add(ctx, extra); !errors.Is(err, ErrOutboxFull) {
		t.Fatalf("add to a full outbox: %v", err)
	}
	if err := o.Reschedule(ctx, entries[0].Seq, 4, 500); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s = open()
	defer s.Close()
	if o, err = s.OpenOutbox(ctx, 3, 1<<20); err != nil {
		t.Fatal(err)
	}
	due, next, err := o.Due(ctx, 200, 10, nil)
	if err != nil || len(due) != 2 || next != 500 {
		t.Fatalf("due: %d entries, next %d, err %v", len(due), next, err)
	}
	if due[0].Seq != entries[1].Seq || !bytes.Equal(due[1].Payload, []byte{2}) || due[1].UpdatedAtMS != 2 {
		t.Fatalf("due entries %+v %+v", due[0], due[1])
	}
	due, _, _ = o.Due(ctx, 600, 10, func(_ OutboxKind, k protocol.Key) bool { return k[0] == 1 })
	if len(due) != 2 || due[0].Attempts != 4 {
		t.Fatalf("due with skip: %d entries", len(due))
	}
	for _, e := range entries {
		if err := o.Remove(ctx, e.Seq); err != nil {
			t.Fatal(err)
		}
	}
	if o.Len() != 0 {
		t.Fatalf("len %d after removing all", o.Len())
	}
	big := &OutboxEntry{Kind: OutboxBundle, Payload: make([]byte, 1<<20)}
	if err := o.Add(ctx, big); !errors.Is(err, ErrOutboxFull) {
		t.Fatalf("add over the byte budget: %v", err)
	}
	if err := o.Add(ctx, extra); err != nil || extra.Seq != entries[2].Seq+1 {
		t.Fatalf("add after removal: %v seq %d", err, extra.Seq)
	}
}

func FuzzDecodeOutboxValue(f *testing.F) {
	e := &OutboxEntry{Kind: OutboxBundle, Payload: []byte("payload"), Attempts: 3, NextAttemptMS: 7, UpdatedAtMS: 9}
	f.Add(encodeOutboxValue(e))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, v []byte) {
		var e OutboxEntry
		if err := decodeOutboxValue(&e, v); err != nil {
			return
		}
		if !bytes.Equal(encodeOutboxValue(&e), v) {
			t.Fatalf("%x does not round-trip", v)
		}
	})
}

func FuzzDecodeFloor(f *testing.F) {
	f.Add(byte(FloorBundle), encodeFloor(FloorBundle, Floor{LastResort: true, TimestampMS: 5, UntilMS: 9}))
	f.Add(byte(FloorAccount), encodeFloor(FloorAccount, Floor{Lamport: 5, UntilMS: 9}))
	f.Fuzz(func(t *testing.T, kind byte, v []byte) {
		k := FloorKind(kind)
		fl, err := decodeFloor(k, v)
		if err != nil {
			return
		}
		if v[1]&^flagLastResort != 0 || (k != FloorBundle && fl.LastResort) {
			return // flags this version does not write
		}
		if k != FloorBundle {
			k = FloorAccount
		}
		if !bytes.Equal(encodeFloor(k, fl), v) {
			t.Fatalf("%x does not round-trip", v)
		}
	})
}

// A consume notice's entry survives reopening with its kind and bytes; a
// kind the outbox does not know is refused.
func TestOutboxConsumeEntry(t *testing.T) {
	dir := t.TempDir()
	open := func() *Store {
		s, err := Open(Options{Dir: dir, NoSync: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ctx := context.Background()
	s := open()
	o, err := s.OpenOutbox(ctx, 10, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	e := &OutboxEntry{Kind: OutboxConsume, Payload: protocol.ConsumePayload(7, []protocol.Ref{{1}, {2}}), NextAttemptMS: 100}
	e.Key[0], e.Signature[0] = 5, 6
	if err := o.Add(ctx, e); err != nil {
		t.Fatal(err)
	}
	if err := o.Add(ctx, &OutboxEntry{Kind: 'z'}); err == nil {
		t.Fatal("an entry of an unknown kind was queued")
	}
	s.Close()
	s = open()
	defer s.Close()
	if o, err = s.OpenOutbox(ctx, 10, 1<<20); err != nil {
		t.Fatal(err)
	}
	due, _, err := o.Due(ctx, 200, 10, nil)
	if err != nil || len(due) != 1 {
		t.Fatalf("due: %d entries, %v", len(due), err)
	}
	if got := due[0]; got.Kind != OutboxConsume || got.Key != e.Key || got.Signature != e.Signature || !bytes.Equal(got.Payload, e.Payload) {
		t.Fatalf("reloaded %+v, want %+v", got, e)
	}
}
