// Command sqldb shows database/sql on a pgstagger pool through a server
// restart. It starts a throwaway PostgreSQL cluster, opens a *sql.DB two
// ways, pool.OpenDB(p) and stdlib.OpenDBFromPool(p.Unwrap()), and has
// workers query through each while the server is stopped and started
// again; then it prints how many calls failed, and why.
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pgstagger/pgstagger/internal/testdb"
	"github.com/pgstagger/pgstagger/pool"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sqldb:", err)
		os.Exit(1)
	}
}

func run() error {
	workers := flag.Int("workers", 8, "goroutines querying through each *sql.DB")
	down := flag.Duration("down", time.Second, "how long the server stays down")
	flag.Parse()

	fmt.Println("starting a throwaway PostgreSQL cluster...")
	c, err := testdb.Start(testdb.Options{})
	if err != nil {
		return err
	}
	defer c.Close()

	ctx := context.Background()
	open := func() (*pool.Pool, error) {
		return pool.New(ctx, c.ConnString("", "pool_max_conns=4"), pool.WithStartupJitter(0))
	}
	withRetries, err := open()
	if err != nil {
		return err
	}
	defer withRetries.Close()
	plain, err := open()
	if err != nil {
		return err
	}
	defer plain.Close()
	dbs := []struct {
		name string
		db   *sql.DB
	}{
		{"pool.OpenDB(p)", pool.OpenDB(withRetries)},
		{"stdlib.OpenDBFromPool(p.Unwrap())", stdlib.OpenDBFromPool(plain.Unwrap())},
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	results := make([]tally, len(dbs))
	for i, d := range dbs {
		defer d.db.Close()
		for range *workers {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					// Each call may wait up to 20s: long enough for the outage.
					qctx, cancel := context.WithTimeout(ctx, 20*time.Second)
					var n int
					err := d.db.QueryRowContext(qctx, "select 1").Scan(&n)
					cancel()
					results[i].add(err)
					time.Sleep(10 * time.Millisecond)
				}
			})
		}
	}

	time.Sleep(time.Second)
	fmt.Printf("%d workers per *sql.DB are querying; stopping the server for %v...\n", *workers, *down)
	if err := c.Stop(); err != nil {
		return err
	}
	time.Sleep(*down)
	if err := c.Start(); err != nil {
		return err
	}
	fmt.Println("the server is back; querying on for 2s...")
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()

	for i, d := range dbs {
		fmt.Printf("\n%s: %d calls, %d failed\n", d.name, results[i].calls, results[i].failed())
		results[i].print()
	}
	return nil
}

// tally counts calls and their failures by kind.
type tally struct {
	mu     sync.Mutex
	calls  int
	errors map[string]int
}

func (t *tally) add(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.calls++
	if err == nil {
		return
	}
	if t.errors == nil {
		t.errors = map[string]int{}
	}
	t.errors[kind(err)]++
}

func (t *tally) failed() (n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.errors {
		n += c
	}
	return n
}

func (t *tally) print() {
	t.mu.Lock()
	defer t.mu.Unlock()
	var kinds []string
	for k := range t.errors {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		fmt.Printf("  %4d  %s\n", t.errors[k], k)
	}
}

// kind names what an error was: a session the shutdown ended, or a connect
// that found no server.
func kind(err error) string {
	var pe *pgconn.PgError
	var ce *pgconn.ConnectError
	switch {
	case errors.As(err, &ce):
		return "connect failed: the call met the server down"
	case errors.As(err, &pe) && pe.Code == "57P01":
		return "57P01: the shutdown ended the call's session"
	case pgconn.Timeout(err):
		return "timed out"
	default:
		return "the session was cut: " + err.Error()
	}
}
