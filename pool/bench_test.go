package pool

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Each benchmark runs pgstagger's Pool and plain pgxpool side by side in the
// same run, against the same server, so their ratio is what matters.

func benchPools(b *testing.B) (*Pool, *pgxpool.Pool) {
	b.Helper()
	ctx := context.Background()
	url := db.ConnString("", "pool_max_conns=4")
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
