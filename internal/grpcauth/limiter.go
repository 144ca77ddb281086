package grpcauth

import (
	"container/list"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// limiter keeps a token bucket per client identity, in a map bounded by max. Buckets live in
// least-recently-used order: a bucket idle long enough to have refilled is the same as a new one,
// so forgetting it changes nothing, and past max the least recently used one is forgotten (that
// client starts again with a full bucket, the price of a bounded map).
type limiter struct {
	limit rate.Limit
	burst int
	idle  time.Duration // time to refill a bucket completely
	max   int

	mu    sync.Mutex
	lru   *list.List // of *bucket, most recently used first
	byKey map[string]*list.Element
}

type bucket struct {
	key  string
	lim  *rate.Limiter
	last time.Time
}

func newLimiter(perSecond float64, burst, max int) *limiter {
	return &limiter{
		limit: rate.Limit(perSecond),
		burst: burst,
		idle:  time.Duration(math.Ceil(float64(burst) / perSecond * float64(time.Second))),
		max:   max,
		lru:   list.New(),
		byKey: make(map[string]*list.Element),
	}
}

// take spends one token of key's bucket. When the bucket is empty it spends nothing and says how
// long until a token is there: refusing at once, rather than waiting, keeps the server free of
// queues that a flood could grow without bound.
func (l *limiter) take(key string, now time.Time) (ok bool, retryAfter time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b *bucket
	if e, found := l.byKey[key]; found {
		b = e.Value.(*bucket)
		l.lru.MoveToFront(e)
	} else {
		b = &bucket{key: key, lim: rate.NewLimiter(l.limit, l.burst)}
		l.byKey[key] = l.lru.PushFront(b)
	}
	b.last = now
	l.evict(now)
	if b.lim.AllowN(now, 1) {
		return true, 0
	}
	missing := 1 - b.lim.TokensAt(now)
	wait := time.Duration(math.Ceil(missing / float64(l.limit) * float64(time.Second)))
	return false, max(wait, time.Millisecond)
}

// evict drops buckets from the least recently used end while they are idle or too many.
func (l *limiter) evict(now time.Time) {
	for l.lru.Len() > 0 {
		e := l.lru.Back()
		b := e.Value.(*bucket)
		if l.lru.Len() <= l.max && now.Sub(b.last) < l.idle {
			return
		}
		l.lru.Remove(e)
		delete(l.byKey, b.key)
	}
}

// size is the number of buckets kept.
func (l *limiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}
