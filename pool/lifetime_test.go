package pool

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

func lifetimeConfig(t *testing.T, lifetime, jitter time.Duration) *pgxpool.Config {
	t.Helper()
	cfg, err := pgxpool.ParseConfig("postgres://u@127.0.0.1/x")
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConnLifetime, cfg.MaxConnLifetimeJitter = lifetime, jitter
	return cfg
}

func TestLifetimeJitterHonoursSubSecondDraws(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inner := lifetimeConfig(t, 300*time.Millisecond, 700*time.Millisecond)
		pc, err := newConfig(withRand(func() float64 { return 0.5 }))
		if err != nil {
			t.Fatal(err)
		}
		l := newLifetimes(inner, pc)
		// pgxpool enforces the upper bound with no jitter of its own.
		if inner.MaxConnLifetime != time.Second || inner.MaxConnLifetimeJitter != 0 {
			t.Fatalf("inner lifetime %v jitter %v, want 1s and 0", inner.MaxConnLifetime, inner.MaxConnLifetimeJitter)
		}
		c := &pgx.Conn{}
		if err := inner.AfterConnect(context.Background(), c); err != nil {
			t.Fatal(err)
		}
		// Lifetime 300ms + 0.5 × 700ms = 650ms, kept to the nanosecond.
		time.Sleep(650*time.Millisecond - time.Nanosecond)
		synctest.Wait()
		if ok, _ := inner.PrepareConn(context.Background(), c); !ok {
			t.Fatalf("connection turned away before its lifetime")
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		if ok, _ := inner.PrepareConn(context.Background(), c); ok {
			t.Fatalf("connection handed out after its lifetime")
		}
		if l.pending.Load() != 0 {
			t.Errorf("pending = %d after the expired connection was turned away", l.pending.Load())
		}
		l.close()
	})
}

func TestLifetimeJitterDefaultsAndOff(t *testing.T) {
	cases := []struct {
		name             string
		lifetime, jitter time.Duration
		opts             []Option
		wantInner        time.Duration // inner MaxConnLifetime
		wantOn           bool
	}{
		{"default fraction", time.Hour, 0, nil, time.Hour + 6*time.Minute, true},
		{"config's jitter", time.Hour, 90 * time.Second, nil, time.Hour + 90*time.Second, true},
		{"option wins", time.Hour, 90 * time.Second, []Option{WithLifetimeJitter(time.Second)}, time.Hour + time.Second, true},
		{"option turns it off", time.Hour, 90 * time.Second, []Option{WithLifetimeJitter(0)}, time.Hour, false},
		{"no lifetime", 0, time.Minute, nil, 0, false},
	}
	for _, c := range cases {
		inner := lifetimeConfig(t, c.lifetime, c.jitter)
		pc, err := newConfig(c.opts...)
		if err != nil {
			t.Fatal(err)
		}
		l := newLifetimes(inner, pc)
		if (l != nil) != c.wantOn || inner.MaxConnLifetime != c.wantInner || inner.MaxConnLifetimeJitter != 0 {
			t.Errorf("%s: on=%v inner lifetime %v jitter %v; want on=%v lifetime %v jitter 0",
				c.name, l != nil, inner.MaxConnLifetime, inner.MaxConnLifetimeJitter, c.wantOn, c.wantInner)
		}
		if l == nil && inner.PrepareConn != nil {
			t.Errorf("%s: PrepareConn installed with lifetime jitter off", c.name)
		}
	}
}

func TestClosedConnectionsAreForgotten(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inner := lifetimeConfig(t, time.Second, time.Second)
		pc, _ := newConfig()
		l := newLifetimes(inner, pc)
		a, b := &pgx.Conn{}, &pgx.Conn{}
		for _, c := range []*pgx.Conn{a, b} {
			if err := inner.AfterConnect(context.Background(), c); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if l.pending.Load() != 2 {
			t.Fatalf("pending = %d, want 2 expired", l.pending.Load())
		}
		inner.BeforeClose(a) // pgxpool closed one itself
		if l.pending.Load() != 1 || len(l.timers) != 0 {
			t.Errorf("after close: pending %d, timers %d; want 1 and 0", l.pending.Load(), len(l.timers))
		}
		l.close()
		if l.pending.Load() != 0 || len(l.expired) != 0 {
			t.Errorf("after pool close: pending %d, expired %d", l.pending.Load(), len(l.expired))
		}
	})
}

func TestExpiredConnectionIsReplacedOnRealServer(t *testing.T) {
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(db(t).ConnString("", "pool_max_conns=1"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConnLifetime = 400 * time.Millisecond
	p, err := NewWithConfig(ctx, cfg, append(fast, WithLifetimeJitter(400*time.Millisecond), withRand(func() float64 { return 0.25 }))...)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	pid := func() (n uint32) {
		if err := p.QueryRow(ctx, "select pg_backend_pid()").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	first := pid()
	if again := pid(); again != first {
		t.Fatalf("connection replaced before its lifetime of 500ms")
	}
	time.Sleep(600 * time.Millisecond) // let the 400ms + 0.25 × 400ms lifetime pass
	if next := pid(); next == first {
		t.Errorf("connection still in use after its lifetime")
	}
}

// TestConnReleaseChecksMaxConnLifetime is pgxpool's test of the same name,
// run through pgstagger's pool with lifetime jitter off, as pgxpool has it
// by default.
func TestConnReleaseChecksMaxConnLifetime(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	config, err := pgxpool.ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	config.MaxConnLifetime = 250 * time.Millisecond
	p, err := NewWithConfig(ctx, config, append(fast, WithLifetimeJitter(0))...)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	inner := p.Unwrap()

	c, err := inner.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(config.MaxConnLifetime) // the test's own: the connection ages while held
	c.Release()
	// Puddle destroys it in a goroutine of its own; pgxpool's test sleeps
	// 500ms for it, this one waits for the count.
	for deadline := time.Now().Add(2 * time.Second); inner.Stat().TotalConns() != 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if n := inner.Stat().TotalConns(); n != 0 {
		t.Errorf("after releasing a connection past its lifetime: %d connections, want 0", n)
	}
}
