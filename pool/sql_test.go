package pool

import (
	"context"
	"database/sql"
	"errors"
	"io"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstagger/pgstagger/internal/testdb"
)

// TestOpenDBCallsDuringARestartSucceedOnceTheServerIsBack is
// TestRestartUnderLoad for database/sql: calls started while the server
// is down wait for it and succeed; the only failures are calls whose
// session the shutdown ended, at most one per connection of the pool.
func TestOpenDBCallsDuringARestartSucceedOnceTheServerIsBack(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	const maxConns = 4
	p := newPool(t, c.ConnString("", "pool_max_conns=4"), WithStartupJitter(0), WithConnectRate(10, 2))
	db := OpenDB(p)
	defer db.Close()

	const workers = 8
	type call struct {
		start, end time.Time
		err        error
	}
	calls := make(chan call, 100000)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				start := time.Now()
				var n int
				err := db.QueryRowContext(ctx, "select 1").Scan(&n)
				cancel()
				calls <- call{start, time.Now(), err}
			}
		})
	}
	for range workers * 10 {
		if r := <-calls; r.err != nil {
			t.Fatalf("before the restart: %v", r.err)
		}
	}

	downAt := time.Now()
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	// Calls begun now, with the server down, must wait for it.
	const late = 4
	lateErrs := make(chan error, late)
	for range late {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, err := db.ExecContext(ctx, "select 1")
			lateErrs <- err
		}()
	}
	// Let the calls find no server: the pool's connects fail a few times.
	for before := p.Dialer().Stats().Transient; p.Dialer().Stats().Transient < before+4; {
		if time.Since(stopped) > 20*time.Second {
			t.Fatal("the pool did not try to reconnect while the server was down")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	upAt := time.Now()

	var failed []call
	for ok := 0; ok < workers*10; {
		r := <-calls
		switch {
		case r.err != nil:
			failed = append(failed, r)
		case r.start.After(upAt):
			ok++
		}
	}
	close(stop)
	wg.Wait()
	for len(calls) > 0 {
		if r := <-calls; r.err != nil {
			failed = append(failed, r)
		}
	}
	for _, f := range failed {
		var pe *pgconn.PgError
		var ce *pgconn.ConnectError
		terminated := (errors.As(f.err, &pe) && pe.Code == "57P01") ||
			errors.Is(f.err, io.ErrUnexpectedEOF) || errors.Is(f.err, io.EOF) ||
			errors.Is(f.err, syscall.ECONNRESET) || errors.Is(f.err, syscall.EPIPE) ||
			strings.Contains(f.err.Error(), "conn closed")
		if f.start.After(stopped) || !terminated || errors.As(f.err, &ce) || errors.Is(f.err, sql.ErrConnDone) {
			t.Errorf("call began %v after the stop began, ended %v after: %v", f.start.Sub(downAt), f.end.Sub(downAt), f.err)
		}
	}
	for range late {
		if err := <-lateErrs; err != nil {
			t.Errorf("a call begun while the server was down failed: %v", err)
		}
	}
	if len(failed) > maxConns {
		t.Errorf("%d calls failed, more than the pool's %d connections", len(failed), maxConns)
	}
	t.Logf("outage %v; %d calls failed; stats %+v", upAt.Sub(stopped), len(failed), p.Dialer().Stats())
}
