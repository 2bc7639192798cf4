// Command stampede shows what a synchronized fleet start does to a
// PostgreSQL server, with plain pgxpool and with pgstagger, side by side.
//
// It starts a throwaway cluster (or uses -url), measures the postmaster's
// capacity (connections admitted per second at saturation) and an idle
// connect, then starts the same fleet once for each of -runs (plain
// pgxpool, pgstagger with no options, pgstagger configured), one run after
// another: -fleet workers, each with a pool of its own as separate
// processes would have, all at the same instant, each acquiring -conns
// connections within -deadline. A bystander client opens a fresh
// connection every 25ms or more throughout and records how long the
// postmaster takes to let it in. It prints a table and writes an SVG chart
// of the bystander's connect latency over time. -scenario restart restarts
// the server under a fleet that keeps its connections instead; -simulate
// runs any scenario against a simulated postmaster, the runs side by side
// (see simulate).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"time"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/testdb"
	"github.com/pgstagger/pgstagger/pool"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "stampede:", err)
		os.Exit(1)
	}
}

type options struct {
	url       string
	scenario  string
	runs      string
	fleet     int
	fleetSet  bool // -fleet given: never scaled
	connsSet  bool // -conns given
	conns     int
	deadline  time.Duration
	budget    float64
	chart     string
	bystander time.Duration // interval between the bystander's connects
	every     time.Duration // restart: each worker's interval between queries
	warmUp    string        // restart: together, or spread over the budgeted window

	simulate  bool   // against the simulated postmaster, on simulated time
	model     string // the simulated postmaster's model, from -calibrate ('' built in)
	capacity  string // overrides the model's capacity
	calibrate string // measure the server, write the model here, and stop
	client    string // with simulate: pgx, or lite (see lite.go)

	srv *server
}

// maxWindow bounds the pgstagger run when -fleet is not given: on a server
// too slow for the default fleet within it, the fleet is scaled down so the
// demo finishes in about a minute.
const maxWindow = 20 * time.Second

func run() error {
	var o options
	flag.StringVar(&o.url, "url", "", "PostgreSQL connection string (its max_connections must exceed fleet × conns); empty starts a throwaway local cluster")
	flag.StringVar(&o.scenario, "scenario", "start", "start: a synchronized fleet start; pools: the same with 60 workers × 25 connections; restart: a fleet holding connections through a server restart")
	flag.StringVar(&o.runs, "runs", "pgxpool,pgstagger,configured", "the runs, in order: pgxpool, pgstagger (no options), configured (WithFleet and WithFleetMember)")
	flag.IntVar(&o.fleet, "fleet", 1500, "workers, each with a pool of its own")
	flag.IntVar(&o.conns, "conns", 1, "connections each worker needs")
	flag.DurationVar(&o.deadline, "deadline", 30*time.Second, "each worker's deadline, from the fleet's start")
	flag.Float64Var(&o.budget, "budget", 0, "new connections per second the server should absorb from the whole fleet (0: half the measured capacity)")
	flag.StringVar(&o.chart, "chart", "stampede.svg", "SVG chart of the bystander's connect latency ('' for none)")
	flag.DurationVar(&o.every, "query-every", 100*time.Millisecond, "restart: each worker's interval between queries")
	flag.StringVar(&o.warmUp, "warm-up", "together", "restart: how the fleet starts before the restart, together (at once, as in -scenario start) or spread (worker i at i × the budgeted window ÷ fleet, a fleet that grew at its budget: for fleets that could not start together, such as 100,000 workers simulated)")
	flag.BoolVar(&o.simulate, "simulate", false, "run against a simulated postmaster on simulated time (see -model, -capacity)")
	flag.StringVar(&o.model, "model", "", "with -simulate: the postmaster's model, a file written by -calibrate (empty: a 2-core development machine's)")
	flag.StringVar(&o.capacity, "capacity", "", "with -simulate: connects per second at saturation, the model's curve scaled to it (1400), or backends:rate points (0:1400,1500:900); the model's CPU costs scale alike")
	flag.StringVar(&o.client, "client", "pgx", "with -simulate: the fleet's client, pgx (pgx and pgxpool, as against a real server) or lite (pgstagger's gate and server facts reads driven by a minimal protocol client, pgxpool's behaviour for one connection; for fleets of 100,000)")
	flag.StringVar(&o.calibrate, "calibrate", "", "measure the server (-url or the throwaway cluster) for -simulate, write its model to this file, and stop")
	flag.Parse()
	flag.Visit(func(f *flag.Flag) {
		o.fleetSet = o.fleetSet || f.Name == "fleet"
		o.connsSet = o.connsSet || f.Name == "conns"
	})
	if o.scenario == "pools" {
		// Services hold pools of several connections.
		if !o.fleetSet {
			o.fleet = 60
		}
		if !o.connsSet {
			o.conns = 25
		}
	}
	if o.fleet < 1 || o.conns < 1 || o.deadline <= 0 || o.budget < 0 || o.every <= 0 {
		return fmt.Errorf("-fleet and -conns must be at least 1, -deadline and -query-every positive and -budget not negative")
	}
	if o.warmUp != "together" && o.warmUp != "spread" {
		return fmt.Errorf("-warm-up %q: want together or spread", o.warmUp)
	}
	if o.simulate {
		if o.url != "" || o.calibrate != "" {
			return fmt.Errorf("-simulate runs against the simulated postmaster: not with -url or -calibrate")
		}
		switch {
		case o.client != "pgx" && o.client != "lite":
			return fmt.Errorf("-client %q: want pgx or lite", o.client)
		case o.client == "lite" && o.conns != 1:
			return fmt.Errorf("-client lite: workers of one connection only (-scenario start or restart, -conns 1), not %d", o.conns)
		}
		return simulate(o)
	}
	if o.model != "" || o.capacity != "" || o.client != "pgx" {
		return fmt.Errorf("-model, -capacity and -client describe the simulation: use them with -simulate")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	out := os.Stdout
	o.srv = &server{url: o.url}
	if o.url == "" {
		fmt.Fprintf(out, "starting a throwaway PostgreSQL cluster (max_connections %d)...\n", o.fleet*o.conns+100)
		c, err := testdb.Start(testdb.Options{Settings: map[string]string{
			"max_connections": fmt.Sprint(o.fleet*o.conns + 100),
			// The demo watches the postmaster, not the log.
			"log_connections": "off",
		}})
		if err != nil {
			return err
		}
		defer c.Close()
		o.srv = &server{url: c.ConnString(""), restart: c.Restart}
	}
	if o.calibrate != "" {
		return calibrate(ctx, out, o)
	}
	return demo(ctx, out, o)
}

// demo measures the server, then runs the scenario on it.
func demo(ctx context.Context, out io.Writer, o options) error {
	progress := isTerminal(os.Stderr)
	idle, err := measureIdle(ctx, o.srv, 30)
	if err != nil {
		return err
	}
	capacity, err := measureCapacity(ctx, o.srv, 32, 3*time.Second)
	if err != nil {
		return err
	}
	// The bystander connects every 25ms, or less often on a server so
	// slow that it would take more than a tenth of its capacity.
	o.bystander = max(25*time.Millisecond, time.Duration(float64(time.Second)/(capacity/10)))
	byRate := float64(time.Second) / float64(o.bystander)
	if o.budget == 0 {
		o.budget = (capacity - byRate) / 2
	}
	fmt.Fprintf(out, "postmaster capacity %.0f connections/s, idle connect %v\n", capacity, idle.Round(10*time.Microsecond))
	fmt.Fprintf(out, "bystander connects every %v; pgstagger budget %.0f connections/s (half of what the bystander leaves)\n",
		o.bystander, o.budget)
	if need := float64(o.fleet * o.conns); !o.fleetSet && need/o.budget > maxWindow.Seconds() {
		o.fleet = max(1, int(o.budget*maxWindow.Seconds())/o.conns)
		fmt.Fprintf(out, "this server is too slow for %.0f connections in %v at that budget: fleet scaled to %d workers (set -fleet to choose)\n",
			need, maxWindow, o.fleet)
	}
	fmt.Fprintln(out)

	switch o.scenario {
	case "start", "pools":
		return startScenario(ctx, out, o, idle, capacity, progress)
	case "restart":
		return restartScenario(ctx, out, o, idle, capacity, progress)
	}
	return fmt.Errorf("-scenario %q: want start, pools or restart", o.scenario)
}

func startScenario(ctx context.Context, out io.Writer, o options, idle time.Duration, capacity float64, progress bool) error {
	results, err := eachRun(ctx, out, o, idle, progress,
		func(rc runConfig) string {
			return fmt.Sprintf("%s: %d workers × %d connection(s) start at once...", rc.name, o.fleet, o.conns)
		},
		func(rc runConfig, show func(string)) (runResult, error) {
			rc.fleet, rc.conns, rc.deadline = o.fleet, o.conns, o.deadline
			return runFleet(ctx, rc, &bystander{srv: rc.srv, interval: o.bystander, timeout: 60 * time.Second}, show)
		})
	if err != nil {
		return err
	}
	fmt.Fprintln(out)
	report(out, o, idle, capacity, results)
	if o.chart != "" {
		if err := writeChart(o.chart, chartTitle(o, capacity), "seconds since the fleet started", idle, results); err != nil {
			return err
		}
		fmt.Fprintf(out, "\nchart of the bystander's connect latency: %s\n", o.chart)
	}
	return nil
}

func chartTitle(o options, capacity float64) string {
	return fmt.Sprintf("%d workers × %d connection start; postmaster capacity %.0f/s, pgstagger budget %.0f/s",
		o.fleet, o.conns, capacity, o.budget)
}

// tableRow returns a printer of one table row: label, then one cell per
// result.
func tableRow[R any](out io.Writer, rs []R) func(label string, cell func(R) string) {
	return func(label string, cell func(R) string) {
		fmt.Fprintf(out, "%-36s", label)
		for _, r := range rs {
			fmt.Fprintf(out, " %22s", cell(r))
		}
		fmt.Fprintln(out)
	}
}

// report prints the side-by-side table.
func report(out io.Writer, o options, idle time.Duration, capacity float64, rs []runResult) {
	need := float64(o.fleet * o.conns)
	limit := time.Duration(need / capacity * float64(time.Second))
	planned := time.Duration(need / o.budget * float64(time.Second))
	row := tableRow(out, rs)
	row("", func(r runResult) string { return r.name })
	row("failed workers", func(r runResult) string { return fmt.Sprintf("%d/%d", r.failed, r.fleet) })
	row("all workers ready after", func(r runResult) string {
		if r.failed > 0 {
			return "never"
		}
		return sec(r.allReady)
	})
	row(fmt.Sprintf("  physical limit %.0f ÷ %.0f/s", need, capacity), func(runResult) string { return sec(limit) })
	row(fmt.Sprintf("  budgeted %.0f ÷ %.0f/s", need, o.budget), func(r runResult) string {
		if r.budgeted {
			return sec(planned)
		}
		return "-"
	})
	row("worker wait p50 / p99", func(r runResult) string {
		return sec(percentile(r.waits, 50)) + " / " + sec(percentile(r.waits, 99))
	})
	row("bystander connect p50 / p99 / max", func(r runResult) string { return bystanderLatency(r.bystander) })
	row(fmt.Sprintf("  × idle connect (%s)", ms(idle)), func(r runResult) string { return bystanderTimesIdle(r.bystander, idle) })
	row("bystander connects failed", func(r runResult) string { return bystanderFailed(r.bystander) })
	row("server connections opened", func(r runResult) string { return fmt.Sprint(r.dials) })
	row("pacer decreases; baseline p50 / max", func(r runResult) string { return pacerCell(r.gate) })
	for _, r := range rs {
		if r.firstErr != "" {
			fmt.Fprintf(out, "\n%s's first worker error: %s\n", r.name, oneLine(r.firstErr))
		}
	}
}

// allRuns is the fleet run up to three times (-runs): plain pgxpool,
// pgstagger with no options, and pgstagger configured: budgeted for the
// fleet, each worker given its index.
func allRuns(o options) ([]runConfig, error) {
	all := []runConfig{
		{name: "pgxpool", newPool: plainPool},
		{name: "pgstagger", newPool: staggeredPool(func(int) []pool.Option { return nil })},
		{name: "configured", budgeted: true, newPool: staggeredPool(func(i int) []pool.Option {
			return []pool.Option{pool.WithFleet(o.fleet, o.budget), pool.WithFleetMember(i)}
		})},
	}
	if o.client == "lite" {
		var query queryFunc
		if o.srv != nil {
			query = o.srv.query
		}
		all[0].newPool = litePlainPool(query)
		all[1].newPool = liteStaggeredPool(query, func(int) []dialer.Option { return nil })
		all[2].newPool = liteStaggeredPool(query, func(i int) []dialer.Option {
			return []dialer.Option{dialer.WithFleet(o.fleet, o.budget), dialer.WithFleetMember(i)}
		})
	}
	var runs []runConfig
	for _, name := range strings.Split(o.runs, ",") {
		i := slices.IndexFunc(all, func(rc runConfig) bool { return rc.name == name })
		if i < 0 {
			return nil, fmt.Errorf("-runs %q: want a list of pgxpool, pgstagger and configured", o.runs)
		}
		runs = append(runs, all[i])
	}
	return runs, nil
}

// bystanderFailed is how many of the bystander's connects failed.
func bystanderFailed(ss []sample) string {
	n := 0
	for _, s := range ss {
		if s.failed {
			n++
		}
	}
	return fmt.Sprintf("%d/%d", n, len(ss))
}

// bystanderLatency is the p50 / p99 / max of the bystander's successful
// connects.
func bystanderLatency(ss []sample) string {
	l := latencies(ss)
	return ms(percentile(l, 50)) + " / " + ms(percentile(l, 99)) + " / " + ms(percentile(l, 100))
}

// bystanderTimesIdle is bystanderLatency in multiples of an idle connect.
func bystanderTimesIdle(ss []sample, idle time.Duration) string {
	l := latencies(ss)
	return fmt.Sprintf("%.0f× / %.0f× / %.0f×", ratio(percentile(l, 50), idle), ratio(percentile(l, 99), idle), ratio(percentile(l, 100), idle))
}

func sec(d time.Duration) string { return fmt.Sprintf("%.2fs", d.Seconds()) }

func ms(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.0fms", float64(d)/float64(time.Millisecond))
}

func ratio(a, b time.Duration) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// isTerminal reports whether f is a character device (a terminal).
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
