package dialer

import (
	"errors"
	"strings"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// FuzzOptions builds Dialers from arbitrary option values: New either
// rejects them with an error naming the option, or returns a Dialer whose
// plan, once installed, is usable.
func FuzzOptions(f *testing.F) {
	f.Add(true, 20.0, 4, true, int64(time.Second), 2, false, 0, 0.0, 1, 1)
	f.Add(true, 0.0, 1, true, int64(0), 1, false, 0, 0.0, 1, 1)
	f.Add(true, -1.0, 0, true, int64(-1), 0, true, 0, -5.0, 0, 0)
	f.Add(false, 1e308, 1<<30, false, int64(1<<62), 1<<20, true, 1<<40, 1e-300, 1<<20, 3)
	f.Add(false, 10.0, 2, false, int64(time.Hour), 8, true, 1500, 200.0, 2, 2)
	f.Add(false, 1e-9, 1, false, int64(1), 1, true, 1, 1e9, 1, 1)
	f.Add(false, 0.0, 0, false, int64(0), 1, true, 1<<62, 1e-3, 1<<10, 2)
	f.Fuzz(func(t *testing.T, rateSet bool, r float64, burst int, windowSet bool, window int64, maxConnecting int, fleet bool, size int, budget float64, warm, dials int) {
		opts := []Option{WithMaxConnecting(maxConnecting)}
		if rateSet {
			opts = append(opts, WithConnectRate(rate.Limit(r), burst))
		}
		if windowSet {
			opts = append(opts, WithStartupJitter(time.Duration(window)))
		}
		if fleet {
			opts = append(opts, WithFleet(size, budget))
		}
		d, err := New(opts...)
		if err != nil {
			if !errors.Is(err, ErrInvalidOption) || Classify(err) != Permanent {
				t.Fatalf("err = %v (%v), want a permanent ErrInvalidOption", err, Classify(err))
			}
			if !strings.Contains(err.Error(), "With") {
				t.Fatalf("error %q names no option", err)
			}
			return
		}
		d.Close()
		cfg, err := newConfig(opts...)
		if err != nil {
			t.Fatal(err)
		}
		p := cfg.Plan(warm, dials, 0.5)
		if p.StartupWindow < 0 || !(p.Rate > 0) || p.Burst < 1 || p.MaxConnecting < 1 || p.Warm < 1 || p.Dials < 1 {
			t.Fatalf("options %v %v %v %v fleet=%v %v %v give an unusable plan %+v", r, burst, window, maxConnecting, fleet, size, budget, p)
		}
	})
}
