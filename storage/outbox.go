package storage

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/dgraph-io/badger/v4"

	"github.com/kpnode/kpnode/protocol"
)

// The outbox holds publications a node acknowledged (POST → 204) for keys
// of shards it does not hold, until a holder has them: nobody would ever
// pull them from this node.
//
//	o/<seq 8>  -> outbox value (see encodeOutboxValue)
//
// seq is big-endian, so a scan is in arrival order.
const prefixOutbox = 'o'

// ErrOutboxFull: the outbox holds its maximum of entries; the caller must
// not acknowledge the publication.
var ErrOutboxFull = errors.New("storage: outbox full")

// OutboxKind names the kind of record an outbox entry carries.
type OutboxKind byte

// Outbox kinds.
const (
	OutboxBundle  OutboxKind = 'b'
	OutboxAccount OutboxKind = 'a'
	// OutboxConsume: a consume notice (Key is its device_id). Claim
	// notices are never queued: they are best-effort gossip, and a node
	// claims only for shards it holds.
	OutboxConsume OutboxKind = 'c'
)

// OutboxEntry is one pending publication.
type OutboxEntry struct {
	Seq         uint64
	Kind        OutboxKind
	Key         protocol.Key // device_id or account_pub
	Signature   [protocol.SignatureSize]byte
	Payload     []byte
	UpdatedAtMS int64 // accounts: the updated_at gossiped with it
	// Attempts counts publications so far; NextAttemptMS is when the next
	// one is due (Unix ms).
	Attempts      uint32
	NextAttemptMS int64
}

// Outbox value: version 1 ‖ kind 1 ‖ attempts 4 ‖ next_attempt_ms 8 ‖
// updated_at_ms 8 ‖ key 32 ‖ signature 64 ‖ payload.
const (
	outboxValueVersion = 1
	outboxValueHdr     = 1 + 1 + 4 + 8 + 8 + protocol.KeySize + protocol.SignatureSize
	outboxKeyLen       = 2 + 8
)

func outboxKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte{prefixOutbox, '/'}, seq)
}

func encodeOutboxValue(e *OutboxEntry) []byte {
	v := make([]byte, 0, outboxValueHdr+len(e.Payload))
	v = append(v, outboxValueVersion, byte(e.Kind))
	v = binary.BigEndian.AppendUint32(v, e.Attempts)
	v = binary.BigEndian.AppendUint64(v, uint64(e.NextAttemptMS))
	v = binary.BigEndian.AppendUint64(v, uint64(e.UpdatedAtMS))
	v = append(v, e.Key[:]...)
	v = append(v, e.Signature[:]...)
	return append(v, e.Payload...)
}

func decodeOutboxValue(e *OutboxEntry, v []byte) error {
	if len(v) < outboxValueHdr || v[0] != outboxValueVersion {
		return fmt.Errorf("%w: outbox value of %d bytes", errCorrupt, len(v))
	}
	e.Kind = OutboxKind(v[1])
	if e.Kind != OutboxBundle && e.Kind != OutboxAccount && e.Kind != OutboxConsume {
		return fmt.Errorf("%w: outbox kind %d", errCorrupt, v[1])
	}
	e.Attempts = binary.BigEndian.Uint32(v[2:])
	e.NextAttemptMS = int64(binary.BigEndian.Uint64(v[6:]))
	e.UpdatedAtMS = int64(binary.BigEndian.Uint64(v[14:]))
	copy(e.Key[:], v[22:])
	copy(e.Signature[:], v[22+protocol.KeySize:])
	e.Payload = append([]byte(nil), v[outboxValueHdr:]...)
	return nil
}

// outboxID identifies a publication, so posting the same record twice
// queues it once.
func outboxID(kind OutboxKind, key protocol.Key, sig [protocol.SignatureSize]byte) [32]byte {
	h := sha256.New()
	h.Write([]byte{byte(kind)})
	h.Write(key[:])
	h.Write(sig[:])
	var id [32]byte
	h.Sum(id[:0])
	return id
}

type outboxMeta struct {
	id   [32]byte
	next int64
	kind OutboxKind
	key  protocol.Key
	size int64 // bytes of the value
}

// Outbox is the durable queue of pending publications in a Store. It keeps
// an index of the entries in memory (a few dozen bytes each); the records
// stay on disk.
type Outbox struct {
	s        *Store
	max      int
	maxBytes int64

	mu      sync.Mutex // guards the fields below and serialises writes
	bytes   int64      // sum of the entries' sizes
	nextSeq uint64
	entries map[uint64]outboxMeta
	ids     map[[32]byte]uint64
}

// OpenOutbox loads the outbox of s, which holds at most capacity entries
// and maxBytes bytes of them.
// Entries that do not decode (never written by this version) are deleted
// with a warning.
func (s *Store) OpenOutbox(ctx context.Context, capacity int, maxBytes int64) (*Outbox, error) {
	if capacity < 1 || maxBytes < 1 {
		return nil, fmt.Errorf("storage: outbox capacity must be at least 1 entry and 1 byte, got %d and %d", capacity, maxBytes)
	}
	o := &Outbox{s: s, max: capacity, maxBytes: maxBytes, entries: map[uint64]outboxMeta{}, ids: map[[32]byte]uint64{}}
	var corrupt [][]byte
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixOutbox, '/'}, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			k := item.KeyCopy(nil)
			if len(k) != outboxKeyLen {
				corrupt = append(corrupt, k)
				continue
			}
			seq := binary.BigEndian.Uint64(k[2:])
			o.nextSeq = max(o.nextSeq, seq+1)
			var e OutboxEntry
			if err := item.Value(func(v []byte) error { return decodeOutboxValue(&e, v) }); err != nil {
				corrupt = append(corrupt, k)
				continue
			}
			id := outboxID(e.Kind, e.Key, e.Signature)
			size := int64(item.ValueSize())
			o.entries[seq] = outboxMeta{id: id, next: e.NextAttemptMS, kind: e.Kind, key: e.Key, size: size}
			o.bytes += size
			o.ids[id] = seq
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("storage: load outbox: %w", err)
	}
	if len(corrupt) > 0 {
		s.log.Warn("outbox: dropping undecodable entries", "count", len(corrupt))
		if err := s.update(ctx, func(txn *badger.Txn) error {
			for _, k := range corrupt {
				if err := txn.Delete(k); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return nil, fmt.Errorf("storage: outbox: %w", err)
		}
	}
	return o, nil
}

// Len returns how many publications are pending.
func (o *Outbox) Len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.entries)
}

// Add queues e (Seq is assigned) and returns once it is committed (and
// fsynced, unless the store runs with NoSync). A publication already queued
// is not queued again; its existing entry is made due now. A full outbox
// (entries or bytes) is ErrOutboxFull.
func (o *Outbox) Add(ctx context.Context, e *OutboxEntry) error {
	if e.Kind != OutboxBundle && e.Kind != OutboxAccount && e.Kind != OutboxConsume {
		return fmt.Errorf("storage: outbox kind %d", e.Kind)
	}
	id := outboxID(e.Kind, e.Key, e.Signature)
	o.mu.Lock()
	defer o.mu.Unlock()
	if seq, ok := o.ids[id]; ok {
		m := o.entries[seq]
		if m.next > e.NextAttemptMS {
			if err := o.rescheduleLocked(ctx, seq, nil, e.NextAttemptMS); err != nil {
				return err
			}
		}
		e.Seq = seq
		return nil
	}
	v := encodeOutboxValue(e)
	size := int64(len(v))
	if len(o.entries) >= o.max || o.bytes+size > o.maxBytes {
		return ErrOutboxFull
	}
	e.Seq = o.nextSeq
	if err := o.s.update(ctx, func(txn *badger.Txn) error {
		return txn.Set(outboxKey(e.Seq), v)
	}); err != nil {
		return err
	}
	o.nextSeq++
	o.bytes += size
	o.entries[e.Seq] = outboxMeta{id: id, next: e.NextAttemptMS, kind: e.Kind, key: e.Key, size: size}
	o.ids[id] = e.Seq
	return nil
}

// Due returns up to limit entries due at nowMS, oldest first, leaving out
// those skip (if not nil) names, and the time the earliest entry neither
// returned nor skipped is due (0 if none).
func (o *Outbox) Due(ctx context.Context, nowMS int64, limit int, skip func(OutboxKind, protocol.Key) bool) ([]*OutboxEntry, int64, error) {
	o.mu.Lock()
	var due []uint64
	var next int64
	for seq, m := range o.entries {
		if skip != nil && skip(m.kind, m.key) {
			continue
		}
		if m.next <= nowMS {
			due = append(due, seq)
		} else if next == 0 || m.next < next {
			next = m.next
		}
	}
	o.mu.Unlock()
	sort.Slice(due, func(i, j int) bool { return due[i] < due[j] })
	if len(due) > limit {
		next = nowMS
		due = due[:limit]
	}
	out := make([]*OutboxEntry, 0, len(due))
	err := o.s.db.View(func(txn *badger.Txn) error {
		for _, seq := range due {
			item, err := txn.Get(outboxKey(seq))
			if errors.Is(err, badger.ErrKeyNotFound) {
				continue // removed meanwhile
			} else if err != nil {
				return err
			}
			e := &OutboxEntry{Seq: seq}
			if err := item.Value(func(v []byte) error { return decodeOutboxValue(e, v) }); err != nil {
				return err
			}
			out = append(out, e)
		}
		return nil
	})
	if errors.Is(err, badger.ErrDBClosed) {
		return nil, 0, ErrClosed
	}
	return out, next, err
}

// Reschedule records an attempt of entry seq: attempts and the next time it
// is due.
func (o *Outbox) Reschedule(ctx context.Context, seq uint64, attempts uint32, nextMS int64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.rescheduleLocked(ctx, seq, &attempts, nextMS)
}

func (o *Outbox) rescheduleLocked(ctx context.Context, seq uint64, attempts *uint32, nextMS int64) error {
	m, ok := o.entries[seq]
	if !ok {
		return nil
	}
	k := outboxKey(seq)
	if err := o.s.update(ctx, func(txn *badger.Txn) error {
		item, err := txn.Get(k)
		if err != nil {
			return err
		}
		var e OutboxEntry
		if err := item.Value(func(v []byte) error { return decodeOutboxValue(&e, v) }); err != nil {
			return err
		}
		if attempts != nil {
			e.Attempts = *attempts
		}
		e.NextAttemptMS = nextMS
		return txn.Set(k, encodeOutboxValue(&e))
	}); err != nil {
		return err
	}
	m.next = nextMS
	o.entries[seq] = m
	return nil
}

// Remove deletes entry seq: a holder has the publication (or it can never
// be delivered).
func (o *Outbox) Remove(ctx context.Context, seq uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	m, ok := o.entries[seq]
	if !ok {
		return nil
	}
	if err := o.s.update(ctx, func(txn *badger.Txn) error { return txn.Delete(outboxKey(seq)) }); err != nil {
		return err
	}
	delete(o.entries, seq)
	delete(o.ids, m.id)
	o.bytes -= m.size
	return nil
}
