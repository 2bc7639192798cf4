package pool

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/internal/testdb"
)

// BenchmarkColdPool is a lone service on an idle server: a new pool of n
// connections receives n concurrent requests, each a 100ms query, and one
// op is the time until all are answered (pool creation to the last answer).
// Plain pgxpool, pgstagger with no options, and pgstagger with the fixed
// limits it had before the pacer (2 in flight, 20/s, burst 4) run side by
// side on a cluster of their own; pgstagger's times include its startup
// delay, uniform in [0, 1s). Between ops the server's backends are left to
// exit.
func BenchmarkColdPool(b *testing.B) {
	c := ownCluster(b, testdb.Options{Settings: map[string]string{"max_connections": "250"}})
	ctx := context.Background()
	impls := []struct {
		name string
		run  func(url string, n int) error
	}{
		{"pgxpool", func(url string, n int) error {
			p, err := pgxpool.New(ctx, url)
			if err != nil {
				return err
			}
			defer p.Close()
			return requests(n, func() error { _, err := p.Exec(ctx, "select pg_sleep(0.1)"); return err })
		}},
		{"pgstagger", func(url string, n int) error {
			p, err := New(ctx, url)
			if err != nil {
				return err
			}
			defer p.Close()
			return requests(n, func() error { _, err := p.Exec(ctx, "select pg_sleep(0.1)"); return err })
		}},
		{"pgstagger-fixed", func(url string, n int) error {
			// Before the pacer: 2 in flight, 20/s, burst 4.
			p, err := New(ctx, url, WithResponseTarget(0), WithMaxConnecting(2), WithConnectRate(20, 4))
			if err != nil {
				return err
			}
			defer p.Close()
			return requests(n, func() error { _, err := p.Exec(ctx, "select pg_sleep(0.1)"); return err })
		}},
	}
	for _, n := range []int{20, 100} {
		url := c.ConnString("", fmt.Sprintf("pool_max_conns=%d", n))
		for _, impl := range impls {
			b.Run(fmt.Sprintf("conns=%d/impl=%s", n, impl.name), func(b *testing.B) {
				for b.Loop() {
					if err := impl.run(url, n); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					waitBackendsGone(b, c)
					b.StartTimer()
				}
			})
		}
	}
}

// requests runs n calls of do at once and returns the first error.
func requests(n int, do func() error) error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			if err := do(); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// waitBackendsGone waits until the cluster holds no client backend but the
// one asking.
func waitBackendsGone(tb testing.TB, c *testdb.Cluster) {
	tb.Helper()
	ctx := context.Background()
	p, err := pgxpool.New(ctx, c.ConnString("", "pool_max_conns=1"))
	if err != nil {
		tb.Fatal(err)
	}
	defer p.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var n int
		if err := p.QueryRow(ctx, "select count(*) from pg_stat_activity where backend_type = 'client backend'").Scan(&n); err != nil {
			tb.Fatal(err)
		}
		if n <= 1 {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%d client backends still there after 30s", n)
		}
		time.Sleep(10 * time.Millisecond) // the server reaps them on its own: nothing to wait on
	}
}
