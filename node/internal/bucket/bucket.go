// Package bucket is a token bucket per key with a bounded memory: the rate
// limits of the node's ingest path and its gossip validators share it.
package bucket

import (
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// Keyed holds a token bucket per key: Burst tokens at once, refilled at
// Rate a second. It remembers at most Size keys, the least recently used
// forgotten first (a key forgotten starts again with a full bucket). Safe
// for concurrent use; it starts no goroutine.
type Keyed[K comparable] struct {
	rate, burst float64
	now         func() time.Time

	mu   sync.Mutex
	keys *simplelru.LRU[K, *state]
}

type state struct {
	tokens float64
	last   time.Time
}

// New returns a Keyed of rate tokens a second and burst at once, keeping
// size keys, on the clock now (nil: time.Now; only its differences count).
func New[K comparable](size int, rate, burst float64, now func() time.Time) *Keyed[K] {
	if now == nil {
		now = time.Now
	}
	l, err := simplelru.NewLRU[K, *state](max(size, 1), nil)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return &Keyed[K]{rate: rate, burst: burst, now: now, keys: l}
}

// Take takes n tokens from key's bucket and reports true, or reports false
// and takes nothing when the bucket holds fewer than n.
func (k *Keyed[K]) Take(key K, n float64) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	s := k.refill(key)
	if s.tokens < n {
		return false
	}
	s.tokens -= n
	return true
}

// Give returns n tokens to key's bucket (a take that turned out not to
// count), up to the burst.
func (k *Keyed[K]) Give(key K, n float64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	s := k.refill(key)
	s.tokens = min(k.burst, s.tokens+n)
}

// refill returns key's bucket, refilled to now; k.mu is held.
func (k *Keyed[K]) refill(key K) *state {
	now := k.now()
	s, ok := k.keys.Get(key)
	if !ok {
		s = &state{tokens: k.burst, last: now}
		k.keys.Add(key, s)
		return s
	}
	// A clock that steps back refills nothing.
	s.tokens = min(k.burst, s.tokens+max(0, now.Sub(s.last).Seconds())*k.rate)
	s.last = now
	return s
}
