package main

import (
	"testing"
	"time"
)

func TestQueryLoadSplitsAFixedPartFromAPartPerBackend(t *testing.T) {
	us := time.Microsecond
	for _, c := range []struct {
		name           string
		all, few       queryLoad
		fixed, perConn time.Duration
	}{
		// 200µs + 200ns a backend: 500µs holding 1,500, 300µs holding 500.
		{"two points", queryLoad{1500, 500 * us}, queryLoad{500, 300 * us}, 200 * us, 200 * time.Nanosecond},
		{"one point: all per backend", queryLoad{1500, 600 * us}, queryLoad{}, 0, 400 * time.Nanosecond},
		{"no rise with the backends: all fixed", queryLoad{1500, 300 * us}, queryLoad{500, 340 * us}, 320 * us, 0},
		{"a rise steeper than the load: all per backend", queryLoad{1500, 600 * us}, queryLoad{500, 100 * us}, 0, 400 * time.Nanosecond},
	} {
		fixed, perConn := c.all.split(c.few)
		if fixed != c.fixed || perConn != c.perConn {
			t.Errorf("%s: split %v + %v a backend, want %v + %v", c.name, fixed, perConn, c.fixed, c.perConn)
		}
	}
}
