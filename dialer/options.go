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

	"github.com/pgstagger/pgstagger/jitter"
)

// Defaults of a [Dialer] built with no options. Together they already keep
// one process from stampeding the server: its first connections wait a
// random part of a second, it opens at most 20 TCP connections a second and
// at most 2 at a time, and failed connects back off with full jitter.
const (
	// DefaultStartupJitter is the window over which a new Dialer's first
	// connection is delayed.
	DefaultStartupJitter = time.Second
	// DefaultConnectRate is the sustained rate of new TCP connections.
	DefaultConnectRate rate.Limit = 20
	// DefaultConnectBurst is how many TCP connections may be opened at once
	// after a quiet spell.
	DefaultConnectBurst = 4
	// DefaultMaxConnecting is how many connection establishments may be in
	// flight at once (the MongoDB drivers' maxConnecting default).
	DefaultMaxConnecting = 2
)

// Option configures a [Dialer].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

// config is what options set. newConfig fills in the documented defaults
// first; options then override them in order.
type config struct {
	window    time.Duration
	windowSet bool

	limit   rate.Limit
	burst   int
	rateSet bool
	limiter *rate.Limiter

	maxConnecting int
	newBackOff    func() backoff.BackOff

	fleetSize   int
	fleetBudget float64

	rand jitter.Rand

	tracerProvider trace.TracerProvider
	meterProvider  metric.MeterProvider
	logger         *slog.Logger
	poolName       string

	errs []error
}

func newConfig(opts ...Option) (*config, error) {
	c := &config{
		window:        DefaultStartupJitter,
		limit:         DefaultConnectRate,
		burst:         DefaultConnectBurst,
		maxConnecting: DefaultMaxConnecting,
		newBackOff:    DefaultBackOff,
		rand:          jitter.Float64,
	}
	for _, o := range opts {
		if o != nil {
			o.apply(c)
		}
	}
	if len(c.errs) > 0 {
		return nil, c.errs[0]
	}
	if c.tracerProvider == nil {
		c.tracerProvider = otel.GetTracerProvider()
	}
	if c.meterProvider == nil {
		c.meterProvider = otel.GetMeterProvider()
	}
	return c, nil
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
		c.window, c.windowSet = window, true
	})
}

// WithConnectRate limits new TCP connections to r per second with bursts of
// up to burst, using a token bucket of its own. Every TCP connection the
// server forks a backend for takes a token: multi-host fallbacks,
// sslmode=prefer's second dial and CancelRequests included. rate.Inf turns
// the limit off.
// Default [DefaultConnectRate] (20/s), burst [DefaultConnectBurst] (4).
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
		c.limit, c.burst, c.rateSet, c.limiter = r, burst, true, nil
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
		c.limiter, c.rateSet = l, true
	})
}

// WithMaxConnecting allows at most n connection establishments in flight at
// once; more wait for a slot, each bounded by its caller's context. Default
// [DefaultMaxConnecting] (2).
func WithMaxConnecting(n int) Option {
	return optionFunc(func(c *config) {
		if n < 1 {
			c.invalid("WithMaxConnecting(%d): n must be at least 1", n)
			return
		}
		c.maxConnecting = n
	})
}

// WithBackOff sets the retry policy for transient connect failures. newPolicy
// is called once per retry loop (and once for the Dialer's shared recovery
// state), since a backoff.BackOff keeps per-use state; backoff.Stop from it
// ends the loop with a [*GaveUpError]. Default [DefaultBackOff]: exponential
// from 100ms doubling to 5s, giving up after 30s, with full jitter.
func WithBackOff(newPolicy func() backoff.BackOff) Option {
	return optionFunc(func(c *config) {
		if newPolicy == nil {
			c.invalid("WithBackOff(nil): policy constructor must not be nil")
			return
		}
		c.newBackOff = newPolicy
	})
}

// WithFleet budgets a whole fleet: size processes that start together, each
// with this configuration, and a server that should absorb at most
// serverBudget new TCP connections per second from all of them together.
// The Dialer derives
//
//	window = size × warm × dials ÷ serverBudget
//	rate   = max(serverBudget ÷ size, 1/60) per second, burst = warm × dials
//
// where warm is the number of connections the process opens at start (a
// pool's max(MinConns, MinIdleConns, 1); 1 otherwise) and dials the TCP
// connections one connect costs (2 for sslmode=prefer, whose TLS attempt is
// redialled in plain text against a server without TLS). Explicit
// [WithStartupJitter], [WithConnectRate] and [WithLimiter] win over what
// WithFleet derives. Default: no fleet.
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
		c.fleetSize, c.fleetBudget = size, serverBudget
	})
}

// WithRand sets the random draw behind the startup delay, for
// reproducible delays (tests, simulations): the delay is r() × window. It
// must return values in [0, 1) and be safe for concurrent use. Default
// [jitter.Float64].
func WithRand(r jitter.Rand) Option {
	return optionFunc(func(c *config) {
		if r == nil {
			c.invalid("WithRand(nil): draw must not be nil")
			return
		}
		c.rand = r
	})
}

// WithTracerProvider sets where connect spans go. nil is ignored. Default:
// the global provider (otel.GetTracerProvider) when the Dialer is created.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return optionFunc(func(c *config) {
		if tp != nil {
			c.tracerProvider = tp
		}
	})
}

// WithMeterProvider sets where the connection metrics go. nil is ignored.
// Default: the global provider (otel.GetMeterProvider) when the Dialer is
// created.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return optionFunc(func(c *config) {
		if mp != nil {
			c.meterProvider = mp
		}
	})
}

// WithLogger logs connect failures (Warn, or Error when permanent), retries
// (Info) and sheds (Info) to l. Lines carry the pool name, server address,
// reason, attempt and error, never a password. Default: no logging.
func WithLogger(l *slog.Logger) Option {
	return optionFunc(func(c *config) { c.logger = l })
}

// WithPoolName sets the db.client.connection.pool.name attribute of spans,
// metrics and log lines. Default: server.address:server.port/db.namespace of
// the configuration the Dialer is first installed on, as the semantic
// conventions suggest.
func WithPoolName(name string) Option {
	return optionFunc(func(c *config) { c.poolName = name })
}

// minFleetRate is the floor of the per-process rate WithFleet derives: one
// connection a minute, so that a huge fleet still lets each process replace
// a lost connection in bounded time.
const minFleetRate rate.Limit = 1.0 / 60

// Plan is what a Dialer resolved from its options for the connection
// configuration it was first installed on.
type Plan struct {
	StartupWindow time.Duration // window of the startup delay
	Rate          rate.Limit    // new TCP connections per second (of the shared limiter with WithLimiter)
	Burst         int
	MaxConnecting int
	Warm          int // connections the process opens at start
	Dials         int // TCP connections one connect may cost
}

// plan resolves the options for a process that opens warm connections at
// start, each costing up to dials TCP connections.
func (c *config) plan(warm, dials int) Plan {
	warm, dials = max(warm, 1), max(dials, 1)
	p := Plan{StartupWindow: c.window, Rate: c.limit, Burst: c.burst, MaxConnecting: c.maxConnecting, Warm: warm, Dials: dials}
	if c.fleetSize > 0 {
		demand := float64(c.fleetSize) * float64(warm) * float64(dials)
		if !c.windowSet {
			p.StartupWindow = saturatingSeconds(demand / c.fleetBudget)
		}
		if !c.rateSet {
			p.Rate = max(rate.Limit(c.fleetBudget/float64(c.fleetSize)), minFleetRate)
			p.Burst = int(min(float64(warm)*float64(dials), math.MaxInt32))
		}
	}
	if c.limiter != nil {
		p.Rate, p.Burst = c.limiter.Limit(), c.limiter.Burst()
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
