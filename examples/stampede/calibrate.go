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
	m.Cores = runtime.NumCPU()
	// A quarter of the connections at the end query, as the demo's
	// restart workers do (all of them would saturate a small machine,
	// where the loss is no longer in proportion); their load is measured
	// twice, holding little more than them and holding everything, to
	// tell a query's fixed CPU from its CPU per backend held.
	busy := most / 4
	var few queryLoad // the load holding little more than busy
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
		if few.held == 0 && busy > 0 && len(conns) > busy && len(conns) < most {
			if few, err = measureQueryLoad(ctx, out, o.srv, conns, busy, rate, m.Cores); err != nil {
				return err
			}
		}
	}
	// What connecting and closing loses against keeping is the exits'.
	m.Exit = simpg.Duration(max(0, float64(m.Cores)*(1/closing-1/m.Capacity[0].PerSecond)) * float64(time.Second))
	fmt.Fprintf(out, "capacity connecting and closing: %.0f connections/s: %v of CPU a backend's exit\n",
		closing, time.Duration(m.Exit).Round(time.Microsecond))
	if err := calibrateQueries(ctx, out, o.srv, &m, held, conns, busy, few); err != nil {
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
// cost per backend, then the CPU a query takes (see measureQueryLoad) with
// busy of them querying, and with few (the same measured holding fewer,
// if it was), the part of it that is fixed and the part per backend held.
func calibrateQueries(ctx context.Context, out io.Writer, srv *server, m *simpg.Model, held *pgconn.PgConn, conns []*pgconn.PgConn, busy int, few queryLoad) error {
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
	all, err := measureQueryLoad(ctx, out, srv, conns, max(busy, 1), m.Capacity[len(m.Capacity)-1].PerSecond, m.Cores)
	if err != nil {
		return err
	}
	fixed, perBackend := all.split(few)
	m.QueryCPU, m.QueryCPUPerBackend = simpg.Duration(fixed), simpg.Duration(perBackend)
	fmt.Fprintf(out, "a query's CPU: %v, and %v per backend held\n", fixed.Round(time.Microsecond), perBackend)
	return nil
}

// queryLoad is the CPU a query took while the server held held backends
// (held 0: not measured).
type queryLoad struct {
	held     int
	perQuery time.Duration
}

// split fits a query's CPU as a fixed part and a part per backend held to
// l and other (the part per backend alone when other was not measured, or
// when the two do not rise with the backends held).
func (l queryLoad) split(other queryLoad) (fixed, perBackend time.Duration) {
	if other.held == 0 || other.held == l.held {
		return 0, l.perQuery / time.Duration(l.held)
	}
	b := float64(l.perQuery-other.perQuery) / float64(l.held-other.held)
	a := float64(l.perQuery) - b*float64(l.held)
	switch {
	case b <= 0:
		return (l.perQuery + other.perQuery) / 2, 0
	case a < 0:
		return 0, l.perQuery / time.Duration(l.held)
	}
	return time.Duration(a), time.Duration(b)
}

// measureQueryLoad measures, holding conns, the CPU a query takes: the
// capacity the postmaster loses, against idle (connects a second holding
// as many), while busy of the connections query every 100ms.
func measureQueryLoad(ctx context.Context, out io.Writer, srv *server, conns []*pgconn.PgConn, busy int, idle float64, cores int) (queryLoad, error) {
	loadCtx, stop := context.WithCancel(ctx)
	var queries atomic.Int64
	var wg sync.WaitGroup
	busyConns := conns[len(conns)-busy:]
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
		return queryLoad{}, err
	}
	loaded := 50 / took.Seconds()
	rate := float64(queries.Load()-from) / time.Since(start).Seconds()
	time.Sleep(time.Second) // the extra backends' exits, before the next measurement
	share := max(0, 1-loaded/idle)
	perQuery := time.Duration(share * float64(cores) / rate * float64(time.Second))
	fmt.Fprintf(out, "capacity holding %d while %d of them query every 100ms (%.0f queries/s): %.0f connections/s, %.0f%% less: %v of CPU a query\n",
		len(conns), len(busyConns), rate, loaded, 100*share, perQuery.Round(time.Microsecond))
	return queryLoad{held: len(conns), perQuery: perQuery}, nil
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
