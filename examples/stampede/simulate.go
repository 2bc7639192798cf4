package main

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
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
// exits from inside it. Its runs (pgxpool, pgstagger, configured) go side
// by side, each in a bubble and against a server of its own (see eachRun
// and launcher); the clock printed at the end is their clocks' sum.
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
	l := newLauncher()
	var others atomic.Int64 // the simulated time of the runs' bubbles
	testing.Main(func(string, string) (bool, error) { return true, nil }, []testing.InternalTest{{
		Name: "stampede",
		F: func(t *testing.T) {
			go synctest.Test(t, func(*testing.T) {
				out := os.Stdout
				var err error
				if o.srv, err = newSimulated(m, o.client == "lite"); err != nil {
					exit(err)
				}
				fmt.Fprintf(out, "simulated postmaster (%s): %s\n", source, describe(m))
				o.srv.sideBySide = func(run func(*server)) func() {
					return l.start(func() {
						srv, err := newSimulated(m, o.client == "lite")
						if err != nil {
							exit(err)
						}
						start := time.Now()
						run(srv)
						others.Add(int64(time.Since(start)))
					})
				}
				simStart := time.Now()
				err = demo(context.Background(), out, o)
				simulated := time.Since(simStart) + time.Duration(others.Load())
				fmt.Fprintf(out, "\nsimulated %.0fs in %.0fs\n", simulated.Seconds(), wallClock().Sub(wallStart).Seconds())
				exit(err)
			})
			l.serve(t)
		},
	}}, nil, nil)
	return nil
}

// newSimulated starts a simulated postmaster modelled by m, in the
// caller's bubble, as the demo's server, for the lite client if lite is
// set.
func newSimulated(m simpg.Model, lite bool) (*server, error) {
	srv, err := simpg.New(m)
	if err != nil {
		return nil, err
	}
	s := &server{url: srv.ConnString(), dial: srv.Dial, lookup: srv.Lookup, restart: srv.Restart}
	if lite {
		s.lite, s.query = true, srv.Query
	}
	return s, nil
}

// A launcher starts bubbles for a bubble, which cannot start one
// (synctest.Test must not be called from a bubble), from a goroutine
// outside every bubble (serve); the channels between bubbles are made
// outside them all, since a bubble's own cannot be used from another.
// Each function it runs ends in its bubble, which then stays, its clock
// stopped, until the demo exits: its fleet's goroutines still wait, and
// synctest.Test would report them as a deadlock if it returned.
type launcher struct {
	reqs  chan func()
	dones chan chan struct{} // start's done channel, made by serve
	never chan struct{}      // never closed
}

func newLauncher() *launcher {
	return &launcher{reqs: make(chan func()), dones: make(chan chan struct{}), never: make(chan struct{})}
}

// start runs f in a bubble of its own and returns a function that waits
// for f to return.
func (l *launcher) start(f func()) (wait func()) {
	l.reqs <- f
	done := <-l.dones
	return func() { <-done }
}

// serve starts the bubbles asked for with t, for ever.
func (l *launcher) serve(t *testing.T) {
	for f := range l.reqs {
		done := make(chan struct{})
		go synctest.Test(t, func(*testing.T) {
			f()
			close(done)
			<-l.never // not durably blocked: the bubble's clock stops
		})
		l.dones <- done
	}
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
