package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// measureIdle returns the median of n sequential connects on an idle server.
func measureIdle(ctx context.Context, srv *server, n int) (time.Duration, error) {
	var lat []time.Duration
	for range n {
		start := time.Now()
		c, err := srv.open(ctx)
		if err != nil {
			return 0, fmt.Errorf("idle connect: %w", err)
		}
		lat = append(lat, time.Since(start))
		_ = c.Close(ctx)
	}
	return percentile(lat, 50), nil
}

// measureCapacity saturates the postmaster with workers connecting and
// disconnecting as fast as they can for d, and returns the connections it
// admitted per second.
func measureCapacity(ctx context.Context, srv *server, workers int, d time.Duration) (float64, error) {
	var ok atomic.Int64
	var firstErr error
	var once sync.Once
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				c, err := srv.open(ctx)
				if err != nil {
					if ctx.Err() == nil {
						once.Do(func() { firstErr = err })
					}
					continue
				}
				ok.Add(1)
				_ = c.Close(context.Background())
			}
		})
	}
	wg.Wait()
	if ok.Load() == 0 {
		return 0, fmt.Errorf("capacity: no connection succeeded: %v", firstErr)
	}
	return float64(ok.Load()) / time.Since(start).Seconds(), nil
}

// waitQuiet waits until three connects in a row take at most three times an
// idle connect: the backlog of a previous run has drained.
func waitQuiet(ctx context.Context, srv *server, idle time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for quiet := 0; quiet < 3; {
		start := time.Now()
		c, err := srv.open(ctx)
		if err != nil {
			return fmt.Errorf("waiting for the server to settle: %w", err)
		}
		_ = c.Close(ctx)
		if time.Since(start) <= 3*idle {
			quiet++
		} else {
			quiet = 0
		}
	}
	return nil
}

// percentile returns the p-th percentile (nearest rank) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// bystander opens a fresh connection every interval while it runs and
// records how long each took, as an unrelated client of the server would.
type bystander struct {
	srv      *server
	interval time.Duration
	timeout  time.Duration

	mu      sync.Mutex
	start   time.Time
	samples []sample // guarded by mu
}

type sample struct {
	at      time.Duration // since start
	latency time.Duration
	failed  bool
}

func (b *bystander) run(ctx context.Context) {
	b.start = time.Now()
	t := time.NewTicker(b.interval)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		wg.Go(func() {
			at := time.Since(b.start)
			cctx, cancel := context.WithTimeout(context.Background(), b.timeout)
			defer cancel()
			begin := time.Now()
			c, err := b.srv.open(cctx)
			lat := time.Since(begin)
			if err == nil {
				_ = c.Close(context.Background())
			}
			b.mu.Lock()
			b.samples = append(b.samples, sample{at: at, latency: lat, failed: err != nil})
			b.mu.Unlock()
		})
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (b *bystander) snapshot() []sample {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.samples)
}

func (b *bystander) last() (time.Duration, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.samples) == 0 {
		return 0, false
	}
	return b.samples[len(b.samples)-1].latency, true
}

func latencies(ss []sample) []time.Duration {
	var out []time.Duration
	for _, s := range ss {
		if !s.failed {
			out = append(out, s.latency)
		}
	}
	return out
}
