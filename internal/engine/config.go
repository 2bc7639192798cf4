package engine

import (
	"log/slog"
	"math"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/jitter"
)

// Config is what a Gate is made of. Package dialer's options fill it in,
// defaults first; New takes it as it is.
type Config struct {
	Window    time.Duration // startup window
	WindowSet bool          // Window was given: WithFleet does not derive it

	Limit   rate.Limit
	Burst   int
	RateSet bool          // Limit, Burst or Limiter was given: WithFleet does not derive them
	Limiter *rate.Limiter // shared limiter; nil: one of the Gate's own

	MaxConnecting  int     // ceiling of the pacer's limit (the limit itself with the pacer off)
	ResponseTarget float64 // the pacer's ratio target; 0: pacer off
	NewBackOff     func() backoff.BackOff

	FleetSize      int // 0: no fleet
	FleetBudget    float64
	FleetMember    int  // this process's index in the fleet, if FleetMemberSet
	FleetMemberSet bool // FleetMember was given

	Rand jitter.Rand

	TracerProvider trace.TracerProvider
	MeterProvider  metric.MeterProvider
	Logger         *slog.Logger // nil: no logging
	PoolName       string       // "" : host:port/database
}

// InitialConnecting is how many establishments a pacer admits at once
// before it has learned anything: one, whose answer is the baseline. (The
// MongoDB drivers admit 2; a fleet of n processes starting together then
// puts 2n connects in the postmaster's queue before any has an answer.)
const InitialConnecting = 1

// minFleetRate is the floor of the per-process rate a fleet derives: one
// connection a minute, so that a huge fleet still lets each process replace
// a lost connection in bounded time.
const minFleetRate rate.Limit = 1.0 / 60

// Plan is what a Gate resolved from its Config for the connection
// configuration it was first installed on. Package dialer exports it as
// dialer.Plan, field for field.
type Plan struct {
	StartupWindow  time.Duration
	StartupDelay   time.Duration
	Phase          float64
	Rate           rate.Limit
	Burst          int
	MaxConnecting  int
	ResponseTarget float64
	Warm           int
	Dials          int
	FleetSize      int
	FleetBudget    float64
	FleetMember    int
}

// Plan resolves c for a process that opens warm connections at start, each
// costing up to dials TCP connections; draw ∈ [0, 1) places the process in
// its fleet's order unless c gives its member index.
func (c *Config) Plan(warm, dials int, draw float64) Plan {
	warm, dials = max(warm, 1), max(dials, 1)
	p := Plan{StartupWindow: c.Window, Phase: draw, Rate: c.Limit, Burst: c.Burst, MaxConnecting: c.MaxConnecting,
		ResponseTarget: c.ResponseTarget, Warm: warm, Dials: dials,
		FleetSize: c.FleetSize, FleetBudget: c.FleetBudget, FleetMember: -1}
	if c.FleetSize > 0 {
		demand := float64(c.FleetSize) * float64(warm) * float64(dials)
		if !c.WindowSet {
			p.StartupWindow = saturatingSeconds(demand / c.FleetBudget)
		}
		if !c.RateSet {
			p.Rate = max(rate.Limit(c.FleetBudget/float64(c.FleetSize)), minFleetRate)
			// One connect to spare: see dialer.WithFleet.
			p.Burst = int(min(float64(warm+1)*float64(dials), math.MaxInt32))
		}
	}
	if c.Limiter != nil {
		p.Rate, p.Burst = c.Limiter.Limit(), c.Limiter.Burst()
	}
	p.StartupDelay = jitter.Uniform(p.StartupWindow, p.Phase)
	if c.FleetSize > 0 {
		if c.FleetMemberSet {
			p.FleetMember = c.FleetMember
			p.Phase = (float64(c.FleetMember) + 0.5) / float64(c.FleetSize)
		}
		p.StartupDelay = jitter.Decelerating(p.StartupWindow, p.Phase)
	}
	return p
}

// saturatingSeconds converts s seconds to a Duration, saturating at the
// longest one instead of overflowing.
func saturatingSeconds(s float64) time.Duration {
	if s >= float64(math.MaxInt64)/float64(time.Second) {
		return math.MaxInt64
	}
	return time.Duration(s * float64(time.Second))
}

// DialsPerConnect is how many TCP connections one connect may cost: one per
// fallback configuration to the first host (sslmode=prefer lists the host
// twice, with and without TLS).
func DialsPerConnect(cfg *pgconn.Config) int {
	n := 1
	for _, fb := range cfg.Fallbacks {
		if fb.Host == cfg.Host && fb.Port == cfg.Port {
			n++
		}
	}
	return n
}
