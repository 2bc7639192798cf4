package pool

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Each benchmark runs pgstagger's Pool and plain pgxpool side by side in the
// same run, against the same server, so their ratio is what matters.

func benchPools(b *testing.B) (*Pool, *pgxpool.Pool) {
	b.Helper()
	ctx := context.Background()
	url := db(b).ConnString("", "pool_max_conns=4")
	ours, err := New(ctx, url, fast...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(ours.Close)
	plain, err := pgxpool.New(ctx, url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(plain.Close)
	// Warm both so the benchmark measures the pool, not connecting.
	for _, ping := range []func(context.Context) error{ours.Ping, plain.Ping} {
		if err := ping(ctx); err != nil {
			b.Fatal(err)
		}
	}
	return ours, plain
}

func BenchmarkAcquireRelease(b *testing.B) {
	ours, plain := benchPools(b)
	ctx := context.Background()
	run := func(acquire func(context.Context) (*pgxpool.Conn, error)) func(*testing.B) {
		return func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				c, err := acquire(ctx)
				if err != nil {
					b.Fatal(err)
				}
				c.Release()
			}
		}
	}
	b.Run("impl=pgxpool", run(plain.Acquire))
	b.Run("impl=pgstagger", run(ours.Acquire))
}

func BenchmarkQueryRow(b *testing.B) {
	ours, plain := benchPools(b)
	ctx := context.Background()
	b.Run("impl=pgxpool", func(b *testing.B) {
		b.ReportAllocs()
		var n int
		for b.Loop() {
			if err := plain.QueryRow(ctx, "select 1").Scan(&n); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("impl=pgstagger", func(b *testing.B) {
		b.ReportAllocs()
		var n int
		for b.Loop() {
			if err := ours.QueryRow(ctx, "select 1").Scan(&n); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkExec(b *testing.B) {
	ours, plain := benchPools(b)
	ctx := context.Background()
	b.Run("impl=pgxpool", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := plain.Exec(ctx, "select 1"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("impl=pgstagger", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ours.Exec(ctx, "select 1"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkPaired measures what pgstagger's Pool adds over the pgxpool.Pool
// it wraps, on the very same connection: one pool of one connection, whose
// methods are timed interleaved with its inner pgxpool's, in batches that
// alternate which goes first. Side-by-side pools each talk to their own
// server backend, and where the kernel places those two processes moves each
// pool's time by ±10%; here the server side is one process for both, and load
// from elsewhere falls on both alike. What pgstagger installs inside the
// pgxpool.Pool (the lifetime-jitter check in PrepareConn, the wrapper on the
// connection's reads and writes) both sides share here; the side-by-side
// benchmarks above include it. The reported metric is the ratio of total times, pgstagger / pgxpool;
// benchstat summarises it across -count runs.
func BenchmarkPaired(b *testing.B) {
	ctx := context.Background()
	ours, err := New(ctx, db(b).ConnString("", "pool_max_conns=1"), fast...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(ours.Close)
	plain := ours.p // the same connection, without pgstagger's wrapping
	if err := ours.Ping(ctx); err != nil {
		b.Fatal(err)
	}
	var n int
	queryRow := func(p interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) func() error {
		return func() error { return p.QueryRow(ctx, "select 1").Scan(&n) }
	}
	acquireRelease := func(acquire func(context.Context) (*pgxpool.Conn, error)) func() error {
		return func() error {
			c, err := acquire(ctx)
			if err == nil {
				c.Release()
			}
			return err
		}
	}
	for _, tc := range []struct {
		name        string
		batch       int // operations timed together, to dwarf the clock's cost
		plain, ours func() error
	}{
		{"op=QueryRow", 10, queryRow(plain), queryRow(ours)},
		{"op=AcquireRelease", 1000, acquireRelease(plain.Acquire), acquireRelease(ours.Acquire)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var spent [2]time.Duration // pgxpool, pgstagger
			ops := [2]func() error{tc.plain, tc.ours}
			round := 0
			for b.Loop() {
				for k := range 2 {
					side := (round + k) % 2 // alternate which side goes first
					start := time.Now()
					for range tc.batch {
						if err := ops[side](); err != nil {
							b.Fatal(err)
						}
					}
					spent[side] += time.Since(start)
				}
				round++
			}
			per := float64(b.N * tc.batch)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(float64(spent[0].Nanoseconds())/per, "pgxpool-ns/op")
			b.ReportMetric(float64(spent[1].Nanoseconds())/per, "pgstagger-ns/op")
			b.ReportMetric(float64(spent[1])/float64(spent[0]), "pgstagger/pgxpool")
		})
	}
}
