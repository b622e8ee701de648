package node

import (
	"time"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/kpnode/kpnode/storage"
)

// syncMaxRefused bounds the memory of refused items.
const syncMaxRefused = 1 << 16

// refusedItems remembers the sync item IDs whose records this node refused
// (validation failed, or the store declined them: over quota, stale, a
// newer copy held), so that it does not pull them again in every session.
// An entry lasts the retention: by then the record is too old for any
// node to offer. The oldest entries are forgotten first when it is full.
// Only IDs computed from a record whose signature verified get in, so a
// peer cannot make this node refuse an item it never saw. Safe for
// concurrent use; it starts no goroutine.
type refusedItems struct {
	ttl   time.Duration
	items *lru.Cache[refusedKey, time.Time] // → expiry
}

type refusedKey struct {
	kind storage.SetKind
	id   uint64
}

func newRefusedItems(ttl time.Duration) *refusedItems {
	c, err := lru.New[refusedKey, time.Time](syncMaxRefused)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return &refusedItems{ttl: ttl, items: c}
}

func (r *refusedItems) add(kind storage.SetKind, id uint64, now time.Time) {
	r.items.Add(refusedKey{kind, id}, now.Add(r.ttl))
}

func (r *refusedItems) has(kind storage.SetKind, id uint64, now time.Time) bool {
	exp, ok := r.items.Peek(refusedKey{kind, id})
	if ok && !now.Before(exp) {
		r.items.Remove(refusedKey{kind, id})
		return false
	}
	return ok
}

func (r *refusedItems) len() int { return r.items.Len() }
