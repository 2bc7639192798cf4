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

// Decelerating returns when, within window, a fleet member at position f
// ∈ [0, 1) of the fleet's order starts: window × (2f + f²)/3. The gap
// between consecutive members grows linearly with f, doubling from the
// first member to the last, so the fleet's connect rate falls to half as it
// fills: the postmaster forks more slowly the more backends it holds (on a
// 2-core machine, a third fewer connects per second at 1,500 backends than
// at none). Taking f uniform (a draw) gives random starts with that
// density; taking f = (i + ½)/n gives member i of n a place on the grid.
// The first half of the window starts 58% of the fleet.
func Decelerating(window time.Duration, f float64) time.Duration {
	if window <= 0 {
		return 0
	}
	f = clamp01(f)
	return scale(float64(window), (2*f+f*f)/3)
}

// Phase returns the first instant at or after t whose offset into a cycle
// of the given period, counted from the Unix epoch, is f × period. Processes
// with different f keep their order and spacing across machines whose
// clocks agree to well within the period, however their failures were
// timed. A period ≤ 0 gives t.
func Phase(t time.Time, period time.Duration, f float64) time.Time {
	if period <= 0 {
		return t
	}
	at := scale(float64(period), clamp01(f))
	off := time.Duration(t.UnixNano() % int64(period))
	if off < 0 {
		off += period
	}
	d := at - off
	if d < 0 {
		d += period
	}
	return t.Add(d)
}

// Weyl returns the fractional part of n × (√5 − 1)/2, in [0, 1): for
// consecutive n, places spread evenly over a cycle, each new one falling
// in the largest gap left (the golden-ratio, or Weyl, sequence). Of any
// run of consecutive integers, every interval of the cycle holds the
// run's length times its own, within a few. Distinct processes that know
// distinct, nearly consecutive numbers (the server's process IDs of
// backends forked one after another) take evenly spread phases this way,
// with no coordination.
func Weyl(n uint64) float64 {
	// n × ⌊2⁶⁴/φ⌉ modulo 2⁶⁴, in fixed point: within n × 2⁻⁶⁴ of the
	// fractional part.
	const invPhi = 0x9E3779B97F4A7C15
	return float64((n*invPhi)>>11) / (1 << 53)
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
