package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/dialer"
)

// restartResult is what one fleet did through a server restart. Times are
// from the moment the restart began.
type restartResult struct {
	runResult
	up        time.Duration   // server accepting again
	recovered time.Duration   // every worker had a query succeed after up (0: not all did)
	firstOKs  []time.Duration // each worker's first success after up, for those that had one
	dialTimes []time.Duration // every dial the fleet made
	answered  []time.Duration // ... that reached a listening server (not refused)
	// gate is what pgstagger's gates counted from the restart on (nil for
	// pgxpool).
	gate *gateCounts
}

// gateCounts sums the fleet's pgstagger gate statistics.
type gateCounts struct {
	refunds, cancelsSkipped, cancelDials, cancelsShed int64
	decreases                                         int64           // the pacers' decreases
	baselines                                         []time.Duration // each pacer's baseline
	lost                                              int64           // sessions the server ended, seen
	windows                                           []time.Duration // each gate's recovery window
}

// countGates sums the Stats of pools that are pgstagger's, or returns nil.
func countGates(pools []workerPool) *gateCounts {
	var g *gateCounts
	for _, p := range pools {
		gp, ok := p.(interface{ Dialer() *dialer.Dialer })
		if !ok || gp.Dialer() == nil {
			continue
		}
		if g == nil {
			g = &gateCounts{}
		}
		s := gp.Dialer().Stats()
		g.refunds += s.Refunds
		g.cancelsSkipped += s.CancelsSkipped
		g.cancelDials += s.CancelDials
		g.cancelsShed += s.CancelsShed
		g.decreases += s.Decreases
		g.lost += s.Lost
		g.windows = append(g.windows, s.RecoveryWindow)
		if s.Baseline > 0 {
			g.baselines = append(g.baselines, s.Baseline)
		}
	}
	return g
}

// pacerCell is the pacers' decreases and their baselines' p50 / max.
func pacerCell(g *gateCounts) string {
	if g == nil || len(g.baselines) == 0 {
		return "-"
	}
	l := slices.Sorted(slices.Values(g.baselines))
	return fmt.Sprintf("%d; %s / %s", g.decreases, ms(percentile(l, 50)), ms(percentile(l, 100)))
}

func restartScenario(ctx context.Context, out io.Writer, o options, idle time.Duration, capacity float64, progress bool) error {
	if o.srv.restart == nil {
		return errors.New("-scenario restart restarts the server: it needs the throwaway cluster, not -url")
	}
	// A restart in the fleet's steady state, not within a window of its
	// start: by then every bucket has refilled.
	settle := time.Duration(float64(o.fleet*o.conns) / o.budget * float64(time.Second))
	// How long the demo waits for every worker to be back: three
	// budgeted windows, a minute at least.
	watch := max(time.Minute, 3*settle)
	warm := "warm up"
	if o.warmUp == "spread" {
		warm = fmt.Sprintf("start over %s", sec(settle))
	}
	results, err := eachRun(ctx, out, o, idle, progress,
		func(rc runConfig) string {
			return fmt.Sprintf("%s: %d workers × %d connection(s) %s, then the server restarts...", rc.name, o.fleet, o.conns, warm)
		},
		func(rc runConfig, show func(string)) (restartResult, error) {
			rc.fleet, rc.conns, rc.every = o.fleet, o.conns, o.every
			rc.settle, rc.watch = settle, watch
			if o.warmUp == "spread" {
				rc.spread = settle
			}
			return runRestart(ctx, rc, &bystander{srv: rc.srv, interval: o.bystander, timeout: 60 * time.Second}, show)
		})
	if err != nil {
		return err
	}
	fmt.Fprintln(out)
	row := tableRow(out, results)
	row("", func(r restartResult) string { return r.name })
	row("server accepting again after", func(r restartResult) string { return sec(r.up) })
	row("all workers recovered after", func(r restartResult) string {
		if r.recovered == 0 {
			return fmt.Sprintf("not within %.0fs", watch.Seconds())
		}
		return sec(r.recovered)
	})
	row("workers recovered p50 / p90 / p99", func(r restartResult) string {
		l := slices.Sorted(slices.Values(r.firstOKs))
		cell := ""
		for i, p := range []float64{50, 90, 99} {
			if i > 0 {
				cell += " / "
			}
			if n := int(p / 100 * float64(o.fleet)); n < len(l) {
				cell += fmt.Sprintf("%.1fs", l[n].Seconds())
			} else {
				cell += "-"
			}
		}
		return cell
	})
	row(fmt.Sprintf("  budgeted %d ÷ %.0f/s after up", o.fleet*o.conns, o.budget), func(r restartResult) string {
		if r.budgeted {
			return sec(time.Duration(float64(o.fleet*o.conns) / o.budget * float64(time.Second)))
		}
		return "-"
	})
	row("peak dials in one second (refused too)", func(r restartResult) string { return fmt.Sprint(peakPerSecond(r.dialTimes)) })
	row("  not refused", func(r restartResult) string { return fmt.Sprint(peakPerSecond(r.answered)) })
	// The fleet's own queries load the server: the bystander's connects in
	// the seconds before the restart are the steady state to compare with.
	row("bystander before the restart p50 / p99", func(r restartResult) string {
		l := latencies(r.before())
		return ms(percentile(l, 50)) + " / " + ms(percentile(l, 99))
	})
	row(fmt.Sprintf("  × idle connect (%s)", ms(idle)), func(r restartResult) string {
		l := latencies(r.before())
		return fmt.Sprintf("%.0f× / %.0f×", ratio(percentile(l, 50), idle), ratio(percentile(l, 99), idle))
	})
	row("bystander connects before / in recovery", func(r restartResult) string {
		return fmt.Sprintf("%d / %d", len(latencies(r.before())), len(latencies(r.after())))
	})
	row("bystander in recovery p50 / p99 / max", func(r restartResult) string { return bystanderLatency(r.after()) })
	row(fmt.Sprintf("  × idle connect (%s)", ms(idle)), func(r restartResult) string { return bystanderTimesIdle(r.after(), idle) })
	row("  p99 × p99 before the restart", func(r restartResult) string {
		return fmt.Sprintf("%.1f×", ratio(percentile(latencies(r.after()), 99), percentile(latencies(r.before()), 99)))
	})
	row("bystander connects failed (server down)", func(r restartResult) string { return bystanderFailed(r.after()) })
	row("dials during recovery (refused ones too)", func(r restartResult) string { return fmt.Sprint(len(r.dialTimes)) })
	row("  tokens given back (nothing forked)", func(r restartResult) string {
		if r.gate == nil {
			return "-"
		}
		return fmt.Sprint(r.gate.refunds)
	})
	row("cancels dialed / skipped (process 0) / not sent", func(r restartResult) string {
		if r.gate == nil {
			return "-"
		}
		return fmt.Sprintf("%d / %d / %d", r.gate.cancelDials, r.gate.cancelsSkipped, r.gate.cancelsShed)
	})
	row("pacer decreases; baseline p50 / max", func(r restartResult) string { return pacerCell(r.gate) })
	row("sessions ended by the server, seen", func(r restartResult) string {
		if r.gate == nil {
			return "-"
		}
		return fmt.Sprint(r.gate.lost)
	})
	row("reconnect window at the restart p50 / max", func(r restartResult) string {
		if r.gate == nil || len(r.gate.windows) == 0 {
			return "-"
		}
		l := slices.Sorted(slices.Values(r.gate.windows))
		return fmt.Sprintf("%s / %s", sec(percentile(l, 50)), sec(percentile(l, 100)))
	})
	fmt.Fprintln(out, "\ndials per second since the restart began (second:count):")
	for _, r := range results {
		h := map[int]int{}
		last := 0
		for _, t := range r.dialTimes {
			h[int(t.Seconds())]++
			last = max(last, int(t.Seconds()))
		}
		fmt.Fprintf(out, "  %-10s", r.name)
		for sec := 0; sec <= last; sec++ {
			if h[sec] > 0 {
				fmt.Fprintf(out, " %d:%d", sec, h[sec])
			}
		}
		fmt.Fprintln(out)
	}
	if o.chart != "" {
		var rs []runResult
		for _, r := range results {
			rs = append(rs, r.runResult)
		}
		title := fmt.Sprintf("%d workers × %d connection, server restart at 0s; capacity %.0f/s, budget %.0f/s", o.fleet, o.conns, capacity, o.budget)
		if err := writeChart(o.chart, title, "seconds since the restart began", idle, rs); err != nil {
			return err
		}
		fmt.Fprintf(out, "\nchart of the bystander's connect latency: %s\n", o.chart)
		var names []string
		var dials [][]time.Duration
		for _, r := range results {
			names, dials = append(names, r.name), append(dials, r.dialTimes)
		}
		rateChart := strings.TrimSuffix(o.chart, ".svg") + "-rate.svg"
		if err := writeRateChart(rateChart, title, "seconds since the restart began", capacity, names, dials); err != nil {
			return err
		}
		fmt.Fprintf(out, "chart of the dials per second: %s\n", rateChart)
	}
	return nil
}

// before is the bystander's samples before the restart, after those from
// its beginning on.
func (r restartResult) before() []sample {
	return slices.DeleteFunc(slices.Clone(r.bystander), func(s sample) bool { return s.at >= 0 })
}

func (r restartResult) after() []sample {
	return slices.DeleteFunc(slices.Clone(r.bystander), func(s sample) bool { return s.at < 0 })
}

// peakPerSecond is the most dials in any one-second window.
func peakPerSecond(ts []time.Duration) int {
	sorted := slices.Sorted(slices.Values(ts))
	peak := 0
	for i, j := 0, 0; j < len(sorted); j++ {
		for sorted[j]-sorted[i] >= time.Second {
			i++
		}
		peak = max(peak, j-i+1)
	}
	return peak
}

// steadyState is how long the bystander measures the loaded steady state
// before the restart, for its p99 to be compared with the recovery's, which
// takes 50-160 of its connects on a slow machine. Over 3s it made 14-15,
// whose p99 is their slowest: about a 94th percentile, below the
// recovery's p99 of the same distribution.
const steadyState = 15 * time.Second

// runRestart warms a fleet up, restarts the server under it and watches it
// recover. Each worker queries every cfg.every (100ms by default) with a
// 2s deadline.
func runRestart(ctx context.Context, cfg runConfig, by *bystander, show func(string)) (restartResult, error) {
	base, err := pgxpool.ParseConfig(cfg.srv.url)
	if err != nil {
		return restartResult{}, err
	}
	base.MaxConns, base.MinConns = int32(cfg.conns), int32(cfg.conns)
	var (
		mu        sync.Mutex
		restartAt time.Time // zero until the restart begins
		dialTimes []time.Duration
		answered  []time.Duration
	)
	cfg.srv.configure(&base.ConnConfig.Config)
	dial := base.ConnConfig.DialFunc
	base.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		at := time.Now()
		conn, err := dial(ctx, network, addr)
		mu.Lock()
		if !restartAt.IsZero() {
			dialTimes = append(dialTimes, at.Sub(restartAt))
			if !errors.Is(err, syscall.ECONNREFUSED) {
				answered = append(answered, at.Sub(restartAt))
			}
		}
		mu.Unlock()
		return conn, err
	}

	lastOK := make([]atomic.Int64, cfg.fleet)  // unix nanos of each worker's last success
	firstOK := make([]atomic.Int64, cfg.fleet) // ... and of its first after the server was up
	var upNanos atomic.Int64                   // when the server was up again (0: not yet)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	pools := make([]workerPool, cfg.fleet)
	defer func() {
		close(stop)
		wg.Wait()
		for _, p := range pools {
			if p != nil {
				p.Close()
			}
		}
	}()
	// Warm-up, not measured: start the workers, at once or spread, wait
	// until every worker has succeeded, then for the fleet to settle.
	warmStart := time.Now()
	for i := range cfg.fleet {
		if at := warmStart.Add(cfg.spread * time.Duration(i) / time.Duration(cfg.fleet)); time.Until(at) > 0 {
			if err := sleepCtx(ctx, time.Until(at)); err != nil {
				return restartResult{}, err
			}
		}
		p, err := cfg.newPool(ctx, base.Copy(), i)
		if err != nil {
			return restartResult{}, err
		}
		pools[i] = p
		wg.Go(func() {
			t := time.NewTicker(cfg.every)
			defer t.Stop()
			for {
				qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				if p.work(qctx, cfg.conns) == nil {
					now := time.Now().UnixNano()
					lastOK[i].Store(now)
					if up := upNanos.Load(); up != 0 && now >= up {
						firstOK[i].CompareAndSwap(0, now)
					}
				}
				cancel()
				select {
				case <-stop:
					return
				case <-t.C:
				}
			}
		})
	}
	for !allSince(lastOK, time.Time{}) {
		if show != nil {
			n := 0
			for i := range lastOK {
				if lastOK[i].Load() != 0 {
					n++
				}
			}
			show(fmt.Sprintf("%-10s %5.1fs warming up  ready %5d/%d", cfg.name, time.Since(warmStart).Seconds(), n, cfg.fleet))
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return restartResult{}, err
		}
	}
	if err := sleepCtx(ctx, cfg.settle); err != nil {
		return restartResult{}, err
	}

	byCtx, stopBy := context.WithCancel(ctx)
	defer stopBy()
	byDone := make(chan struct{})
	go func() { by.run(byCtx); close(byDone) }()
	// The loaded steady state, for comparison.
	if err := sleepCtx(ctx, steadyState); err != nil {
		return restartResult{}, err
	}
	before := countGates(pools)
	mu.Lock()
	restartAt = time.Now()
	mu.Unlock()
	if err := cfg.srv.restart(); err != nil {
		return restartResult{}, err
	}
	upAt := time.Now()
	upNanos.Store(upAt.UnixNano())
	res := restartResult{runResult: runResult{name: cfg.name, budgeted: cfg.budgeted, fleet: cfg.fleet}, up: upAt.Sub(restartAt)}
	deadline := upAt.Add(cfg.watch)
	for time.Now().Before(deadline) {
		if allSince(lastOK, upAt) {
			latest := int64(0)
			for i := range lastOK {
				latest = max(latest, lastOK[i].Load())
			}
			res.recovered = time.Unix(0, latest).Sub(restartAt)
			break
		}
		if show != nil {
			n := 0
			for i := range lastOK {
				if lastOK[i].Load() >= upAt.UnixNano() {
					n++
				}
			}
			last, _ := by.last()
			show(fmt.Sprintf("%-10s %5.1fs after the restart  recovered %5d/%d  bystander's last connect %8s",
				cfg.name, time.Since(restartAt).Seconds(), n, cfg.fleet, last.Round(time.Millisecond)))
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return res, err
		}
	}
	if err := sleepCtx(ctx, 500*time.Millisecond); err != nil {
		return res, err
	}
	stopBy()
	<-byDone
	mu.Lock()
	res.dialTimes = slices.Clone(dialTimes)
	res.answered = slices.Clone(answered)
	mu.Unlock()
	if after := countGates(pools); after != nil {
		res.gate = &gateCounts{
			refunds:        after.refunds - before.refunds,
			cancelsSkipped: after.cancelsSkipped - before.cancelsSkipped,
			cancelDials:    after.cancelDials - before.cancelDials,
			cancelsShed:    after.cancelsShed - before.cancelsShed,
			decreases:      after.decreases - before.decreases,
			baselines:      after.baselines,
			lost:           after.lost - before.lost,
			windows:        before.windows,
		}
	}
	for i := range firstOK {
		if v := firstOK[i].Load(); v != 0 {
			res.firstOKs = append(res.firstOKs, time.Unix(0, v).Sub(restartAt))
		}
	}
	offset := restartAt.Sub(by.start)
	for _, s := range by.snapshot() {
		s.at -= offset
		res.bystander = append(res.bystander, s)
	}
	return res, nil
}

// allSince reports whether every worker succeeded after t.
func allSince(lastOK []atomic.Int64, t time.Time) bool {
	for i := range lastOK {
		if v := lastOK[i].Load(); v == 0 || v < t.UnixNano() {
			return false
		}
	}
	return true
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
