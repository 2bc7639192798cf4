package main

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pgstagger/pgstagger/examples/internal/simpg"
	"github.com/pgstagger/pgstagger/pool"
)

// The demo's own fleet, on simulated time against the simulated postmaster:
// plain pgxpool's synchronized start queues the bystander behind the whole
// fleet, a configured pgstagger fleet keeps it near idle, and both get
// every worker in.
func TestSimulatedStartStampedesWithPgxpoolNotConfigured(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const fleet = 300
		m := simpg.Default
		m.MaxConnections, m.Backlog = fleet+100, 2*(fleet+100)
		srv, err := simpg.New(m)
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		s := &server{url: srv.ConnString(), dial: srv.Dial, lookup: srv.Lookup, restart: srv.Restart}
		capacity := m.Capacity[0].PerSecond
		budget := capacity / 2
		run := func(rc runConfig) runResult {
			rc.srv, rc.fleet, rc.conns, rc.deadline = s, fleet, 1, time.Minute
			res, err := runFleet(context.Background(), rc, &bystander{srv: s, interval: 25 * time.Millisecond, timeout: time.Minute}, false)
			if err != nil {
				t.Fatal(err)
			}
			if res.failed > 0 {
				t.Fatalf("%s: %d workers failed: %s", rc.name, res.failed, res.firstErr)
			}
			return res
		}
		plain := run(runConfig{name: "pgxpool", newPool: plainPool})
		configured := run(runConfig{name: "configured", newPool: staggeredPool(func(i int) []pool.Option {
			return []pool.Option{pool.WithFleet(fleet, budget), pool.WithFleetMember(i)}
		})})
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
