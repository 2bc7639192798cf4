package engine

import (
	"context"
	"fmt"
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
		{"half the peak", ServerFacts{Held: 300, PeakRate: 60}, 0, 10 * time.Second},
		{"the baseline's quarter is faster", ServerFacts{Held: 300, PeakRate: 60}, 5 * ms, 6 * time.Second}, // 50/s against 30/s
		{"the peak's share is faster", ServerFacts{Held: 300, PeakRate: 60}, 50 * ms, 10 * time.Second},     // 5/s
		{"no peak seen: the baseline", ServerFacts{Held: 100}, 10 * ms, 4 * time.Second},                    // 25/s
		{"no rate known", ServerFacts{Held: 100}, 0, 0},
		{"nothing held", ServerFacts{PeakRate: 40}, 10 * ms, 0},
		{"capped", ServerFacts{Held: 100_000, PeakRate: 2}, 0, MaxRecoveryWindow},
	}
	for _, c := range cases {
		if got := FactsWindow(c.f, c.baseline); got != c.want {
			t.Errorf("%s: FactsWindow(%+v, %v) = %v, want %v", c.name, c.f, c.baseline, got, c.want)
		}
	}
}

// The peak rate is the fastest growth between reads at least minFactsGap
// apart, or the most backends started in one second, and it is kept: a fleet reconnected at half its peak must not
// halve its budget at the next restart.
func TestLearnFactsKeepsTheFastestGrowth(t *testing.T) {
	g := &Gate{}
	if (g.Facts() != ServerFacts{}) {
		t.Fatalf("facts before any: %+v", g.Facts())
	}
	t0 := time.Unix(1_800_000_000, 0)
	steps := []struct {
		at     time.Duration
		held   int
		starts int
		peak   float64
	}{
		{0, 10, 0, 0},                              // one read: no rate
		{time.Second, 50, 0, 40},                   // +40 in 1s
		{1200 * time.Millisecond, 80, 0, 40},       // too soon after the last to count
		{3 * time.Second, 100, 0, 40},              // +20 in 1.8s
		{5 * time.Second, 60, 0, 40},               // fell
		{6 * time.Second, 70, 0, 40},               // +10 in 1s
		{8 * time.Second, 270, 0, 100},             // +200 in 2s
		{time.Minute, 270, 0, 100},                 // steady
		{time.Minute + time.Second, 0, 0, 100},     // a restart
		{time.Minute + 2*time.Second, 5, 150, 150}, // a history read: 150 started in one second
		{time.Minute + 3*time.Second, 5, 20, 150},  // the fastest is kept
	}
	for _, s := range steps {
		g.LearnFacts(s.held, s.starts, 0, t0.Add(s.at))
		if got := g.Facts(); got.Held != s.held || got.PeakRate != s.peak || !got.At.Equal(t0.Add(s.at)) {
			t.Errorf("after %d at %v: %+v, want held %d, peak %v", s.held, s.at, got, s.held, s.peak)
		}
	}
}

// The window from the facts is the reconnect cycle's period when it is
// longer than the startup window; a configured fleet keeps its own.
func TestRecoveryWindowFromFactsUnlessAFleetIsConfigured(t *testing.T) {
	t0 := time.Unix(1_800_000_000, 0)
	learn := func(g *Gate, held int) {
		g.LearnFacts(0, 0, 0, t0)
		g.LearnFacts(held, 0, 0, t0.Add(time.Second)) // a peak of held per second
	}
	lone := &Gate{plan: Plan{StartupWindow: time.Second}}
	if got := lone.RecoveryWindow(); got != time.Second {
		t.Errorf("without facts: %v, want the startup window, 1s", got)
	}
	learn(lone, 20) // 20 at half of 20/s: 2s
	if got := lone.RecoveryWindow(); got != 2*time.Second {
		t.Errorf("facts calling for 2s: %v", got)
	}
	short := &Gate{plan: Plan{StartupWindow: 3 * time.Second}}
	learn(short, 20)
	if got := short.RecoveryWindow(); got != 3*time.Second {
		t.Errorf("facts calling for 2s: %v, want the startup window, 3s", got)
	}
	fleet := &Gate{plan: Plan{StartupWindow: time.Second, FleetSize: 100, FleetBudget: 25}}
	learn(fleet, 20)
	if got := fleet.RecoveryWindow(); got != time.Second {
		t.Errorf("a configured fleet: %v, want its window, 1s", got)
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

// A pool whose first answers came from inside a storm learned the storm's
// queue as its baseline; the peak rate the server reports bounds an idle
// answer at a round trip and two forks' time, and the pacer takes that.
func TestLearnFactsCapsTheBaselineAtTwoForksAndARoundTrip(t *testing.T) {
	g := &Gate{pacer: newPacer(2, 1, 32, half)}
	t0 := time.Unix(1_800_000_000, 0)
	g.pacer.succeeded(t0.Add(700*time.Millisecond), t0, 700*time.Millisecond, 0, 1)
	g.LearnRoundTrip(300 * time.Microsecond)
	g.LearnRoundTrip(time.Millisecond) // the quickest handshake is kept
	g.LearnFacts(100, 0, 0, t0)
	if got := g.pacer.state().baseline; got != 700*time.Millisecond {
		t.Fatalf("baseline %v with no rate known, want the 700ms measured", got)
	}
	g.LearnFacts(120, 40, 0, t0.Add(time.Second)) // 40 forks a second: 25ms each
	if got, want := g.pacer.state().baseline, 300*time.Microsecond+50*time.Millisecond; got != want {
		t.Errorf("baseline %v after a peak of 40/s, want %v", got, want)
	}
	// Nine backends started within a tenth of a second: eight forks in
	// 100ms or less, 12.5ms each at most. A storm shows that in its first
	// tenth of a second, where a whole second's count comes a second late.
	g.LearnFacts(130, 10, 9, t0.Add(2*time.Second))
	if f := g.Facts(); f.ForkRate != 80 || f.PeakRate != 40 {
		t.Errorf("facts %+v after 9 starts in a tenth, want a fork rate of 80/s and the peak of 40/s kept", f)
	}
	if got, want := g.pacer.state().baseline, 300*time.Microsecond+25*time.Millisecond; got != want {
		t.Errorf("baseline %v after 80 forks a second, want %v", got, want)
	}
	g.LearnFacts(130, 10, 2, t0.Add(3*time.Second)) // the fastest is kept
	if f := g.Facts(); f.ForkRate != 80 {
		t.Errorf("fork rate %v after a slower read, want the 80/s kept", f.ForkRate)
	}
	// A quicker round trip tightens the bound at once, not at the next
	// facts read: the spacing the pacer sets next is sized from it.
	g.LearnRoundTrip(100 * time.Microsecond)
	if got, want := g.pacer.state().baseline, 100*time.Microsecond+25*time.Millisecond; got != want {
		t.Errorf("baseline %v after a 100µs round trip, want %v", got, want)
	}
}

// A pool holds its pacer's limit until it has read the server's facts:
// its first answers may be a storm's, and growth on them would feed it.
func TestPacerHoldsItsGrowthUntilTheFactsSettle(t *testing.T) {
	g := &Gate{pacer: newPacer(2, 1, 32, half)}
	g.AwaitFacts()
	t0 := time.Unix(1_800_000_000, 0)
	now := t0
	for range 5 {
		now = now.Add(5 * time.Millisecond)
		g.pacer.succeeded(now, now.Add(-5*time.Millisecond), 5*time.Millisecond, 0, 1)
	}
	if got := g.pacer.state().limit; got != 1 {
		t.Fatalf("limit %v before the facts, want the initial 1", got)
	}
	g.FactsSettled()
	g.pacer.succeeded(now.Add(5*time.Millisecond), now, 5*time.Millisecond, 0, 1)
	if got := g.pacer.state().limit; got != 2 {
		t.Errorf("limit %v after the facts and an idle answer, want 2", got)
	}
}

// The server cannot run the facts query on an SQL proxy without
// PostgreSQL's statistics functions (class 42, 0A) or when it answers in
// another shape: then the pool stops reading. Other errors (a timeout, a
// statement cancelled) only postpone the next read.
func TestCannotRunStopsTheReadsOnlyForAnUnknownFunctionOrShape(t *testing.T) {
	cases := []struct {
		err  error
		stop bool
	}{
		{&pgconn.PgError{Code: "42883"}, true}, // undefined_function
		{&pgconn.PgError{Code: "42P01"}, true}, // undefined_table
		{&pgconn.PgError{Code: "0A000"}, true}, // feature_not_supported
		{fmt.Errorf("read: %w", ErrFactsReply), true},
		{&pgconn.PgError{Code: "57014"}, false}, // query_canceled
		{context.DeadlineExceeded, false},
	}
	for _, c := range cases {
		if got := CannotReadFacts(c.err); got != c.stop {
			t.Errorf("CannotReadFacts(%v) = %v, want %v", c.err, got, c.stop)
		}
	}
}
