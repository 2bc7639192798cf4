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

// Full returns "full jitter" for the given attempt (0 for the first retry):
// a delay uniform over [0, min(limit, base·2^attempt)). Non-positive base
// gives 0; a non-positive limit means no limit.
func Full(base, limit time.Duration, attempt int, r float64) time.Duration {
	if base <= 0 {
		return 0
	}
	ceiling := float64(base) * math.Exp2(float64(max(attempt, 0)))
	if limit > 0 {
		ceiling = math.Min(ceiling, float64(limit))
	}
	return scale(ceiling, clamp01(r))
}

// Decorrelated returns "decorrelated jitter": a delay uniform over
// [base, 3·prev), capped at limit, where prev is the previous delay (use base
// for the first). Successive delays grow on average but stay spread out.
// Non-positive base gives 0; a non-positive limit means no limit.
func Decorrelated(base, limit, prev time.Duration, r float64) time.Duration {
	if base <= 0 {
		return 0
	}
	lo := float64(base)
	hi := math.Max(3*float64(max(prev, base)), lo)
	d := lo + (hi-lo)*clamp01(r)
	if limit > 0 {
		d = math.Min(d, float64(limit))
	}
	return scale(d, 1)
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
