package engine

import (
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/otel/metric/noop"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/jitter"
)

// newTestGate returns a Gate installed on a configuration, with no startup
// window, no rate limit and backoff from newPolicy.
func newTestGate(t *testing.T, newPolicy func() backoff.BackOff) *Gate {
	t.Helper()
	g, err := New(&Config{
		Limit: rate.Inf, Burst: 1, MaxConnecting: 1, NewBackOff: newPolicy, Rand: jitter.Float64,
		TracerProvider: tracenoop.NewTracerProvider(), MeterProvider: noop.NewMeterProvider(),
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pgx.ParseConfig("postgres://u@127.0.0.1:5432/x?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Install(cfg, 1, false); err != nil {
		t.Fatal(err)
	}
	return g
}

// A success ends the outage: the hot path stops marking callers, and the
// next outage's backoff starts again from its first interval.
func TestRecoveredClearsTheOutage(t *testing.T) {
	g := newTestGate(t, func() backoff.BackOff {
		return backoff.NewExponentialBackOff(backoff.WithInitialInterval(time.Second),
			backoff.WithMultiplier(2), backoff.WithRandomizationFactor(0))
	})
	now := time.Now()
	g.failed(now, now)
	if !g.congested() {
		t.Fatal("no outage after a failure")
	}
	g.failed(now.Add(time.Millisecond), now.Add(2*time.Millisecond)) // a later attempt: the backoff grows
	if got := g.recovery.Load().recoverUntil.Sub(now.Add(2 * time.Millisecond)); got != 2*time.Second {
		t.Fatalf("second failure backs off %v, want 2s", got)
	}
	g.recovered()
	if g.recovery.Load() != nil || g.congested() {
		t.Fatal("the outage outlived a success")
	}
	later := now.Add(time.Minute)
	g.failed(later, later)
	if got := g.recovery.Load().recoverUntil.Sub(later); got != time.Second {
		t.Errorf("a new outage backs off %v, want the first interval, 1s", got)
	}
}

// A fleet member's token taken a few milliseconds after its place comes
// back a cycle later just as late: that refill still counts as the next
// place, not the one after it. Outside a fleet there is no slack.
func TestPlaceAfterAllowsAFleetMemberAFiftiethOfAPeriod(t *testing.T) {
	period := 10 * time.Second
	member := &Gate{plan: Plan{Phase: 0.35, FleetSize: 10, Rate: 1}, cfg: &Config{}}
	lone := &Gate{plan: Plan{Phase: 0.35, Rate: 1}, cfg: &Config{}}
	epoch := time.Unix(1_800_000_000, 0) // a whole multiple of 10s
	place := epoch.Add(3500 * time.Millisecond)
	cases := []struct {
		name     string
		g        *Gate
		t, token time.Time
		want     time.Time
	}{
		{"token just after the place", member, place.Add(-time.Second), place.Add(5 * time.Millisecond), place},
		{"token a fiftieth of a period after", member, place.Add(-time.Second), place.Add(period / 50), place},
		{"token later: the next place", member, place.Add(-time.Second), place.Add(period / 10), place.Add(period)},
		{"not before t", member, place.Add(time.Millisecond), place, place.Add(period)},
		{"token before the place", member, epoch, epoch.Add(time.Second), place},
		{"no slack outside a fleet", lone, place.Add(-time.Second), place.Add(5 * time.Millisecond), place.Add(period)},
	}
	for _, c := range cases {
		if got := c.g.placeAfter(c.t, c.token, period); !got.Equal(c.want) {
			t.Errorf("%s: placeAfter = %v, want %v", c.name, got.Sub(epoch), c.want.Sub(epoch))
		}
	}
}

// A process that is not a fleet member reconnects at a place set by the
// backend process ID of its newest connection, once it has one; a fleet
// member keeps its slot.
func TestRecoveryPhaseFollowsTheNewestBackendPID(t *testing.T) {
	lone := &Gate{plan: Plan{Phase: 0.35, FleetMember: -1}, cfg: &Config{}}
	if got := lone.recoveryPhase(); got != 0.35 {
		t.Errorf("before any connection: phase %v, want the draw, 0.35", got)
	}
	lone.pid.Store(4242)
	if got, want := lone.recoveryPhase(), jitter.Weyl(4242); got != want {
		t.Errorf("after backend 4242: phase %v, want %v", got, want)
	}
	lone.pid.Store(4243)
	if got, want := lone.recoveryPhase(), jitter.Weyl(4243); got != want {
		t.Errorf("after backend 4243: phase %v, want %v", got, want)
	}
	member := &Gate{plan: Plan{Phase: 0.35, FleetSize: 10, FleetMember: 3}, cfg: &Config{}}
	member.pid.Store(4242)
	if got := member.recoveryPhase(); got != 0.35 {
		t.Errorf("fleet member: phase %v, want its slot's, 0.35", got)
	}
}
