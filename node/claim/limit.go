package claim

import (
	"math"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
)

// bucket is one token bucket: tokens at time last.
type bucket struct {
	tokens float64
	last   time.Time
}

// limiter is a set of token buckets keyed by K (a requester, a device),
// each filling at rate tokens per second up to burst. It remembers at most
// size keys (least recently used first out), so a flood of distinct keys
// costs a bounded map; a key pushed out starts again with a full bucket,
// which bounds what churning keys can gain to one burst per key churned.
type limiter[K comparable] struct {
	rate  float64
	burst float64

	mu      sync.Mutex
	buckets *lru.Cache[K, *bucket]
}

func newLimiter[K comparable](rate float64, burst, size int) *limiter[K] {
	c, err := lru.New[K, *bucket](size)
	if err != nil {
		panic(err) // size is validated by Config.Validate
	}
	return &limiter[K]{rate: rate, burst: float64(burst), buckets: c}
}

// allow takes one token from k's bucket at now. When the bucket is empty
// it takes nothing and says how long until a token is there.
func (l *limiter[K]) allow(k K, now time.Time) (ok bool, retryAfter time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, found := l.buckets.Get(k)
	if !found {
		b = &bucket{tokens: l.burst, last: now}
		l.buckets.Add(k, b)
	}
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = math.Min(l.burst, b.tokens+dt.Seconds()*l.rate)
		b.last = now
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	wait := time.Duration(math.Ceil((1 - b.tokens) / l.rate * float64(time.Second)))
	return false, max(wait, time.Millisecond)
}

// len returns the keys remembered (tests).
func (l *limiter[K]) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buckets.Len()
}
