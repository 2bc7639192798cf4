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

func TestDeceleratingSlowsAsTheFleetFills(t *testing.T) {
	const n = 100
	w := 30 * time.Second
	var prev, firstGap, lastGap time.Duration
	for i := range n {
		at := Decelerating(w, (float64(i)+0.5)/n)
		if at < 0 || at >= w {
			t.Fatalf("member %d starts at %v, outside [0, %v)", i, at, w)
		}
		if i > 0 {
			gap := at - prev
			if gap <= 0 {
				t.Fatalf("member %d starts at %v, not after member %d (%v)", i, at, i-1, prev)
			}
			if i == 1 {
				firstGap = gap
			}
			lastGap = gap
		}
		prev = at
	}
	// The gap grows linearly from 2/3 to 4/3 of the even grid's (w/n).
	if r := float64(lastGap) / float64(firstGap); r < 1.9 || r > 2.0 {
		t.Errorf("last gap %v / first gap %v = %.3f, want ≈ 2", lastGap, firstGap, r)
	}
	if got, want := Decelerating(w, 0.5), 12500*time.Millisecond; got != want {
		t.Errorf("Decelerating(%v, 0.5) = %v, want %v", w, got, want)
	}
	for _, f := range []float64{-1, math.NaN(), 1, 7} {
		if d := Decelerating(w, f); d < 0 || d >= w {
			t.Errorf("Decelerating(%v, %v) = %v, outside [0, %v)", w, f, d, w)
		}
	}
	if d := Decelerating(0, 0.5); d != 0 {
		t.Errorf("Decelerating(0, 0.5) = %v, want 0", d)
	}
}

func TestPhaseIsTheNextInstantAtTheOffset(t *testing.T) {
	epoch := time.Unix(1_800_000_000, 0) // a whole multiple of 10s
	period := 10 * time.Second
	cases := []struct {
		t    time.Time
		f    float64
		want time.Time
	}{
		{epoch, 0, epoch},
		{epoch, 0.25, epoch.Add(2500 * time.Millisecond)},
		{epoch.Add(3 * time.Second), 0.25, epoch.Add(12500 * time.Millisecond)},
		{epoch.Add(2500 * time.Millisecond), 0.25, epoch.Add(2500 * time.Millisecond)},
		{epoch.Add(9 * time.Second), 0.95, epoch.Add(9500 * time.Millisecond)},
		{epoch.Add(-time.Second), 0.5, epoch.Add(5 * time.Second)},
	}
	for _, c := range cases {
		if got := Phase(c.t, period, c.f); !got.Equal(c.want) {
			t.Errorf("Phase(%v, %v, %v) = %v, want %v", c.t.Sub(epoch), period, c.f, got.Sub(epoch), c.want.Sub(epoch))
		}
	}
	if got := Phase(epoch.Add(3*time.Second), 0, 0.7); !got.Equal(epoch.Add(3 * time.Second)) {
		t.Errorf("Phase with period 0 = %v, want t", got.Sub(epoch))
	}
	// Before the Unix epoch, offsets are still counted forward.
	old := time.Unix(-15, 0)
	if got := Phase(old, period, 0.5); !got.Equal(time.Unix(-15, 0)) {
		t.Errorf("Phase(-15s, 10s, 0.5) = %v, want -15s", got.Unix())
	}
}

// Of any 400 consecutive numbers, wherever they start, every sixteenth of
// the cycle holds 25 within 2, where 400 independent draws put 34 in the
// fullest sixteenth (median of 2,000 trials; 31-39 in 90% of them).
func TestWeylSpreadsConsecutiveNumbersEvenly(t *testing.T) {
	for _, from := range []uint64{0, 1, 4096, 123457, 1 << 22, math.MaxUint64 - 399} {
		var bins [16]int
		for n := from; n-from < 400; n++ {
			f := Weyl(n)
			if f < 0 || f >= 1 {
				t.Fatalf("Weyl(%d) = %v, outside [0, 1)", n, f)
			}
			bins[int(f*16)]++
		}
		for i, c := range bins {
			if c < 23 || c > 27 {
				t.Errorf("from %d: sixteenth %d holds %d of 400, want 25 ± 2 (all: %v)", from, i, c, bins)
				break
			}
		}
	}
}

func TestWeylIsTheGoldenRatiosFractionalPart(t *testing.T) {
	for _, n := range []uint64{1, 2, 3, 1000, 99991} {
		want := math.Mod(float64(n)*(math.Sqrt(5)-1)/2, 1)
		if got := Weyl(n); math.Abs(got-want) > 1e-9 {
			t.Errorf("Weyl(%d) = %v, want %v", n, got, want)
		}
	}
}
