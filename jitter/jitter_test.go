package jitter

import (
	"context"
	"errors"
	"math"
	"testing"
	"testing/synctest"
	"time"
)

func TestUniformKeepsSubSecondResolution(t *testing.T) {
	cases := []struct {
		window time.Duration
		r      float64
		want   time.Duration
	}{
		{750 * time.Millisecond, 0, 0},
		{750 * time.Millisecond, 0.5, 375 * time.Millisecond},
		{1500 * time.Millisecond, 0.5, 750 * time.Millisecond},
		{3 * time.Nanosecond, 0.5, 1 * time.Nanosecond},
		{0, 0.9, 0},
		{-time.Second, 0.9, 0},
	}
	for _, c := range cases {
		if got := Uniform(c.window, c.r); got != c.want {
			t.Errorf("Uniform(%v, %v) = %v, want %v", c.window, c.r, got, c.want)
		}
	}
}

func TestUniformStaysInsideWindow(t *testing.T) {
	w := 2 * time.Second
	for _, r := range []float64{-1, 0, 0.25, math.Nextafter(1, 0), 1, 7, math.NaN()} {
		d := Uniform(w, r)
		if d < 0 || d >= w {
			t.Errorf("Uniform(%v, %v) = %v, outside [0, %v)", w, r, d, w)
		}
	}
}

func TestUniformSaturates(t *testing.T) {
	if got := Uniform(math.MaxInt64, 0.999999); got <= 0 {
		t.Fatalf("Uniform(max, ~1) = %v, want a large positive duration", got)
	}
}

func TestFull(t *testing.T) {
	base, limit := 100*time.Millisecond, time.Second
	cases := []struct {
		attempt int
		r       float64
		want    time.Duration
	}{
		{0, 0.5, 50 * time.Millisecond},
		{1, 0.5, 100 * time.Millisecond},
		{2, 0.5, 200 * time.Millisecond},
		{3, 0.5, 400 * time.Millisecond},
		{4, 0.5, 500 * time.Millisecond}, // 1.6s capped at 1s
		{60, 0.5, 500 * time.Millisecond},
		{-3, 0.5, 50 * time.Millisecond},
		{2, 0, 0},
	}
	for _, c := range cases {
		if got := Full(base, limit, c.attempt, c.r); got != c.want {
			t.Errorf("Full(%v, %v, %d, %v) = %v, want %v", base, limit, c.attempt, c.r, got, c.want)
		}
	}
	if got := Full(base, 0, 10, 0.5); got != base*1024/2 {
		t.Errorf("Full without limit = %v, want %v", got, base*1024/2)
	}
	if got := Full(0, limit, 3, 0.5); got != 0 {
		t.Errorf("Full with zero base = %v, want 0", got)
	}
}

func TestDecorrelated(t *testing.T) {
	base, limit := 100*time.Millisecond, 2*time.Second
	cases := []struct {
		prev time.Duration
		r    float64
		want time.Duration
	}{
		{base, 0, base},                                       // [100ms, 300ms)
		{base, 0.5, 200 * time.Millisecond},                   // midpoint
		{400 * time.Millisecond, 0.5, 650 * time.Millisecond}, // [100ms, 1.2s)
		{time.Second, 0.99, limit},                            // capped
		{0, 0.5, 200 * time.Millisecond},                      // prev below base counts as base
	}
	for _, c := range cases {
		if got := Decorrelated(base, limit, c.prev, c.r); got != c.want {
			t.Errorf("Decorrelated(%v, %v, %v, %v) = %v, want %v", base, limit, c.prev, c.r, got, c.want)
		}
	}
}

func TestSleepWaitsTheFullDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		if err := Sleep(context.Background(), 1500*time.Millisecond); err != nil {
			t.Fatalf("Sleep: %v", err)
		}
		if got := time.Since(start); got != 1500*time.Millisecond {
			t.Fatalf("slept %v, want 1.5s", got)
		}
	})
}

func TestSleepEndsWithContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cause := errors.New("shutting down")
		ctx, cancel := context.WithCancelCause(context.Background())
		time.AfterFunc(200*time.Millisecond, func() { cancel(cause) })
		start := time.Now()
		err := Sleep(ctx, time.Hour)
		if !errors.Is(err, cause) {
			t.Fatalf("Sleep err = %v, want %v", err, cause)
		}
		if got := time.Since(start); got != 200*time.Millisecond {
			t.Fatalf("Sleep returned after %v, want 200ms", got)
		}
	})
}

func TestSleepZeroReportsDoneContext(t *testing.T) {
	if err := Sleep(context.Background(), 0); err != nil {
		t.Fatalf("Sleep(bg, 0) = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Sleep(ctx, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sleep(cancelled, 0) = %v, want context.Canceled", err)
	}
}
