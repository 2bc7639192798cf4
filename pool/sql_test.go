package pool

import (
	"context"
	"testing"
	"time"

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
	load := startCalls(workers, func(ctx context.Context) error {
		var n int
		return db.QueryRowContext(ctx, "select 1").Scan(&n)
	})
	for range workers * 10 {
		if r := <-load.calls; r.err != nil {
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

	failed := load.checkRestart(t, workers*10, maxConns, downAt, stopped, upAt)
	for range late {
		if err := <-lateErrs; err != nil {
			t.Errorf("a call begun while the server was down failed: %v", err)
		}
	}
	t.Logf("outage %v; %d calls failed; stats %+v", upAt.Sub(stopped), len(failed), p.Dialer().Stats())
}
