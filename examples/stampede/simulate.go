package main

import (
	"context"
	"fmt"
	"os"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pgstagger/pgstagger/examples/internal/simpg"
)

// simulate runs the demo against a simulated postmaster (package simpg) in
// a testing/synctest bubble: time is simulated, and advances whenever every
// goroutine of the demo, the fleet's pgx, pgxpool and pgstagger code and
// the simulated server waits, so a fleet of any size runs through the real
// pools and gates in what its CPU work takes. synctest gives its bubbles
// only to tests, so the demo runs as the one test of testing.Main, and
// exits from inside it.
func simulate(o options) error {
	m := simpg.Default
	source := "a 2-core development machine's PostgreSQL 15 (built in)"
	if o.model != "" {
		var err error
		if m, err = simpg.Load(o.model); err != nil {
			return fmt.Errorf("-model: %w", err)
		}
		source = o.model
	}
	if o.capacity != "" {
		var err error
		if m, err = m.ParseCapacity(o.capacity); err != nil {
			return fmt.Errorf("-capacity: %w", err)
		}
		source += ", capacity " + o.capacity
	}
	// As the demo's throwaway cluster: room for the fleet and the rest.
	m.MaxConnections = o.fleet*o.conns + 100
	m.Backlog = min(2*m.MaxConnections, 4096)
	if err := m.Validate(); err != nil {
		return err
	}
	wallStart := wallClock()
	testing.Main(func(string, string) (bool, error) { return true, nil }, []testing.InternalTest{{
		Name: "stampede",
		F: func(t *testing.T) {
			synctest.Test(t, func(*testing.T) {
				out := os.Stdout
				srv, err := simpg.New(m)
				if err != nil {
					exit(err)
				}
				fmt.Fprintf(out, "simulated postmaster (%s): %s\n", source, describe(m))
				o.srv = &server{url: srv.ConnString(), dial: srv.Dial, lookup: srv.Lookup, restart: srv.Restart}
				if o.client == "lite" {
					o.srv.lite, o.srv.query = true, srv.Query
				}
				simStart := time.Now()
				err = demo(context.Background(), out, o)
				fmt.Fprintf(out, "\nsimulated %.0fs in %.0fs\n", time.Since(simStart).Seconds(), wallClock().Sub(wallStart).Seconds())
				exit(err)
			})
		},
	}}, nil, nil)
	return nil
}

// exit ends the simulation: the fleet's pools and the server have
// goroutines still waiting, which synctest.Test would report as a
// deadlock if the test returned.
func exit(err error) {

	if err != nil {
		fmt.Fprintln(os.Stderr, "stampede:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// wallClock is the real time, which time.Now is not inside a bubble.
func wallClock() time.Time {
	var tv syscall.Timeval
	_ = syscall.Gettimeofday(&tv)
	return time.Unix(tv.Unix())
}

func describe(m simpg.Model) string {
	s := "capacity"
	for _, p := range m.Capacity {
		s += fmt.Sprintf(" %.0f/s at %d,", p.PerSecond, p.Backends)
	}
	return s + fmt.Sprintf(" backends; idle connect %v; a restart down %v + %v per backend, then starting %v",
		time.Duration(m.IdleConnect), time.Duration(m.Down), time.Duration(m.DownPerBackend), time.Duration(m.Starting))
}
