package engine

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

// The reads follow a fleet that is still connecting: at once, then after
// 1s with the history, then 2s, 4s and so on. On a server holding many
// connections none comes sooner than rampPerConn per connection held, and
// the history waits a random part of historyPerConn per connection held:
// a fleet joining a large server one process after another must not pay
// every process's ramp at the server's full size. An early reader (a pool
// of several) keeps its second read, with the history, after 600ms.
func TestFactsReadsRampWithWhatTheServerHolds(t *testing.T) {
	type read struct {
		at      time.Duration
		history bool
	}
	for _, c := range []struct {
		name  string
		held  int
		early bool
		want  []read
	}{
		{"a fleet still connecting", 100, false, []read{{0, false}, {time.Second, true}, {3 * time.Second, false}, {7 * time.Second, false}}},
		// rampPerConn × 100,000 = 31.25s; the history at the second
		// read, sampled (FactsHistoryQuery).
		{"a large server", 100_000, false, []read{{0, false}, {31250 * time.Millisecond, true}, {93750 * time.Millisecond, false}, {218750 * time.Millisecond, false}}},
		// A pool of several: its second read, which its pacer waits
		// for, as on any server.
		{"a pool on a large server", 100_000, true, []read{{0, true}, {600 * time.Millisecond, true}, {31850 * time.Millisecond, false}, {94350 * time.Millisecond, false}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				// rand 0.5: every interval exactly, no ±15%.
				f := NewFactsReader(&Gate{}, 30*time.Second, func() float64 { return 0.5 }, c.early)
				defer f.Close()
				begin := time.Now()
				var got []read
				for len(got) < len(c.want) {
					if !f.Due() {
						time.Sleep(time.Millisecond)
						continue
					}
					var history bool
					err := f.Read(func(_ context.Context, sql string) ([]int, error) {
						if history = sql == FactsHistoryQuery; history {
							return []int{c.held, 1, 1, 1}, nil
						}
						return []int{c.held}, nil
					})
					if err != nil {
						t.Fatal(err)
					}
					got = append(got, read{time.Since(begin), history})
				}
				for i := range c.want {
					// Found within a millisecond of falling due, each.
					if d := got[i].at - c.want[i].at; d < 0 || d > 5*time.Millisecond || got[i].history != c.want[i].history {
						t.Errorf("read %d at %v (history %v), want at %v (history %v)", i, got[i].at, got[i].history, c.want[i].at, c.want[i].history)
					}
				}
			})
		})
	}
}

// A sampled history (every k-th backend, FactsHistoryQuery) counts for k
// times as many starts.
func TestASampledHistoryCountsForKTimesAsMany(t *testing.T) {
	g := &Gate{}
	f := NewFactsReader(g, 30*time.Second, func() float64 { return 0.5 }, true)
	defer f.Close()
	if !f.Due() {
		t.Fatal("an early reader's first read is not due at once")
	}
	err := f.Read(func(_ context.Context, sql string) ([]int, error) {
		if sql != FactsHistoryQuery {
			t.Fatalf("an early reader's first read ran %q, want the history", sql)
		}
		// 5,000 held, every 5th backend: 100 of them in the fastest
		// second, 20 in the fastest tenth.
		return []int{5000, 5, 100, 20}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := g.Facts(); got.Held != 5000 || got.PeakRate != 500 || got.ForkRate != 990 {
		t.Errorf("facts %+v, want 5000 held, peak rate 500/s, fork rate 990/s", got)
	}
}
