package pool

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/internal/engine"
	"github.com/pgstagger/pgstagger/internal/testdb"
)

// fill acquires n connections at once, holds them until all are acquired,
// and releases them.
func fill(t *testing.T, p *Pool, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conns := make(chan *pgxpool.Conn, n)
	errs := make(chan error, n)
	for range n {
		go func() {
			c, err := p.Acquire(ctx)
			if err != nil {
				errs <- err
				return
			}
			conns <- c
		}()
	}
	for range n {
		select {
		case err := <-errs:
			t.Fatal(err)
		case c := <-conns:
			defer c.Release()
		}
	}
}

// A pool filling on a quiet server lets more of its connects be under way
// as they take about as long as the quickest; filling again while another
// client loads the postmaster, it lets fewer.
func TestPacerBacksOffWhileAnotherClientLoadsThePostmaster(t *testing.T) {
	const size = 4
	// A cluster of its own: on the package's shared one, the backends of
	// earlier tests exiting keep the postmaster busy for a while. Trust
	// authentication: the client's SCRAM hashing, on the same 2 cores, is
	// noise in the response time the pacer reads. A first connection warms
	// the server (its caches, the postmaster's first fork).
	c := ownCluster(t, testdb.Options{Auth: "trust"})
	warm, err := pgx.Connect(context.Background(), c.ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	warm.Close(context.Background())
	// The server's facts off: this is the pacer on its own, which a pool
	// reading them holds at its initial limit until two reads are done.
	p := newPool(t, c.ConnString("", fmt.Sprintf("pool_max_conns=%d", size)), WithStartupJitter(0), WithConnectRate(rate.Inf, 1),
		WithServerFacts(0))
	// One connection at a time: the pacer times whole establishments, and
	// on 2 cores shared with this client (slowed by -race) the pool's own
	// connects in parallel would slow each other, which is not the
	// postmaster's queue this test is about. The limit still grows while
	// it is the constraint: to 2, then 3.
	held := make([]*pgxpool.Conn, 0, size)
	for range size {
		conn, err := p.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, conn)
	}
	for _, conn := range held {
		conn.Release()
	}
	quiet := p.Dialer().Stats()
	if quiet.Baseline <= 0 || quiet.ConnectLimit <= engine.InitialConnecting || quiet.Decreases != 0 {
		t.Fatalf("after filling on a quiet server: %+v; want a baseline, a limit above the initial %d and no decrease", quiet, engine.InitialConnecting)
	}
	url := c.ConnString("")

	// Another client: connects and disconnects from 8 goroutines, as fast
	// as the postmaster lets it, until the pool has filled again. The pool
	// fills once the load is under way (16 of its connects made).
	loadCtx, stopLoad := context.WithTimeout(context.Background(), time.Minute)
	var load sync.WaitGroup
	var loadsMu sync.Mutex
	loads := 0
	underWay := make(chan struct{})
	for range 8 {
		load.Go(func() {
			for loadCtx.Err() == nil {
				conn, err := pgx.Connect(loadCtx, url)
				if err != nil {
					continue
				}
				conn.Close(context.Background())
				loadsMu.Lock()
				if loads++; loads == 16 {
					close(underWay)
				}
				loadsMu.Unlock()
			}
		})
	}
	defer func() { stopLoad(); load.Wait() }()
	select {
	case <-underWay:
	case <-loadCtx.Done():
		t.Fatal("the other client could not connect 16 times in a minute")
	}
	p.Reset() // every connection goes: the pool connects again, under load
	fill(t, p, size)
	under := p.Dialer().Stats()
	stopLoad()
	load.Wait()
	// Fewer: the limit fell. Where it ends depends on when the load's
	// queue drained, and it may have grown back since.
	if under.Decreases <= quiet.Decreases {
		t.Errorf("under load: limit %.1f after %d decreases; on the quiet server: %.1f after %d; want a decrease",
			under.ConnectLimit, under.Decreases, quiet.ConnectLimit, quiet.Decreases)
	}
	t.Logf("quiet: limit %.1f, baseline %v, %d decreases; under load (%d connects of the other client): limit %.1f, %d decreases",
		quiet.ConnectLimit, quiet.Baseline, quiet.Decreases, loads, under.ConnectLimit, under.Decreases)
}
