package dialer

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/internal/engine"
)

// Dialer is the connection-establishment gate. Installed on a connection
// configuration, it makes every establishment wait for the startup delay,
// the recovery backoff after failures and a connecting slot, and every TCP
// connection take a token from the bucket, shedding at once the waits that
// cannot fit the caller's deadline.
//
// A Dialer is safe for concurrent use. Close it to end every wait.
type Dialer struct {
	g *engine.Gate
}

// New returns a Dialer configured by opts. It does no I/O. Invalid options
// fail with an error matching [ErrInvalidOption] that names the option and
// the value.
func New(opts ...Option) (*Dialer, error) {
	cfg, err := newConfig(opts...)
	if err != nil {
		return nil, err
	}
	g, err := engine.New(cfg)
	if err != nil {
		return nil, err
	}
	return &Dialer{g: g}, nil
}

// Install makes the Dialer gate every connection made with cfg: it wraps
// cfg's DialFunc (or the default one) and LookupFunc, and composes the
// Dialer's tracer with cfg.Tracer through pgx's multitracer. It reads and
// removes the connection string's pgstagger_fleet_* parameters (see
// [WithFleet]) from cfg.RuntimeParams. It fails if cfg is nil, already has
// a Dialer installed, or carries fleet parameters that are invalid or
// differ from those of the configuration the Dialer was first installed
// on.
//
// With a multi-host connection string (host=a,b), a host whose dial failed,
// or that accepted and sent nothing until connect_timeout, is skipped
// without a dial for the retry policy's next interval while another host of
// the list is up, so a dead first host is not dialed, or waited on, before
// every connection to the live one ([Stats].HostsSkipped).
func (d *Dialer) Install(cfg *pgx.ConnConfig) error {
	return d.g.Install(cfg, 1, false)
}

// InstallPool is [Dialer.Install] for a pool's configuration: connections
// pgxpool makes for Acquire, for MinConns/MinIdleConns and for health-check
// refills all pass the gate. For [WithFleet], the process's warm-up is
// max(MinConns, MinIdleConns, 1) connections.
func (d *Dialer) InstallPool(cfg *pgxpool.Config) error {
	if cfg == nil {
		return fmt.Errorf("%w: InstallPool(nil)", ErrInvalidOption)
	}
	return d.g.Install(cfg.ConnConfig, max(int(cfg.MinConns), int(cfg.MinIdleConns), 1), true)
}

// Connect establishes one connection with cfg through the gate, retrying
// transient failures with the backoff policy until it succeeds, the policy
// gives up ([*GaveUpError]) or ctx ends. cfg is copied, not modified; it
// must have been created by pgx.ParseConfig.
func (d *Dialer) Connect(ctx context.Context, cfg *pgx.ConnConfig) (*pgx.Conn, error) {
	if cfg == nil {
		return nil, fmt.Errorf("%w: Connect with a nil *pgx.ConnConfig", ErrInvalidOption)
	}
	cfg = cfg.Copy()
	if engine.Installed(cfg.Tracer) == nil {
		if err := d.Install(cfg); err != nil {
			return nil, err
		}
	}
	var conn *pgx.Conn
	err := d.Retry(ctx, func(ctx context.Context) error {
		var err error
		conn, err = pgx.ConnectConfig(ctx, cfg)
		return err
	})
	return conn, err
}

// Connect parses connString, builds a Dialer with opts and establishes one
// connection through it, with the Dialer's startup delay, rate limit and
// retries. Share a limiter with [WithLimiter] to pace many Connect calls
// together. Invalid options or connection strings fail before any wait,
// with an error that never contains the password.
func Connect(ctx context.Context, connString string, opts ...Option) (*pgx.Conn, error) {
	d, err := New(opts...)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	cfg, err := ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	return d.Connect(ctx, cfg)
}

// ParseConfig is pgx.ParseConfig with errors that match [ErrInvalidOption]
// and never contain the password, even where pgx's own would.
func ParseConfig(connString string) (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(connString)
	if err != nil {
		return nil, engine.ConnStringError(connString, err)
	}
	return cfg, nil
}

// Retry runs op until it succeeds or fails other than by a transient
// connection-establishment failure (see [Classify]); query errors on an
// established connection are returned at once, never retried. Between
// attempts it waits the backoff policy's delay; a delay that cannot end
// before ctx's deadline ends the loop at once with a [*GaveUpError]
// matching context.DeadlineExceeded, as does backoff.Stop (without it), and
// so does an attempt the gate sheds, wrapping the last real failure. Each
// attempt also waits for the Dialer's recovery delay after failures (see
// the package documentation). The ctx passed to op marks the attempt's
// number, which spans and logs report.
func (d *Dialer) Retry(ctx context.Context, op func(ctx context.Context) error) error {
	return d.g.Retry(ctx, op)
}

// Close ends every wait of the Dialer's establishments and retry loops with
// [ErrClosed] and cancels establishments in flight. Later establishments fail
// with ErrClosed. Close is idempotent.
func (d *Dialer) Close() { d.g.Close() }

// RecoveryWindow is the period of the reconnect cycle after a transient
// failure or a session the server ended: the startup window, or for a
// pool that is not a configured fleet ([WithFleet]) and has read the
// server's facts (pool.WithServerFacts), the window over which the
// connections the server held come back at half the fastest rate they
// were seen to grow, or at a quarter of the rate of a postmaster taking the
// pacer's baseline per connect if that is faster, if longer; at most
// [MaxRecoveryWindow].
func (d *Dialer) RecoveryWindow() time.Duration { return d.g.RecoveryWindow() }

// Plan is what a Dialer resolved from its options for the connection
// configuration it was first installed on.
type Plan struct {
	StartupWindow time.Duration // window of the startup delay, and the least period of the reconnect cycle
	StartupDelay  time.Duration // this process's startup delay: its place in the window
	// Phase is this process's place in its fleet's order, in [0, 1): the
	// middle of its slot, (member + ½) ÷ size, for a fleet member, else a
	// draw. After a failure a fleet member reconnects at this offset into
	// a wall-clock cycle as long as [Dialer.RecoveryWindow]; another
	// process does too until it has connected, and then at
	// [github.com/pgstagger/pgstagger/jitter.Weyl] of its newest
	// connection's backend process ID (see [WithBackoff]).
	Phase          float64
	Rate           rate.Limit // new TCP connections per second (of the shared limiter with WithLimiter)
	Burst          int
	MaxConnecting  int     // establishments in flight at most
	ResponseTarget float64 // the pacer's target (0: off)
	Warm           int     // connections the process opens at start
	Dials          int     // TCP connections one connect may cost
	FleetSize      int     // processes in the fleet (0: no fleet)
	FleetBudget    float64 // new connections per second the fleet may cost the server
	FleetMember    int     // this process's index in the fleet, -1 if not given
}

// Plan returns what the Dialer resolved from its options once installed
// (the zero Plan before).
func (d *Dialer) Plan() Plan { return Plan(d.g.Plan()) }
