package dialer

import (
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/internal/engine"
	"github.com/pgstagger/pgstagger/jitter"
)

// Defaults of a [Dialer] built with no options. Its first connections wait
// a random part of a second; then the pacer lets connects reach the
// server as fast as it establishes them near its idle time, and no faster:
// it starts with 1 establishment under way, doubles that while they take
// within 1.5 times the quickest one seen, and backs off when they take longer
// or a connect fails transiently, down to one connect at a time, spaced (a
// fleet's processes then keep the server's queue short between them). A
// pool bounds the quickest time by what the server says of itself, and its
// establishments after the first wait until it has read that (see
// pool.WithServerFacts). Whatever the pacer
// decides, a process opens at most 200 TCP connections a second and has at
// most 32 establishments in flight, and failed connects back off with full
// jitter.
const (
	// DefaultStartupJitter is the window over which a new Dialer's first
	// connection is delayed.
	DefaultStartupJitter = time.Second
	// DefaultConnectRate is the ceiling of the sustained rate of new TCP
	// connections.
	DefaultConnectRate rate.Limit = 200
	// DefaultConnectBurst is how many TCP connections may be opened at once
	// after a quiet spell, at most.
	DefaultConnectBurst = 32
	// DefaultMaxConnecting is how many connection establishments may be in
	// flight at once, at most.
	DefaultMaxConnecting = 32
	// DefaultResponseTarget is the pacer's target: the postmaster's response
	// time may reach this multiple of the smallest one seen before the
	// pacer lets fewer connects wait for it. Measured in the demo's pools
	// scenario (13-17 pools × 25 on a machine forking 38-50 connects a
	// second, alternating runs): at 1.5, an unrelated client's connect p99
	// was 7-9× idle with every pool ready at 1.09-1.57× the physical limit
	// (8 runs); at 2, 7-13× at 1.05-1.36× (9 runs).
	DefaultResponseTarget = 1.5
)

// MaxRecoveryWindow bounds the recovery window a pool sizes from the
// server's facts (pool.WithServerFacts), however many connections the
// server held.
const MaxRecoveryWindow = engine.MaxRecoveryWindow

// Option configures a [Dialer].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

// config is what options set: the engine's Config, and the errors of
// invalid options. newConfig fills in the documented defaults first;
// options then override them in order.
type config struct {
	engine.Config
	errs []error
}

func newConfig(opts ...Option) (*engine.Config, error) {
	c := &config{Config: engine.Config{
		Window:         DefaultStartupJitter,
		Limit:          DefaultConnectRate,
		Burst:          DefaultConnectBurst,
		MaxConnecting:  DefaultMaxConnecting,
		ResponseTarget: DefaultResponseTarget,
		NewBackOff:     DefaultBackOff,
		Rand:           jitter.Float64,
	}}
	for _, o := range opts {
		if o != nil {
			o.apply(c)
		}
	}
	if len(c.errs) > 0 {
		return nil, c.errs[0]
	}
	if c.TracerProvider == nil {
		c.TracerProvider = otel.GetTracerProvider()
	}
	if c.MeterProvider == nil {
		c.MeterProvider = otel.GetMeterProvider()
	}
	return &c.Config, nil
}

func (c *config) invalid(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// WithStartupJitter delays the first connection establishment by a uniform
// random delay in [0, window), computed at nanosecond resolution. Every
// establishment started before that moment waits for it too, each bounded by
// its caller's context. Zero turns the delay off. Default
// [DefaultStartupJitter] (1s); [WithFleet] derives it for a fleet.
func WithStartupJitter(window time.Duration) Option {
	return optionFunc(func(c *config) {
		if window < 0 {
			c.invalid("WithStartupJitter(%v): window must not be negative", window)
			return
		}
		c.Window, c.WindowSet = window, true
	})
}

// WithConnectRate limits new TCP connections to r per second with bursts of
// up to burst, using a token bucket of its own. Every TCP connection the
// server forks a backend for takes a token: multi-host fallbacks,
// sslmode=prefer's second dial and CancelRequests included. rate.Inf turns
// the limit off.
// It is a ceiling over what the pacer decides ([WithResponseTarget]).
// Default [DefaultConnectRate] (200/s), burst [DefaultConnectBurst] (32).
func WithConnectRate(r rate.Limit, burst int) Option {
	return optionFunc(func(c *config) {
		switch {
		case math.IsNaN(float64(r)) || r <= 0:
			c.invalid("WithConnectRate(%v, %d): rate must be positive", float64(r), burst)
			return
		case burst < 1 && r != rate.Inf:
			c.invalid("WithConnectRate(%v, %d): burst must be at least 1", float64(r), burst)
			return
		}
		c.Limit, c.Burst, c.RateSet, c.Limiter = r, burst, true, nil
	})
}

// WithLimiter makes the Dialer take its tokens from l, a limiter it shares:
// pass one limiter to several pools or dialers of a process to cap them
// together. It overrides [WithConnectRate] and the rate [WithFleet] derives.
// Default: a limiter of the Dialer's own.
func WithLimiter(l *rate.Limiter) Option {
	return optionFunc(func(c *config) {
		if l == nil {
			c.invalid("WithLimiter(nil): limiter must not be nil")
			return
		}
		if l.Limit() != rate.Inf && l.Burst() < 1 {
			c.invalid("WithLimiter: limiter burst %d admits no connection", l.Burst())
			return
		}
		c.Limiter, c.RateSet = l, true
	})
}

// WithMaxConnecting allows at most n connection establishments in flight at
// once (from the gate's admission to the end of authentication and
// start-up); more wait for a slot, each bounded by its caller's context. It
// is also the ceiling of the pacer's limit ([WithResponseTarget]). Default
// [DefaultMaxConnecting] (32).
func WithMaxConnecting(n int) Option {
	return optionFunc(func(c *config) {
		if n < 1 {
			c.invalid("WithMaxConnecting(%d): n must be at least 1", n)
			return
		}
		c.MaxConnecting = n
	})
}

// WithResponseTarget sets the pacer's target, or turns the pacer off with 0.
//
// The pacer decides how many establishments may be under way at once, from
// the server's response time on each new connection: from pgconn's first
// lookup or dial until the connection is ready, which is the postmaster's
// accept queue, the fork and the backend's start-up. The start-up counts
// because it runs on the server's cores beside every other backend
// starting, after the backend's first byte: a pacer that stopped at that
// byte left a fleet of 60 pools × 25 driving an unrelated client's connect
// p99 to 35-73× idle, where the whole establishment keeps it at 12-22×
// (BENCHMARKS.md). It keeps the quickest establishment seen as the idle
// baseline, across failures, and probes it alone every 10s or so; while a
// moving average of recent response times stays within ratio × baseline
// (or 2ms above the baseline, if more: on a loopback server answering in
// half a millisecond, a millisecond or two more is the machine's noise,
// not a queue) it lets more connects wait, doubling per round of connects at
// first, then one more per round; past it, it lets fewer, in proportion to the excess
// (by a tenth to a half, once per round; at every answer, and by up to
// seven eighths, past twice the target). Below one connect under way it
// has one under way the share of the time it allows, at least 1/64: after
// each answer it pauses in proportion to the time the answer took (as much
// as the target allows), and each answer within the target adds an
// eighth; after 10s with nothing under way past that pause, what it
// learned is stale, and it lets one connect probe, with no pause (a
// single-connection process whose one connect was answered in a fleet's
// start-up storm would otherwise keep that storm's limit for good). After
// a transient failure
// (refused, 53300 too_many_connections, 57P03, a timeout) it lets one
// connect probe, then doubles again. Every client of a server sees the same
// queue, so a ratio target bounds the connect latency of all of them
// however many processes pace themselves. [WithMaxConnecting],
// [WithConnectRate] and [WithLimiter] stay ceilings over what it decides;
// its waits are [Stats].PacerWait. ratio must exceed 1. Default
// [DefaultResponseTarget] (1.5); 0 turns the pacer off.
func WithResponseTarget(ratio float64) Option {
	return optionFunc(func(c *config) {
		if ratio != 0 && !(ratio > 1 && !math.IsInf(ratio, 0)) {
			c.invalid("WithResponseTarget(%v): ratio must exceed 1, or be 0 to turn the pacer off", ratio)
			return
		}
		c.ResponseTarget = ratio
	})
}

// WithBackOff sets the retry policy for transient connect failures. newPolicy
// is called once per retry loop (and once for the Dialer's shared recovery
// state), since a backoff.BackOff keeps per-use state; backoff.Stop from it
// ends the loop with a [*GaveUpError]. Default [DefaultBackOff]: exponential
// from 100ms doubling to 5s, giving up after 30s, with full jitter.
//
// After a transient failure, every later establishment of the process, in
// a retry loop or not, waits for the shared policy's next interval, then
// for the process's next place in a reconnect cycle: the first instant,
// once the bucket holds a token, whose offset into a wall-clock cycle as
// long as the recovery window ([Dialer.RecoveryWindow]) is the process's
// phase: a fleet member's [Plan].Phase; otherwise, once the process has
// connected, [jitter.Weyl] of its newest connection's backend process ID
// (before that, Plan.Phase, a draw). A fleet that loses its server
// together comes back at its pace, most of it within one window of the
// server, in the same order each cycle, with no process drawing again
// into a tail; and a fleet whose backends the postmaster forked one after
// another, as it does in a fleet's start or a recovery, holds nearly
// consecutive process IDs, whose phases spread evenly over the cycle
// where independent draws clump. The recovery window is
// the startup window, or for a pool that is not a configured fleet the
// window the server's facts call for, if longer (see
// pool.WithServerFacts). A session the server ends as it shuts down or
// crashes (SQLSTATE 57P01 or 57P02, which pg_terminate_backend sends too)
// counts as a transient failure: the process's next establishment waits
// for its place instead of dialing a server that is going away. A dial
// refused at the TCP level, or reset or closed before the server sent a
// byte, gives its token back: the server forked nothing for it. In a fleet
// ([WithFleet]) every transient failure gives its tokens back, since the
// cycle already paces the process at one attempt a window, and waits for a
// token end on the process's place in a cycle of one refill.
func WithBackOff(newPolicy func() backoff.BackOff) Option {
	return optionFunc(func(c *config) {
		if newPolicy == nil {
			c.invalid("WithBackOff(nil): policy constructor must not be nil")
			return
		}
		c.NewBackOff = newPolicy
	})
}

// WithFleet budgets a whole fleet: size processes that start together, each
// with this configuration, and a server that should absorb serverBudget new
// TCP connections per second from all of them together: on average over
// the startup window, and at most afterwards.
// The Dialer derives
//
//	window = size × warm × dials ÷ serverBudget
//	rate   = max(serverBudget ÷ size, 1/60) per second, burst = (warm + 1) × dials
//
// where warm is the number of connections the process opens at start (a
// pool's max(MinConns, MinIdleConns, 1); 1 otherwise) and dials the TCP
// connections one connect costs (2 for sslmode=prefer, whose TLS attempt is
// redialled in plain text against a server without TLS). The burst keeps
// one connect to spare: a process that loses a connection it just opened
// (pgx closes a connection whose query outlives its context) replaces it
// at once instead of a refill later, up to a whole window; it needs the
// spare only when it connects more than warm times within a refill, so the
// fleet's rate holds. Explicit
// [WithStartupJitter], [WithConnectRate] and [WithLimiter] win over what
// WithFleet derives.
//
// The fleet's first connects decelerate over the window
// ([jitter.Decelerating]): the server forks more slowly the more backends
// it holds, so the fleet starts at 1.5× its budget and ends at 0.75×. Give
// each process its index with [WithFleetMember] to place the fleet on an
// even grid; random places clump.
//
// An operator can set the fleet per deployment in the connection string
// instead, as pgxpool's pool_* parameters set a pool:
// pgstagger_fleet_size, pgstagger_fleet_budget and pgstagger_fleet_member
// (postgres://app@db/app?pgstagger_fleet_size=500&pgstagger_fleet_budget=200).
// They win over the options and are removed before pgx sees the
// configuration; a bad value fails Install, and so pool.New, with
// [ErrInvalidOption] naming the parameter and the value. Default: no fleet.
func WithFleet(size int, serverBudget float64) Option {
	return optionFunc(func(c *config) {
		switch {
		case size < 1:
			c.invalid("WithFleet(%d, %v): size must be at least 1", size, serverBudget)
			return
		case math.IsNaN(serverBudget) || math.IsInf(serverBudget, 0) || serverBudget <= 0:
			c.invalid("WithFleet(%d, %v): serverBudget must be a positive number of connections per second", size, serverBudget)
			return
		}
		c.FleetSize, c.FleetBudget = size, serverBudget
	})
}

// WithFleetMember places this process at index i, 0 ≤ i < size, of its
// fleet (see [WithFleet]), for fleets that number their members (a
// StatefulSet's ordinal, a job's array index): its first connects start at
// the middle of its own slot of the window, (i + ½) ÷ size of the fleet's
// order, and after a failure it reconnects at that place in each cycle.
// The index is checked against the fleet's size, which may come from the
// connection string, when the Dialer is installed. Default: a random place.
func WithFleetMember(i int) Option {
	return optionFunc(func(c *config) {
		if i < 0 {
			c.invalid("WithFleetMember(%d): the index must not be negative", i)
			return
		}
		c.FleetMember, c.FleetMemberSet = i, true
	})
}

// WithRand sets the random draw behind the process's phase and the
// pacer's probes, for reproducible delays (tests, simulations): the startup
// delay is r() × window, or [jitter.Decelerating](window, r()) in a fleet
// whose member index is not given. It must return values in [0, 1) and be
// safe for concurrent use. Default [jitter.Float64].
func WithRand(r jitter.Rand) Option {
	return optionFunc(func(c *config) {
		if r == nil {
			c.invalid("WithRand(nil): draw must not be nil")
			return
		}
		c.Rand = r
	})
}

// WithTracerProvider sets where connect spans go. nil is ignored. Default:
// the global provider (otel.GetTracerProvider) when the Dialer is created.
//
// Every establishment gets a pgstagger.connect span: a child of the
// caller's span, or the root of a trace of its own for a pool's background
// work ([ReasonWarmUp], [ReasonRefill]). Child spans cover each wait the
// gate imposed (pgstagger.wait.*), the lookup, each TCP dial, the TLS
// handshake and server startup; [AttrPostmasterResponseTime] is measured on
// the wire. Failures carry error.type and db.response.status_code (the
// SQLSTATE). No span carries a password.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return optionFunc(func(c *config) {
		if tp != nil {
			c.TracerProvider = tp
		}
	})
}

// WithMeterProvider sets where the connection metrics go. nil is ignored.
// Default: the global provider (otel.GetMeterProvider) when the Dialer is
// created.
//
// The metrics are db.client.connection.create_time (semantic conventions),
// pgstagger.connect.attempts by [AttrOutcome], pgstagger.connect.wait_time by
// [AttrWait] and pgstagger.postmaster.response_time, with histogram
// boundaries from 0.5ms to 60s.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return optionFunc(func(c *config) {
		if mp != nil {
			c.MeterProvider = mp
		}
	})
}

// WithLogger logs connect failures (Warn, or Error when permanent), retries
// (Info) and sheds (Info) to l. Lines carry the pool name, server address,
// reason, attempt and error, never a password. Default: no logging.
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) { c.Logger = l })
}

// WithPoolName sets the db.client.connection.pool.name attribute of spans,
// metrics and log lines. Default: server.address:server.port/db.namespace of
// the configuration the Dialer is first installed on, as the semantic
// conventions suggest.
func WithPoolName(name string) Option {
	return optionFunc(func(c *config) { c.PoolName = name })
}

// DefaultBackOff is the default retry policy: exponential from 100ms,
// doubling up to 5s between attempts, giving up once 30s have passed, with
// full jitter (each wait uniform over [0, interval)).
func DefaultBackOff() backoff.BackOff {
	return FullJitter(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMultiplier(2),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(30*time.Second),
		backoff.WithRandomizationFactor(0),
	), jitter.Float64)
}

// FullJitter wraps b so that each wait is uniform over [0, b's wait) using
// the draw r (nil means [jitter.Float64]). backoff.Stop passes through.
func FullJitter(b backoff.BackOff, r jitter.Rand) backoff.BackOff {
	if r == nil {
		r = jitter.Float64
	}
	return &fullJitter{BackOff: b, rand: r}
}

type fullJitter struct {
	backoff.BackOff
	rand jitter.Rand
}

func (f *fullJitter) NextBackOff() time.Duration {
	d := f.BackOff.NextBackOff()
	if d == backoff.Stop {
		return d
	}
	return jitter.Uniform(d, f.rand())
}
