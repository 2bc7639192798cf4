// Command quickstart builds a pgstagger pool against a throwaway local
// PostgreSQL cluster (or -url), runs queries from many goroutines at once
// and prints what the connection gate did: how many connections it let
// through, and every wait it imposed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/testdb"
	"github.com/pgstagger/pgstagger/pool"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

func run() error {
	url := flag.String("url", "", "PostgreSQL connection string; empty starts a throwaway local cluster")
	workers := flag.Int("workers", 32, "goroutines querying at once")
	queries := flag.Int("queries", 20, "queries per goroutine")
	maxConns := flag.Int("max-conns", 8, "pool_max_conns")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	if *url == "" {
		fmt.Println("starting a throwaway PostgreSQL cluster...")
		c, err := testdb.Start(testdb.Options{})
		if err != nil {
			return err
		}
		defer c.Close()
		*url = c.ConnString("")
	}

	cfg, err := pgxpool.ParseConfig(*url)
	if err != nil {
		return err
	}
	cfg.MaxConns, cfg.MinConns = int32(*maxConns), 2
	p, err := pool.NewWithConfig(ctx, cfg,
		pool.WithStartupJitter(500*time.Millisecond), // first connection within half a second
		pool.WithConnectRate(rate.Limit(10), 2),      // at most 10 new TCP connections a second
		pool.WithMaxConnecting(2),                    // at most 2 being established at once
	)
	if err != nil {
		return err
	}
	defer p.Close()
	plan := p.Dialer().Plan()
	fmt.Printf("pool ready at once (New does no I/O): startup window %v, %v conns/s (burst %d), %d connecting at most\n",
		plan.StartupWindow, plan.Rate, plan.Burst, plan.MaxConnecting)

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, *workers)
	for range *workers {
		wg.Go(func() {
			for range *queries {
				qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				var pid int32
				err := p.QueryRow(qctx, "select pg_backend_pid() from pg_sleep(0.005)").Scan(&pid)
				cancel()
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		failed++
		if failed == 1 {
			fmt.Println("first error:", err, "| class:", dialer.Classify(err), "| shed:", errors.Is(err, dialer.ErrShed))
		}
	}

	s := p.Dialer().Stats()
	st := p.Stat()
	fmt.Printf("\n%d goroutines ran %d queries in %v (%d failed)\n",
		*workers, *workers**queries, time.Since(start).Round(time.Millisecond), failed)
	fmt.Printf("connections: %d established, %d TCP dials, %d in the pool now (max %d)\n",
		s.OK, s.Dials, st.TotalConns(), st.MaxConns())
	fmt.Println("waits the gate imposed:")
	for _, w := range []struct {
		name string
		w    dialer.WaitStats
	}{
		{"startup jitter", s.JitterWait},
		{"rate limit", s.RateWait},
		{"connecting slot", s.SlotWait},
		{"backoff", s.BackoffWait},
	} {
		fmt.Printf("  %-16s %3d waits, %v in all\n", w.name, w.w.Count, w.w.Total.Round(time.Millisecond))
	}
	fmt.Printf("attempts: %d ok, %d transient, %d permanent, %d retries, %d shed\n",
		s.OK, s.Transient, s.Permanent, s.Retries, s.Shed)
	if failed > 0 {
		return fmt.Errorf("%d workers failed", failed)
	}
	return nil
}
