package pool

import (
	"log/slog"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/jitter"
)

// DefaultLifetimeJitterFraction is the MaxConnLifetimeJitter a pool uses,
// as a fraction of MaxConnLifetime, when the configuration sets none: with
// pgxpool's default 1h lifetime, connections live between 1h and 1h6m.
const DefaultLifetimeJitterFraction = 0.1

// Option configures a [Pool].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	dialer         []dialer.Option
	meterProvider  metric.MeterProvider
	lifetimeJitter time.Duration
	lifetimeSet    bool
	factsEvery     time.Duration
	factsSet       bool // WithServerFacts was given
	rand           jitter.Rand
	errs           []error
}

func newConfig(opts ...Option) (*config, error) {
	c := &config{rand: jitter.Float64, factsEvery: DefaultServerFactsEvery}
	for _, o := range opts {
		if o != nil {
			o.apply(c)
		}
	}
	if len(c.errs) > 0 {
		return nil, c.errs[0]
	}
	if c.meterProvider == nil {
		c.meterProvider = otel.GetMeterProvider()
	}
	return c, nil
}

func gate(o dialer.Option) Option {
	return optionFunc(func(c *config) { c.dialer = append(c.dialer, o) })
}

// WithStartupJitter delays the pool's first connection by a uniform random
// delay in [0, window), at nanosecond resolution. A caller that acquires
// during the delay waits with it, bounded by its own context; if its
// deadline falls before the end of the delay it gets an error matching
// [dialer.ErrShed] at once. Zero turns the delay off. Default 1s
// ([dialer.DefaultStartupJitter]).
func WithStartupJitter(window time.Duration) Option {
	return gate(dialer.WithStartupJitter(window))
}

// WithConnectRate limits the pool to r new TCP connections per second with
// bursts of burst, counting every connection the server forks a backend
// for (multi-host fallbacks and sslmode=prefer's second dial included).
// CancelRequest connections take a token too, waiting for it up to their
// own deadline. It is a ceiling over what the pacer decides
// ([WithResponseTarget]). Default 200/s, burst 32 ([dialer.DefaultConnectRate],
// [dialer.DefaultConnectBurst]).
func WithConnectRate(r rate.Limit, burst int) Option {
	return gate(dialer.WithConnectRate(r, burst))
}

// WithLimiter makes the pool take its tokens from l, shared with other pools
// or dialers of the process. Default: a limiter of the pool's own.
func WithLimiter(l *rate.Limiter) Option {
	return gate(dialer.WithLimiter(l))
}

// WithMaxConnecting allows at most n connection establishments in flight in
// the pool at once, and the ceiling of the pacer's limit. Default 32
// ([dialer.DefaultMaxConnecting]).
func WithMaxConnecting(n int) Option {
	return gate(dialer.WithMaxConnecting(n))
}

// WithResponseTarget sets the pacer's target ratio, or turns the pacer off
// with 0: the pacer lets more of the pool's establishments be under way at
// once while they take within ratio × the quickest one seen, and fewer
// when they take longer or a connect fails
// transiently. See [dialer.WithResponseTarget]. Default 1.5
// ([dialer.DefaultResponseTarget]).
func WithResponseTarget(ratio float64) Option {
	return gate(dialer.WithResponseTarget(ratio))
}

// WithBackOff sets the retry policy for transient connect failures;
// newPolicy is called once per retry loop. Default [dialer.DefaultBackOff]:
// exponential from 100ms doubling to 5s, giving up after 30s, full jitter.
func WithBackOff(newPolicy func() backoff.BackOff) Option {
	return gate(dialer.WithBackOff(newPolicy))
}

// WithFleet budgets a fleet of size processes starting together, each with
// this pool, against a server that should absorb serverBudget new TCP
// connections per second from all of them: the startup window becomes
// size × warm × dials ÷ serverBudget and the rate serverBudget ÷ size, where
// warm is max(MinConns, MinIdleConns, 1) and dials is 2 for sslmode=prefer,
// else 1. The connection string's pgstagger_fleet_size,
// pgstagger_fleet_budget and pgstagger_fleet_member parameters win over
// it. See [dialer.WithFleet]. Default: no fleet.
func WithFleet(size int, serverBudget float64) Option {
	return gate(dialer.WithFleet(size, serverBudget))
}

// WithFleetMember places this process at index i, 0 ≤ i < size, of its
// fleet, on an even grid in the startup window and the reconnect cycle.
// See [dialer.WithFleetMember]. Default: a random place.
func WithFleetMember(i int) Option {
	return gate(dialer.WithFleetMember(i))
}

// WithTracerProvider sets where connect spans go: one span per connection
// establishment, with child spans for every wait, dial, TLS handshake and
// server startup. nil is ignored. Default: the global provider.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return gate(dialer.WithTracerProvider(tp))
}

// WithMeterProvider sets where the pool's metrics go: the semantic
// conventions' db.client.connection.* instruments and pgstagger's own. nil
// is ignored. Default: the global provider. The acquire-path instruments
// (wait_time, use_time, pending_requests, timeouts) are recorded when the
// provider is in place as the pool is created; they cost nothing otherwise.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return optionFunc(func(c *config) {
		c.dialer = append(c.dialer, dialer.WithMeterProvider(mp))
		if mp != nil {
			c.meterProvider = mp
		}
	})
}

// WithLogger logs connect failures, retries and sheds to l, never with a
// password. Default: no logging.
func WithLogger(l *slog.Logger) Option {
	return gate(dialer.WithLogger(l))
}

// WithPoolName names the pool in spans, metrics and log lines
// (db.client.connection.pool.name). Default: host:port/database.
func WithPoolName(name string) Option {
	return gate(dialer.WithPoolName(name))
}

// WithDialerOptions passes options to the pool's [dialer.Dialer] as they are.
func WithDialerOptions(opts ...dialer.Option) Option {
	return optionFunc(func(c *config) { c.dialer = append(c.dialer, opts...) })
}

// WithLifetimeJitter sets the MaxConnLifetimeJitter the pool honours, at
// nanosecond resolution (pgxpool truncates it to whole seconds): each
// connection is retired after MaxConnLifetime plus a uniform random part of
// d. Zero turns it off. Default: the configuration's MaxConnLifetimeJitter,
// or, when that is zero, MaxConnLifetime × [DefaultLifetimeJitterFraction].
//
// A connection past its own lifetime is retired when it is next acquired
// (the acquire takes another) or by pgxpool's health check; pgxpool's check
// at release retires it once it is past MaxConnLifetime + d. With d = 0 a
// connection is retired when released, as pgxpool does. Retiring at release
// within the jitter would need pgxpool's AfterRelease hook, which runs every
// Release in a goroutine of its own.
func WithLifetimeJitter(d time.Duration) Option {
	return optionFunc(func(c *config) {
		if d < 0 {
			c.errs = append(c.errs, invalid("WithLifetimeJitter(%v): jitter must not be negative", d))
			return
		}
		c.lifetimeJitter, c.lifetimeSet = d, true
	})
}

// WithServerFacts sets how often, at most, the pool counts the connections
// the server holds (pg_stat_database's numbackends, readable by any role),
// learning from successive counts how fast the server has taken them on. A
// fleet that lost its connections to a restart or a crash then reconnects
// over a window long enough to bring them all back at half the fastest
// connect rate seen (at most [dialer.MaxRecoveryWindow]), each process at its own
// place in it, instead of all within the startup window; [WithFleet] sizes
// that window itself, and its own wins. See [dialer.Dialer.RecoveryWindow].
//
// The count is one query, run when it is due on the next connection the
// pool establishes or the next Acquire takes, before the caller gets it: it
// never opens a connection, costs one round trip, and goes through pgconn,
// so query tracers do not see it. It stops for good if the server cannot
// run it (an SQL proxy without PostgreSQL's statistics functions). The
// first is due at once, the next after 1s, then 2s, 4s … up to every, or
// 10ms per connection the server holds if that is longer (a fleet's counts
// cost the server in all about 10µs per process and second), each ±15%.
// On a server holding more than 3,200 connections the first intervals are
// longer too, 10ms ÷ 32 per connection at least (a pool of several keeps
// its second read, below): each read costs the server about as much as it
// holds, and a fleet joining one process after another would otherwise
// pay every process's first reads at the server's full size. The second
// read, and one at most every 4 × every or 100ms per connection held,
// also counts when the backends started, on a server holding 2,000 or
// more among a sample of a thousand or so (simulated, 100,000 workers
// joining at 679 a second and querying every 2 minutes: the server's CPU
// demand, queries included, 5.3 to 7.0 of its 2 cores from 55,000 to
// 81,000 connections held with neither, 0.7 to 2.2 with both). Zero turns
// it off.
// Default [DefaultServerFactsEvery] (30s), but off for a configured fleet's
// pool of one connection ([WithFleet] or pgstagger_fleet_size, and
// MaxConns 1): its reconnect window is the fleet's, so the facts would
// bound no more than its pacer's baseline, and a fleet of many such
// processes would pay every process's reads (simulated, 10,000 workers:
// a bystander's connect p99 132-140ms during a restart's recovery with the
// reads, 14ms without, the recovery as long; measured on this project's
// 2-core machine at 400-570 workers, no difference either way). Give
// WithServerFacts to read anyway, for the facts in [dialer.Dialer.Stats]
// and the metrics.
//
// A pool of more than one connection also uses the facts while it fills:
// its first read includes the history, the second comes after 600ms, and
// the fastest rate they show (over a second, or over a tenth of one, which
// a storm shows at once) bounds the pacer's baseline (an idle connect's
// first byte comes within a round trip, the quickest TCP handshake or
// facts read seen, and two forks at that rate; its start-up after that
// byte, authentication and the backend's own, is the quickest seen), so
// that a pool
// started inside a fleet's storm does not take the storm's queue for the
// server's idle speed. Its connects after the first wait for the first
// read (for a second at most), and its pacer's limit does not grow until
// those two reads are done (or one failed).
func WithServerFacts(every time.Duration) Option {
	return optionFunc(func(c *config) {
		if every < 0 {
			c.errs = append(c.errs, invalid("WithServerFacts(%v): the interval must not be negative", every))
			return
		}
		c.factsEvery, c.factsSet = every, true
	})
}

// withRand sets the draw for lifetime jitter (tests).
func withRand(r jitter.Rand) Option {
	return optionFunc(func(c *config) { c.rand = r })
}
