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
