package main

import (
	"context"
	"io"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/examples/internal/simpg"
)

// The demo's own fleet, on simulated time against the simulated postmaster:
// plain pgxpool's synchronized start queues the bystander behind the whole
// fleet, a configured pgstagger fleet keeps it near idle, and both get
// every worker in.
// Both clients: pgx's, and the lite one (lite.go), which must run the
// same gate.
func TestSimulatedStartStampedesWithPgxpoolNotConfigured(t *testing.T) {
	for _, client := range []string{"pgx", "lite"} {
		t.Run(client, func(t *testing.T) { simulatedStart(t, client) })
	}
}

// simulatedServer starts the built-in simulated postmaster, with room for
// fleet, inside the test's bubble, and returns it as the demo's server for
// client's connections.
func simulatedServer(t *testing.T, fleet int, client string) (*server, simpg.Model) {
	m := simpg.Default
	m.MaxConnections, m.Backlog = fleet+100, 2*(fleet+100)
	srv, err := simpg.New(m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	s := &server{url: srv.ConnString(), dial: srv.Dial, lookup: srv.Lookup, restart: srv.Restart}
	if client == "lite" {
		s.lite, s.query = true, srv.Query
	}
	return s, m
}

func simulatedStart(t *testing.T, client string) {
	synctest.Test(t, func(t *testing.T) {
		const fleet = 300
		s, m := simulatedServer(t, fleet, client)
		capacity := m.Capacity[0].PerSecond
		budget := capacity / 2
		runs, err := allRuns(options{runs: "pgxpool,configured", fleet: fleet, budget: budget, client: client, srv: s})
		if err != nil {
			t.Fatal(err)
		}
		run := func(rc runConfig) runResult {
			rc.srv, rc.fleet, rc.conns, rc.deadline = s, fleet, 1, time.Minute
			res, err := runFleet(context.Background(), rc, &bystander{srv: s, interval: 25 * time.Millisecond, timeout: time.Minute}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if res.failed > 0 {
				t.Fatalf("%s: %d workers failed: %s", rc.name, res.failed, res.firstErr)
			}
			return res
		}
		plain, configured := run(runs[0]), run(runs[1])
		idle := time.Duration(m.IdleConnect)
		p99 := func(r runResult) time.Duration { return percentile(latencies(r.bystander), 99) }
		// 300 connects at 307/s: the last bystander waits about a second.
		if got := p99(plain); got < 100*idle {
			t.Errorf("pgxpool's bystander p99 %v, want a stampede's (100 × idle %v or more)", got, idle)
		}
		if got := p99(configured); got > 5*idle {
			t.Errorf("configured bystander p99 %v, want within 5 × idle %v", got, idle)
		}
		if want := time.Duration(fleet / budget * float64(time.Second)); configured.allReady > want*11/10 {
			t.Errorf("configured fleet ready after %v, want within its budgeted window %v", configured.allReady, want)
		}
	})
}

// A restart under the fleet's queries, both clients: a fleet with no
// options sees every session the server ended (the lite client reports
// the server's 57P01 to the gate as pgconn's OnPgError does), comes back
// whole, and never dials more in a second than the server takes.
func TestSimulatedRestartSpreadsTheReconnects(t *testing.T) {
	for _, client := range []string{"pgx", "lite"} {
		t.Run(client, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const fleet = 300
				s, m := simulatedServer(t, fleet, client)
				runs, err := allRuns(options{runs: "pgstagger", fleet: fleet, client: client, srv: s})
				if err != nil {
					t.Fatal(err)
				}
				rc := runs[0]
				rc.srv, rc.fleet, rc.conns, rc.every, rc.settle, rc.watch = s, fleet, 1, time.Second, time.Second, time.Minute
				res, err := runRestart(context.Background(), rc, &bystander{srv: s, interval: 25 * time.Millisecond, timeout: time.Minute}, nil)
				if err != nil {
					t.Fatal(err)
				}
				if res.recovered == 0 {
					t.Fatalf("%d of %d workers recovered", len(res.firstOKs), fleet)
				}
				if res.gate == nil {
					t.Fatal("no gate counts")
				}
				if res.gate.lost != fleet {
					t.Errorf("the gates saw %d sessions ended by the server, want %d", res.gate.lost, fleet)
				}
				capacity := m.Capacity[0].PerSecond
				if peak := peakPerSecond(res.answered); float64(peak) > capacity {
					t.Errorf("%d dials reached the server in one second, want at most its capacity %.0f/s", peak, capacity)
				}
			})
		})
	}
}

// A spread warm-up starts worker i's pool at i × spread ÷ fleet, and the
// restart still finds the whole fleet.
func TestSpreadWarmUpStartsWorkersEvenly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const fleet = 30
		s, _ := simulatedServer(t, fleet, "lite")
		runs, err := allRuns(options{runs: "pgxpool", fleet: fleet, client: "lite", srv: s})
		if err != nil {
			t.Fatal(err)
		}
		rc := runs[0]
		rc.srv, rc.fleet, rc.conns, rc.every, rc.settle, rc.watch = s, fleet, 1, time.Second, time.Second, time.Minute
		rc.spread = 3 * time.Second
		begin := time.Now()
		started := make([]time.Duration, fleet)
		newPool := rc.newPool
		rc.newPool = func(ctx context.Context, cfg *pgxpool.Config, i int) (workerPool, error) {
			started[i] = time.Since(begin)
			return newPool(ctx, cfg, i)
		}
		res, err := runRestart(context.Background(), rc, &bystander{srv: s, interval: 25 * time.Millisecond, timeout: time.Minute}, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i, at := range started {
			if want := time.Duration(i) * 100 * time.Millisecond; at != want {
				t.Errorf("worker %d started at %v, want %v", i, at, want)
			}
		}
		if res.recovered == 0 {
			t.Errorf("%d of %d workers recovered", len(res.firstOKs), fleet)
		}
	})
}

// On simulated time the runs go side by side (eachRun with sideBySide),
// each in a bubble of its own against a server of its own, as many at
// once as there are cores: with two, the first two are under way
// together, and the third begins once the first has ended (the second
// may have too). Each lite fleet gets in and queries its own server; the
// results come back in the runs' order.
func TestSimulatedRunsGoSideBySide(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	const fleet = 20
	var (
		mu      sync.Mutex
		queries []*atomic.Int64 // by run, the lite client's on its server
		ended   [3]bool         // by run
		third   []bool          // ended when the third began
	)
	// The first two runs wait for each other (real time bounds the
	// wait, a guard, not the synchronization): one after the other,
	// neither would end.
	arrived, together := make(chan struct{}, 2), make(chan struct{})
	go func() {
		defer close(together)
		for range 2 {
			select {
			case <-arrived:
			case <-time.After(10 * time.Second):
				t.Error("the first two runs were not under way at once")
				return
			}
		}
	}()
	o := options{runs: "pgxpool,pgstagger,configured", fleet: fleet, budget: 100, client: "lite", srv: &server{
		sideBySide: func(run func(*server)) func() {
			done := make(chan struct{})
			go func() {
				// Done once Test has returned: a bubble's test ends
				// after its function, and before its parent must.
				defer close(done)
				synctest.Test(t, func(t *testing.T) {
					s, _ := simulatedServer(t, fleet, "lite")
					n, query := new(atomic.Int64), s.query
					s.query = func(ctx context.Context, pid int, sql string) ([]int, error) {
						n.Add(1)
						return query(ctx, pid, sql)
					}
					mu.Lock()
					queries = append(queries, n)
					mu.Unlock()
					run(s)
				})
			}()
			return func() { <-done }
		},
	}}
	results, err := eachRun(context.Background(), io.Discard, o, time.Millisecond, false,
		func(rc runConfig) string { return rc.name },
		func(rc runConfig, show func(string)) (runResult, error) {
			i := slices.Index([]string{"pgxpool", "pgstagger", "configured"}, rc.name)
			mu.Lock()
			if i == 2 {
				third = slices.Clone(ended[:])
			}
			mu.Unlock()
			if i < 2 {
				arrived <- struct{}{}
				<-together
			}
			rc.fleet, rc.conns, rc.deadline = fleet, 1, time.Minute
			res, err := runFleet(context.Background(), rc, &bystander{srv: rc.srv, interval: 25 * time.Millisecond, timeout: time.Minute}, show)
			mu.Lock()
			ended[i] = true
			mu.Unlock()
			return res, err
		})
	if err != nil {
		t.Fatal(err)
	}
	if len(third) != 3 || !third[0] {
		t.Errorf("when the third run began, the runs had ended: %v, want the first among them", third)
	}
	for i, n := range queries {
		if n.Load() == 0 {
			t.Errorf("no queries on run %d's server", i)
		}
	}
	for i, want := range []string{"pgxpool", "pgstagger", "configured"} {
		if r := results[i]; r.name != want || r.failed > 0 {
			t.Errorf("result %d: %s with %d workers failed (%s), want %s with none", i, r.name, r.failed, r.firstErr, want)
		}
	}
}
