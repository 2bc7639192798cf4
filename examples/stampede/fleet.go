package main

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/pool"
)

// workerPool is a worker's pool: pgxpool's or pgstagger's (pgxWorker), or
// the lite client's (litePool).
type workerPool interface {
	// work acquires conns connections at once and runs a query on each.
	work(ctx context.Context, conns int) error
	Close()
}

// pgxWorker is a worker's pgxpool or pgstagger pool.
type pgxWorker struct {
	acquirer interface {
		Acquire(ctx context.Context) (*pgxpool.Conn, error)
		Close()
	}
}

func (w pgxWorker) Close() { w.acquirer.Close() }

// Dialer is the pool's Dialer (nil: pgxpool's), for countGates.
func (w pgxWorker) Dialer() *dialer.Dialer {
	if p, ok := w.acquirer.(*pool.Pool); ok {
		return p.Dialer()
	}
	return nil
}

// runConfig is one fleet start.
type runConfig struct {
	name     string
	srv      *server
	fleet    int           // workers, each with a pool of its own
	conns    int           // connections each worker needs
	deadline time.Duration // each worker's deadline, from the fleet's start
	// newPool builds worker i's pool from cfg, which counts its dials.
	newPool func(ctx context.Context, cfg *pgxpool.Config, i int) (workerPool, error)
	// budgeted: the run is configured with the fleet's budget.
	budgeted bool
	// settle is how long a restart run lets the warmed-up fleet run
	// before the restart.
	settle time.Duration
	// every is a restart run's interval between each worker's queries.
	every time.Duration
	// spread is how long a restart run's warm-up takes to start every
	// worker, evenly (0: all at once).
	spread time.Duration
	// watch is how long after the server is up a restart run waits for
	// every worker to be back.
	watch time.Duration
}

// runResult is what one fleet start did.
type runResult struct {
	name      string
	budgeted  bool
	fleet     int
	failed    int
	firstErr  string
	waits     []time.Duration // successful workers, from start to ready
	allReady  time.Duration   // last successful worker ready (0 if none)
	dials     int64           // TCP connections the workers opened
	bystander []sample
	gate      *gateCounts // the pgstagger pools' statistics at the end (nil for pgxpool)
}

// runFleet starts cfg.fleet workers at once. Each creates its pool, then
// acquires cfg.conns connections and runs a query on each, within its
// deadline; it is ready when all succeeded. A bystander connects every 25ms
// throughout.
func runFleet(ctx context.Context, cfg runConfig, by *bystander, show func(string)) (runResult, error) {
	base, err := pgxpool.ParseConfig(cfg.srv.url)
	if err != nil {
		return runResult{}, err
	}
	base.MaxConns = int32(cfg.conns)
	base.MinConns = int32(cfg.conns)
	var dials atomic.Int64
	cfg.srv.configure(&base.ConnConfig.Config)
	dial := base.ConnConfig.DialFunc
	base.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx, network, addr)
	}

	byCtx, stopBy := context.WithCancel(ctx)
	byDone := make(chan struct{})
	go func() { by.run(byCtx); close(byDone) }()
	// Let the bystander show the idle server first.
	time.Sleep(250 * time.Millisecond)

	var (
		mu       sync.Mutex
		res      = runResult{name: cfg.name, budgeted: cfg.budgeted, fleet: cfg.fleet}
		ready    atomic.Int64
		failed   atomic.Int64
		pools    = make([]workerPool, cfg.fleet)
		startGun = make(chan struct{})
		wg       sync.WaitGroup
	)
	for i := range cfg.fleet {
		wg.Go(func() {
			<-startGun
			start := time.Now()
			wctx, cancel := context.WithTimeout(ctx, cfg.deadline)
			defer cancel()
			p, err := cfg.newPool(ctx, base.Copy(), i)
			if err == nil {
				pools[i] = p
				err = p.work(wctx, cfg.conns)
			}
			wait := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed.Add(1)
				res.failed++
				if res.firstErr == "" {
					res.firstErr = err.Error()
				}
				return
			}
			ready.Add(1)
			res.waits = append(res.waits, wait)
			res.allReady = max(res.allReady, wait)
		})
	}
	start := time.Now()
	close(startGun)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
loop:
	for {
		select {
		case <-done:
			break loop
		case <-tick.C:
			if show != nil {
				last, _ := by.last()
				show(fmt.Sprintf("%-10s %5.1fs  ready %5d/%d  failed %5d  bystander's last connect %8s",
					cfg.name, time.Since(start).Seconds(), ready.Load(), cfg.fleet, failed.Load(), last.Round(time.Millisecond)))
			}
		}
	}
	// Watch the server settle, then stop the bystander.
	time.Sleep(500 * time.Millisecond)
	stopBy()
	<-byDone
	res.gate = countGates(pools)
	for _, p := range pools {
		if p != nil {
			p.Close()
		}
	}
	res.dials = dials.Load()
	// Bystander times are relative to its start; shift them to the fleet's.
	offset := start.Sub(by.start)
	for _, s := range by.snapshot() {
		s.at -= offset
		res.bystander = append(res.bystander, s)
	}
	return res, nil
}

func (w pgxWorker) work(ctx context.Context, conns int) error {
	held := make([]*pgxpool.Conn, 0, conns)
	defer func() {
		for _, c := range held {
			c.Release()
		}
	}()
	for range conns {
		c, err := w.acquirer.Acquire(ctx)
		if err != nil {
			return err
		}
		held = append(held, c)
		var one int
		if err := c.QueryRow(ctx, "select 1").Scan(&one); err != nil {
			return err
		}
	}
	return nil
}

func plainPool(ctx context.Context, cfg *pgxpool.Config, _ int) (workerPool, error) {
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return pgxWorker{p}, nil
}

// staggeredPool builds worker i's pgstagger pool with the options opts(i)
// gives.
func staggeredPool(opts func(i int) []pool.Option) func(context.Context, *pgxpool.Config, int) (workerPool, error) {
	return func(ctx context.Context, cfg *pgxpool.Config, i int) (workerPool, error) {
		p, err := pool.NewWithConfig(ctx, cfg, opts(i)...)
		if err != nil {
			return nil, err
		}
		return pgxWorker{p}, nil
	}
}
