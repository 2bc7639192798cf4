package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstagger/pgstagger/examples/internal/simpg"
	"github.com/pgstagger/pgstagger/internal/engine"
)

// calibrate measures the server for -simulate and writes its model to
// o.calibrate: an idle connect and a query; the postmaster's capacity
// while it takes on fleet × conns backends (as many as the server allows,
// less 50) and while it connects and closes, whose difference is what the
// exits cost; what queries cost; and how long a restart takes holding
// nothing and holding them all, when the demo can restart the server.
func calibrate(ctx context.Context, out io.Writer, o options) error {
	m := simpg.Default
	idle, err := measureIdle(ctx, o.srv, 30)
	if err != nil {
		return err
	}
	m.IdleConnect = simpg.Duration(idle)
	fmt.Fprintf(out, "idle connect %v\n", idle.Round(10*time.Microsecond))
	var restart0 time.Duration
	if o.srv.restart != nil {
		if restart0, err = timeRestart(o.srv); err != nil {
			return err
		}
		fmt.Fprintf(out, "restart holding nothing: %v\n", restart0.Round(time.Millisecond))
	}
	// As the demo measures the budget: connecting and closing.
	closing, err := measureCapacity(ctx, o.srv, 32, 3*time.Second)
	if err != nil {
		return err
	}
	held, err := o.srv.connect(ctx)
	if err != nil {
		return err
	}
	conns := []*pgconn.PgConn{held}
	defer func() {
		for _, c := range conns {
			_ = c.Close(context.Background())
		}
	}()
	q, err := measureSQL(ctx, held, "select 1", 100)
	if err != nil {
		return err
	}
	m.Query = simpg.Duration(q)
	fmt.Fprintf(out, "query %v\n", q.Round(time.Microsecond))

	maxConns, err := intSetting(ctx, held, "max_connections")
	if err != nil {
		return err
	}
	// Capacity as a fleet uses it: connections opened and kept, 32 at a
	// time, in batches, so that each batch's rate is the capacity while
	// the server holds about its midpoint's backends. (Connecting and
	// closing, as the demo measures its budget, also pays for each
	// backend's exit.)
	most := min(o.fleet*o.conns, maxConns-50)
	if most < 1 {
		return fmt.Errorf("max_connections %d leaves no room for the calibration's connections (it keeps 50 free)", maxConns)
	}
	batch := max(50, most/6)
	m.Capacity = nil
	for len(conns) < most {
		from := len(conns)
		n := min(batch, most-from)
		opened, took, err := openKept(ctx, o.srv, n, 32)
		conns = append(conns, opened...)
		if err != nil {
			return fmt.Errorf("holding %d connections: %w", from+n, err)
		}
		rate := float64(n) / took.Seconds()
		fmt.Fprintf(out, "capacity from %d to %d backends: %.0f connections/s\n", from, len(conns), rate)
		m.Capacity = append(m.Capacity, simpg.Point{Backends: from + n/2, PerSecond: rate})
	}
	// What connecting and closing loses against keeping is the exits'.
	m.Cores = runtime.NumCPU()
	m.Exit = simpg.Duration(max(0, float64(m.Cores)*(1/closing-1/m.Capacity[0].PerSecond)) * float64(time.Second))
	fmt.Fprintf(out, "capacity connecting and closing: %.0f connections/s: %v of CPU a backend's exit\n",
		closing, time.Duration(m.Exit).Round(time.Microsecond))
	if err := calibrateQueries(ctx, out, o.srv, &m, held, conns); err != nil {
		return err
	}
	m.MaxConnections = maxConns
	m.Backlog = min(2*maxConns, 4096)
	if o.srv.restart != nil {
		// Restarted holding the connections, as the demo's restart is:
		// the server ends every backend before it stops. Down until the
		// restart returns: the 57P03 phase is too short to see on a
		// server with nothing to recover.
		n := len(conns)
		restart, err := timeRestart(o.srv)
		if err != nil {
			return err
		}
		m.Down, m.Starting = simpg.Duration(restart0), 0
		m.DownPerBackend = simpg.Duration(max(0, restart-restart0) / time.Duration(n))
		fmt.Fprintf(out, "restart holding %d connections: %v\n", n, restart.Round(time.Millisecond))
	}
	if err := m.Save(o.calibrate); err != nil {
		return err
	}
	fmt.Fprintf(out, "model written to %s: go -C examples run ./stampede -simulate -model %s\n", o.calibrate, o.calibrate)
	return nil
}

// openKept opens n connections, workers at a time, and returns them and
// how long they took.
func openKept(ctx context.Context, srv *server, n, workers int) ([]*pgconn.PgConn, time.Duration, error) {
	var (
		mu    sync.Mutex
		conns []*pgconn.PgConn
		first error
		next  atomic.Int64
		wg    sync.WaitGroup
	)
	start := time.Now()
	for range workers {
		wg.Go(func() {
			for next.Add(1) <= int64(n) {
				c, err := srv.connect(ctx)
				mu.Lock()
				if err != nil {
					first = cmp.Or(first, err)
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return conns, time.Since(start), first
}

// calibrateQueries measures, holding conns, what pgstagger's facts queries
// cost per backend, then the CPU a query takes: the capacity the
// postmaster loses while a quarter of the held connections query every
// 100ms, as the demo's restart workers do (all of them would saturate a
// small machine, where the loss is no longer in proportion).
func calibrateQueries(ctx context.Context, out io.Writer, srv *server, m *simpg.Model, held *pgconn.PgConn, conns []*pgconn.PgConn) error {
	n := time.Duration(len(conns))
	base, err := measureSQL(ctx, held, "select 1", 20)
	if err != nil {
		return err
	}
	facts, err := measureSQL(ctx, held, engine.FactsQuery, 20)
	if err != nil {
		return err
	}
	history, err := measureSQL(ctx, held, engine.FactsHistoryQuery, 20)
	if err != nil {
		return err
	}
	m.FactsPerBackend = simpg.Duration(max(0, facts-base) / n)
	m.HistoryPerBackend = simpg.Duration(max(0, history-base) / n)
	fmt.Fprintf(out, "facts queries holding %d: %v and %v (select 1: %v)\n", n, facts.Round(time.Microsecond), history.Round(time.Microsecond), base.Round(time.Microsecond))

	loadCtx, stop := context.WithCancel(ctx)
	var queries atomic.Int64
	var wg sync.WaitGroup
	busyConns := conns[1 : 1+len(conns)/4]
	for _, c := range busyConns {
		wg.Go(func() {
			t := time.NewTicker(100 * time.Millisecond)
			defer t.Stop()
			for loadCtx.Err() == nil {
				if _, err := c.Exec(loadCtx, "select 1").ReadAll(); err == nil {
					queries.Add(1)
				}
				select {
				case <-loadCtx.Done():
				case <-t.C:
				}
			}
		})
	}
	defer func() { stop(); wg.Wait() }()
	time.Sleep(2 * time.Second)
	from, start := queries.Load(), time.Now()
	extra, took, err := openKept(ctx, srv, 50, 32)
	for _, c := range extra {
		_ = c.Close(ctx)
	}
	if err != nil {
		return err
	}
	busy := 50 / took.Seconds()
	rate := float64(queries.Load()-from) / time.Since(start).Seconds()
	idle := m.Capacity[len(m.Capacity)-1].PerSecond
	share := max(0, 1-busy/idle)
	perQuery := share * float64(m.Cores) / rate * float64(time.Second)
	m.QueryCPUPerBackend = simpg.Duration(perQuery / float64(len(conns)))
	fmt.Fprintf(out, "capacity while %d connections query every 100ms (%.0f queries/s): %.0f connections/s, %.0f%% less: %v of CPU a query holding %d\n",
		len(busyConns), rate, busy, 100*share, time.Duration(perQuery).Round(time.Microsecond), len(conns))
	return nil
}

// measureSQL returns the median time of n runs of sql on c.
func measureSQL(ctx context.Context, c *pgconn.PgConn, sql string, n int) (time.Duration, error) {
	var ds []time.Duration
	for range n {
		start := time.Now()
		if _, err := c.Exec(ctx, sql).ReadAll(); err != nil {
			return 0, err
		}
		ds = append(ds, time.Since(start))
	}
	return percentile(ds, 50), nil
}

// timeRestart restarts srv and returns how long it took.
func timeRestart(srv *server) (time.Duration, error) {
	start := time.Now()
	err := srv.restart()
	return time.Since(start), err
}

func intSetting(ctx context.Context, c *pgconn.PgConn, name string) (int, error) {
	rs, err := c.Exec(ctx, "select current_setting('"+name+"')::int").ReadAll()
	if err != nil {
		return 0, err
	}
	var v int
	_, err = fmt.Sscan(string(rs[0].Rows[0][0]), &v)
	return v, err
}
