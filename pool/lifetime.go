package pool

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/jitter"
)

// lifetimes retires each connection after MaxConnLifetime plus its own
// uniform draw from [0, jitter), at nanosecond resolution. pgxpool keeps
// enforcing the upper bound (its MaxConnLifetime is set to lifetime+jitter
// with no jitter of its own); a timer per connection marks it expired
// earlier, and PrepareConn turns an expired connection away when it is next
// acquired. The hot path pays one atomic load while nothing is expired.
type lifetimes struct {
	lifetime, jitter time.Duration
	rand             jitter.Rand

	pending atomic.Int32 // len(expired), read without the lock

	mu      sync.Mutex
	timers  map[*pgx.Conn]*time.Timer // guarded by mu: live connections
	expired map[*pgx.Conn]struct{}    // guarded by mu: past their lifetime
	closed  bool                      // guarded by mu
}

// newLifetimes installs lifetime jitter on inner, returning nil when there
// is no lifetime or no jitter to honour.
func newLifetimes(inner *pgxpool.Config, pc *config) *lifetimes {
	j := inner.MaxConnLifetimeJitter
	switch {
	case pc.lifetimeSet:
		j = pc.lifetimeJitter
	case j == 0:
		j = time.Duration(float64(inner.MaxConnLifetime) * DefaultLifetimeJitterFraction)
	}
	if inner.MaxConnLifetime <= 0 || j <= 0 {
		inner.MaxConnLifetimeJitter = 0
		return nil
	}
	l := &lifetimes{
		lifetime: inner.MaxConnLifetime,
		jitter:   j,
		rand:     pc.rand,
		timers:   make(map[*pgx.Conn]*time.Timer),
		expired:  make(map[*pgx.Conn]struct{}),
	}
	inner.MaxConnLifetime += j
	inner.MaxConnLifetimeJitter = 0

	afterConnect := inner.AfterConnect
	inner.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		if afterConnect != nil {
			if err := afterConnect(ctx, c); err != nil {
				return err
			}
		}
		l.track(c)
		return nil
	}

	// Setting PrepareConn makes pgxpool ignore the deprecated
	// BeforeAcquire, so honour a caller's BeforeAcquire here.
	prepare := inner.PrepareConn
	//lint:ignore SA1019 keeping the caller's deprecated hook working
	if beforeAcquire := inner.BeforeAcquire; prepare == nil && beforeAcquire != nil {
		prepare = func(ctx context.Context, c *pgx.Conn) (bool, error) { return beforeAcquire(ctx, c), nil }
	}
	inner.PrepareConn = func(ctx context.Context, c *pgx.Conn) (bool, error) {
		if l.pending.Load() > 0 && l.takeExpired(c) {
			return false, nil // pgxpool destroys it and acquires another
		}
		if prepare != nil {
			return prepare(ctx, c)
		}
		return true, nil
	}

	beforeClose := inner.BeforeClose
	inner.BeforeClose = func(c *pgx.Conn) {
		l.forget(c)
		if beforeClose != nil {
			beforeClose(c)
		}
	}
	return l
}

// age returns the lifetime drawn for one connection.
func (l *lifetimes) age() time.Duration {
	return l.lifetime + jitter.Uniform(l.jitter, l.rand())
}

func (l *lifetimes) track(c *pgx.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.timers[c] = time.AfterFunc(l.age(), func() { l.expire(c) })
}

func (l *lifetimes) expire(c *pgx.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, live := l.timers[c]; !live {
		return
	}
	delete(l.timers, c)
	l.expired[c] = struct{}{}
	l.pending.Add(1)
}

// takeExpired reports whether c is past its lifetime, forgetting it if so.
func (l *lifetimes) takeExpired(c *pgx.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.expired[c]; !ok {
		return false
	}
	delete(l.expired, c)
	l.pending.Add(-1)
	return true
}

func (l *lifetimes) forget(c *pgx.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if t, ok := l.timers[c]; ok {
		t.Stop()
		delete(l.timers, c)
	}
	if _, ok := l.expired[c]; ok {
		delete(l.expired, c)
		l.pending.Add(-1)
	}
}

// close stops every timer. Safe on a nil *lifetimes.
func (l *lifetimes) close() {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	for c, t := range l.timers {
		t.Stop()
		delete(l.timers, c)
	}
	clear(l.expired)
	l.pending.Store(0)
}
