package dialer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/multitracer"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/jitter"
)

// Dialer is the connection-establishment gate. Installed on a connection
// configuration, it makes every establishment wait for the startup delay,
// the recovery backoff after failures and a connecting slot, and every TCP
// connection take a token from the bucket, shedding at once the waits that
// cannot fit the caller's deadline.
//
// A Dialer is safe for concurrent use. Close it to end every wait.
type Dialer struct {
	cfg *config

	bindOnce sync.Once
	isBound  atomic.Bool   // bind has run; the four fields below are set
	plan     Plan          // set once by bind
	limiter  *rate.Limiter // set once by bind
	release  time.Time     // set once by bind: end of the startup delay
	released atomic.Bool   // release has passed

	slots chan struct{} // connecting slots; a send takes one

	inflight atomic.Int32 // establishments between begin and end

	// connectTime is a moving average of how long successful
	// establishments took once admitted, in nanoseconds (0: none yet).
	connectTime atomic.Int64

	closeCtx context.Context // done once Close is called, with cause ErrClosed
	closeFn  context.CancelCauseFunc

	failing atomic.Bool // until is set: read on the hot path without mu

	mu       sync.Mutex      // guards the recovery state below
	recovery backoff.BackOff // shared policy for establishments outside retry loops
	until    time.Time       // no new establishment touches the server before this
	failedAt time.Time       // when the failure that set until was recorded

	hosts *hostHealth // backed-off hosts of multi-host connection strings

	tel     *telemetry
	forPool bool // set once by bind: installed on a pool's configuration

	stats counters
}

// New returns a Dialer configured by opts. It does no I/O. Invalid options
// fail with an error matching [ErrInvalidOption] that names the option and
// the value.
func New(opts ...Option) (*Dialer, error) {
	cfg, err := newConfig(opts...)
	if err != nil {
		return nil, err
	}
	tel, err := newTelemetry(cfg)
	if err != nil {
		return nil, err
	}
	d := &Dialer{
		cfg:      cfg,
		tel:      tel,
		slots:    make(chan struct{}, cfg.maxConnecting),
		recovery: cfg.newBackOff(),
		hosts:    newHostHealth(cfg.newBackOff),
	}
	d.closeCtx, d.closeFn = context.WithCancelCause(context.Background())
	return d, nil
}

// bind resolves the options for the first configuration the Dialer is
// installed on and starts the startup delay.
func (d *Dialer) bind(cfg *pgconn.Config, warm int, forPool bool) {
	d.bindOnce.Do(func() {
		d.forPool = forPool
		d.tel.bind(d.cfg.poolName, cfg)
		d.plan = d.cfg.plan(warm, dialsPerConnect(cfg))
		d.limiter = d.cfg.limiter
		if d.limiter == nil {
			d.limiter = rate.NewLimiter(d.plan.Rate, d.plan.Burst)
		}
		d.release = time.Now().Add(jitter.Uniform(d.plan.StartupWindow, d.cfg.rand()))
		if d.plan.StartupWindow == 0 {
			d.released.Store(true)
		}
		d.isBound.Store(true)
	})
}

// PoolName is the db.client.connection.pool.name the Dialer reports ("" before
// it is installed).
func (d *Dialer) PoolName() string {
	if !d.isBound.Load() {
		return ""
	}
	return d.tel.poolName
}

// Plan returns what the Dialer resolved from its options once installed
// (the zero Plan before).
func (d *Dialer) Plan() Plan {
	if !d.isBound.Load() {
		return Plan{}
	}
	return d.plan
}

// Install makes the Dialer gate every connection made with cfg: it wraps
// cfg's DialFunc (or the default one) and composes the Dialer's tracer with
// cfg.Tracer through pgx's multitracer. It fails if cfg is nil or already
// has a Dialer installed.
func (d *Dialer) Install(cfg *pgx.ConnConfig) error {
	return d.install(cfg, 1, false)
}

// InstallPool is [Dialer.Install] for a pool's configuration: connections
// pgxpool makes for Acquire, for MinConns/MinIdleConns and for health-check
// refills all pass the gate. For [WithFleet], the process's warm-up is
// max(MinConns, MinIdleConns, 1) connections.
func (d *Dialer) InstallPool(cfg *pgxpool.Config) error {
	if cfg == nil {
		return fmt.Errorf("%w: InstallPool(nil)", ErrInvalidOption)
	}
	return d.install(cfg.ConnConfig, max(int(cfg.MinConns), int(cfg.MinIdleConns), 1), true)
}

func (d *Dialer) install(cfg *pgx.ConnConfig, warm int, forPool bool) error {
	if cfg == nil {
		return fmt.Errorf("%w: Install(nil)", ErrInvalidOption)
	}
	if installed(cfg.Tracer) {
		return fmt.Errorf("%w: a pgstagger Dialer is already installed on this configuration", ErrInvalidOption)
	}
	d.bind(&cfg.Config, warm, forPool)
	next := cfg.DialFunc
	if next == nil {
		var nd net.Dialer
		next = nd.DialContext
	}
	cfg.DialFunc = d.dialFunc(next, hostGroup(&cfg.Config))
	lookup := cfg.LookupFunc
	if lookup == nil {
		lookup = net.DefaultResolver.LookupHost
	}
	cfg.LookupFunc = d.lookupFunc(lookup)
	cfg.AfterNetConnect = afterNetConnect(cfg.AfterNetConnect)
	t := &tracer{d: d}
	if cfg.Tracer == nil {
		cfg.Tracer = t
	} else {
		cfg.Tracer = multitracer.New(cfg.Tracer, t)
	}
	return nil
}

// installed reports whether a pgstagger tracer is already part of t.
func installed(t pgx.QueryTracer) bool {
	switch t := t.(type) {
	case *tracer:
		return true
	case *multitracer.Tracer:
		for _, q := range t.QueryTracers {
			if installed(q) {
				return true
			}
		}
	}
	return false
}

// dialsPerConnect is how many TCP connections one connect may cost: one per
// fallback configuration to the first host (sslmode=prefer lists the host
// twice, with and without TLS).
func dialsPerConnect(cfg *pgconn.Config) int {
	n := 1
	for _, fb := range cfg.Fallbacks {
		if fb.Host == cfg.Host && fb.Port == cfg.Port {
			n++
		}
	}
	return n
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
	if !installed(cfg.Tracer) {
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
	return d.retry(ctx, 1, op(withCaller(ctx, 1)), op)
}

// RetryAfter continues a retry loop whose first attempt, made without
// [Dialer.Retry], failed with err: it returns err at once unless err is a
// transient establishment failure, and otherwise waits and calls op as
// Retry does. It lets a caller keep its first attempt free of any set-up.
func (d *Dialer) RetryAfter(ctx context.Context, err error, op func(ctx context.Context) error) error {
	return d.retry(ctx, 1, err, op)
}

func (d *Dialer) retry(ctx context.Context, attempt int, err error, op func(ctx context.Context) error) error {
	var policy backoff.BackOff
	for ; err != nil; attempt++ {
		if d.closeCtx.Err() != nil && !errors.Is(err, ErrClosed) {
			return fmt.Errorf("%w: %w", ErrClosed, err)
		}
		if !isEstablishment(err) || Classify(err) != Transient {
			return err
		}
		if ctx.Err() != nil {
			return &GaveUpError{Attempts: attempt, Err: err, ctxErr: ctx.Err()}
		}
		if policy == nil {
			policy = d.cfg.newBackOff()
		}
		wait := policy.NextBackOff()
		if wait == backoff.Stop {
			return &GaveUpError{Attempts: attempt, Err: err}
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			return &GaveUpError{Attempts: attempt, Err: err, ctxErr: context.DeadlineExceeded}
		}
		d.stats.retries.Add(1)
		if d.tel.log != nil {
			d.tel.log.LogAttrs(ctx, slog.LevelInfo, "pgstagger: retrying connect",
				slog.String(string(d.tel.poolAttr.Key), d.tel.poolName),
				slog.Int(string(AttrAttempt), attempt+1),
				slog.Duration("wait", wait),
				slog.Any("error", err))
		}
		start := d.startWait(waitBackoff)
		werr := d.sleep(ctx, wait)
		d.emitWait(ctx, waitBackoff, start, time.Now())
		if werr != nil {
			if errors.Is(werr, ErrClosed) {
				return fmt.Errorf("%w (last attempt: %w)", werr, err)
			}
			return &GaveUpError{Attempts: attempt, Err: err, ctxErr: ctx.Err()}
		}
		last := err
		err = op(withCaller(ctx, attempt+1))
		if Classify(err) == Shed {
			// The gate could not fit the next attempt before the
			// deadline: what the caller needs is the last real failure.
			return &GaveUpError{Attempts: attempt, Err: last, ctxErr: context.DeadlineExceeded}
		}
	}
	return nil
}

// sleep waits for d, until ctx ends or until the Dialer is closed.
func (d *Dialer) sleep(ctx context.Context, wait time.Duration) error {
	if wait <= 0 {
		return nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer context.AfterFunc(d.closeCtx, func() { cancel(ErrClosed) })()
	return jitter.Sleep(ctx, wait)
}

// CallerContext returns ctx marked so that, when a pool establishes a
// connection for a call made with it, the gate bounds its waits by ctx's
// deadline and cancellation and sheds at once a wait that cannot fit
// (pgxpool establishes connections on a context of its own, which keeps the
// caller's values but not its deadline). While the gate imposes no wait it
// returns ctx itself, so the call costs one atomic load on the hot path.
func (d *Dialer) CallerContext(ctx context.Context) context.Context {
	if !d.congested() || ctx.Done() == nil {
		return ctx
	}
	return withCaller(ctx, 0)
}

// congested reports whether a new establishment may have to wait.
func (d *Dialer) congested() bool {
	if d.inflight.Load() > 0 {
		return true
	}
	if !d.released.Load() && d.isBound.Load() {
		if time.Now().Before(d.release) {
			return true
		}
		d.released.Store(true)
	}
	return d.failing.Load()
}

// Close ends every wait of the Dialer's establishments and retry loops with
// [ErrClosed] and cancels establishments in flight. Later establishments fail
// with ErrClosed. Close is idempotent.
func (d *Dialer) Close() {
	d.closeFn(ErrClosed)
}

// caller is what withCaller puts in a context for the gate.
type caller struct {
	ctx     context.Context
	attempt int // 0 outside a retry loop
}

type callerKey struct{}

func withCaller(ctx context.Context, attempt int) context.Context {
	return context.WithValue(ctx, callerKey{}, &caller{ctx: ctx, attempt: attempt})
}

func callerOf(ctx context.Context) *caller {
	c, _ := ctx.Value(callerKey{}).(*caller)
	return c
}
