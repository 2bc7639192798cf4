package engine

import (
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgconn"
)

func TestFactsWindowBringsTheHeldConnectionsBackAtHalfTheServedRate(t *testing.T) {
	ms := time.Millisecond
	cases := []struct {
		name     string
		f        ServerFacts
		baseline time.Duration
		want     time.Duration
	}{
		{"half the peak", ServerFacts{Held: 300, PeakStarts: 40}, 0, 15 * time.Second},
		{"the baseline's quarter is faster", ServerFacts{Held: 300, PeakStarts: 40}, 5 * ms, 6 * time.Second}, // 50/s
		{"half the peak is faster", ServerFacts{Held: 300, PeakStarts: 40}, 50 * ms, 15 * time.Second},        // 5/s
		{"no peak seen: the baseline", ServerFacts{Held: 100}, 10 * ms, 4 * time.Second},                      // 25/s
		{"no rate known", ServerFacts{Held: 100}, 0, 0},
		{"nothing held", ServerFacts{PeakStarts: 40}, 10 * ms, 0},
		{"capped", ServerFacts{Held: 100_000, PeakStarts: 2}, 0, MaxRecoveryWindow},
	}
	for _, c := range cases {
		if got := FactsWindow(c.f, c.baseline); got != c.want {
			t.Errorf("%s: FactsWindow(%+v, %v) = %v, want %v", c.name, c.f, c.baseline, got, c.want)
		}
	}
}

// A fleet reconnected at half its peak must not halve its budget at the
// next restart: the largest peak seen is kept, the newest count held.
func TestLearnFactsKeepsTheLargestPeak(t *testing.T) {
	g := &Gate{}
	if (g.Facts() != ServerFacts{}) {
		t.Fatalf("facts before any: %+v", g.Facts())
	}
	t0 := time.Unix(1_800_000_000, 0)
	g.LearnFacts(ServerFacts{Held: 100, PeakStarts: 40, At: t0})
	g.LearnFacts(ServerFacts{Held: 120, PeakStarts: 20, At: t0.Add(time.Minute)})
	if got, want := g.Facts(), (ServerFacts{Held: 120, PeakStarts: 40, At: t0.Add(time.Minute)}); got != want {
		t.Errorf("facts = %+v, want %+v", got, want)
	}
}

// The window from the facts is the reconnect cycle's period when it is
// longer than the startup window; a configured fleet keeps its own.
func TestRecoveryWindowFromFactsUnlessAFleetIsConfigured(t *testing.T) {
	lone := &Gate{plan: Plan{StartupWindow: time.Second}}
	if got := lone.RecoveryWindow(); got != time.Second {
		t.Errorf("without facts: %v, want the startup window, 1s", got)
	}
	lone.LearnFacts(ServerFacts{Held: 10, PeakStarts: 40})
	if got := lone.RecoveryWindow(); got != time.Second {
		t.Errorf("facts calling for 0.5s: %v, want the startup window, 1s", got)
	}
	lone.LearnFacts(ServerFacts{Held: 300, PeakStarts: 40})
	if got := lone.RecoveryWindow(); got != 15*time.Second {
		t.Errorf("facts calling for 15s: %v", got)
	}
	fleet := &Gate{plan: Plan{StartupWindow: 4 * time.Second, FleetSize: 100, FleetBudget: 25}}
	fleet.LearnFacts(ServerFacts{Held: 300, PeakStarts: 40})
	if got := fleet.RecoveryWindow(); got != 4*time.Second {
		t.Errorf("a configured fleet: %v, want its window, 4s", got)
	}
}

// A session the server ends as it shuts down sets the recovery state once
// per outage: sessions older than the outage died in it too and change
// nothing, and other errors are no loss.
func TestSessionEndedByTheServerStartsOneOutage(t *testing.T) {
	g := newTestGate(t, func() backoff.BackOff {
		return backoff.NewExponentialBackOff(backoff.WithInitialInterval(time.Second),
			backoff.WithMultiplier(2), backoff.WithRandomizationFactor(0))
	})
	calls := 0
	handler := g.onPgError(func(*pgconn.PgConn, *pgconn.PgError) bool { calls++; return false })
	if handler(&pgconn.PgConn{}, &pgconn.PgError{Severity: "ERROR", Code: "42P01"}) || calls != 1 {
		t.Fatal("the next handler was not asked")
	}
	if g.recovery.Load() != nil || g.stats.Lost.Load() != 0 {
		t.Fatal("an ordinary error set the recovery state")
	}
	// A session established before the gate knew of any outage.
	handler(&pgconn.PgConn{}, &pgconn.PgError{Severity: "FATAL", Code: "57P01"})
	o := g.recovery.Load()
	if o == nil || g.stats.Lost.Load() != 1 || calls != 2 {
		t.Fatalf("admin_shutdown: outage %v, lost %d, calls %d", o, g.stats.Lost.Load(), calls)
	}
	t0 := o.failedAt
	g.lost(t0.Add(-time.Minute), time.Now(), "57P02")
	if g.recovery.Load() != o || g.stats.Lost.Load() != 2 {
		t.Fatal("a second session of the same outage changed the recovery state")
	}
	g.recovered()
	g.lost(t0.Add(-time.Second), time.Now(), "57P01")
	if g.recovery.Load() != nil {
		t.Fatal("a session older than the outage the gate recovered from started another")
	}
	g.lost(t0.Add(time.Second), t0.Add(time.Minute), "57P01")
	if g.recovery.Load() == nil {
		t.Fatal("a session established after the last outage did not start a new one")
	}
}
