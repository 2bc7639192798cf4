package jitter

import (
	"context"
	"math"
	"math/rand/v2"
	"time"
)

// Rand returns a uniform random number in [0, 1). It is the draw every
// function in this package takes as a parameter; [Float64] is the default.
type Rand func() float64

// Float64 is the default [Rand]: math/rand/v2's top-level generator, which is
// safe for concurrent use.
func Float64() float64 { return rand.Float64() }

// Uniform returns a delay uniformly distributed over [0, window) for a draw r
// in [0, 1). It is computed in float nanoseconds, so sub-second windows keep
// their full resolution. A window ≤ 0 gives 0.
func Uniform(window time.Duration, r float64) time.Duration {
	if window <= 0 {
		return 0
	}
	return scale(float64(window), clamp01(r))
}

// Sleep waits for d or until ctx is done, whichever comes first. It returns
// nil after a full wait and ctx's error (or cause) otherwise. A d ≤ 0 returns
// at once, reporting ctx's error only if ctx is already done.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return context.Cause(ctx)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// scale returns v·r as a Duration, saturating instead of overflowing.
func scale(v, r float64) time.Duration {
	d := v * r
	if d >= math.MaxInt64 {
		return math.MaxInt64
	}
	if d <= 0 || math.IsNaN(d) {
		return 0
	}
	return time.Duration(d)
}

// clamp01 keeps a draw inside [0, 1) so that a faulty Rand cannot produce a
// delay outside the documented interval.
func clamp01(r float64) float64 {
	switch {
	case r < 0 || math.IsNaN(r):
		return 0
	case r >= 1:
		return math.Nextafter(1, 0)
	}
	return r
}
