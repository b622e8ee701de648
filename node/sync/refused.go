package sync

import (
	"time"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/kpnode/kpnode/storage"
)

// maxRefused bounds the memory of refused items.
const maxRefused = 1 << 16

// Refused remembers the sync item IDs whose records this node refused
// (validation failed, or the store declined them: over quota, stale, a
// newer copy held), so that it does not pull them again in every session.
// An entry lasts the retention: by then the record is too old for any
// node to offer. The oldest entries are forgotten first when it is full.
// Only IDs computed from a record whose signature verified get in, so a
// peer cannot make this node refuse an item it never saw. Safe for
// concurrent use; it starts no goroutine. A nil *Refused remembers
// nothing.
type Refused struct {
	ttl   time.Duration
	items *lru.Cache[refusedKey, time.Time] // → expiry
}

type refusedKey struct {
	kind storage.SetKind
	id   uint64
}

// NewRefused returns an empty memory whose entries last ttl.
func NewRefused(ttl time.Duration) *Refused {
	c, err := lru.New[refusedKey, time.Time](maxRefused)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return &Refused{ttl: ttl, items: c}
}

func (r *Refused) add(kind storage.SetKind, id uint64, now time.Time) {
	if r != nil {
		r.items.Add(refusedKey{kind, id}, now.Add(r.ttl))
	}
}

func (r *Refused) has(kind storage.SetKind, id uint64, now time.Time) bool {
	if r == nil {
		return false
	}
	exp, ok := r.items.Peek(refusedKey{kind, id})
	if ok && !now.Before(exp) {
		r.items.Remove(refusedKey{kind, id})
		return false
	}
	return ok
}

// Len returns how many items are remembered.
func (r *Refused) Len() int {
	if r == nil {
		return 0
	}
	return r.items.Len()
}
