package pool

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/puddle/v2"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/engine"
)

// ErrClosed is returned (wrapped) by a closed pool's methods, and ends the
// waits of callers that were connecting when it was closed. It is
// [dialer.ErrClosed].
var ErrClosed = dialer.ErrClosed

// Pool is a pgxpool.Pool whose connection establishment passes a
// [dialer.Dialer]: startup jitter, a rate limit on new connections, a cap on
// establishments in flight and retries of transient connect failures. It has
// every method of *pgxpool.Pool with the same signature.
//
// A Pool is safe for concurrent use.
type Pool struct {
	p       *pgxpool.Pool
	d       *dialer.Dialer
	g       *engine.Gate        // d's engine
	config  *pgxpool.Config     // the caller's configuration, as given
	life    *lifetimes          // nil without lifetime jitter
	facts   *engine.FactsReader // nil with WithServerFacts(0)
	metrics *poolMetrics

	behind atomic.Bool // an acquire behind a shed one is under way (see fillBehind)
}

// New creates a pool from a connection string (pgxpool.ParseConfig syntax,
// pool_* parameters included) with the given options. Like pgxpool.New it
// does no I/O: connections are made when needed, MinConns/MinIdleConns in
// the background, all through the gate. Invalid options or connection
// strings fail with an error matching [dialer.ErrInvalidOption] that names
// the option or setting and never contains the password.
func New(ctx context.Context, connString string, opts ...Option) (*Pool, error) {
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, engine.ConnStringError(connString, err)
	}
	return NewWithConfig(ctx, cfg, opts...)
}

// NewWithConfig creates a pool from cfg, which must have been created by
// pgxpool.ParseConfig (one that was not fails with [dialer.ErrInvalidOption],
// where pgxpool panics). cfg is not modified: the pool works on a copy. The
// copy's hooks (BeforeConnect, AfterConnect, PrepareConn or BeforeAcquire,
// AfterRelease, BeforeClose, ShouldPing), ConnConfig.Tracer, DialFunc and
// LookupFunc keep working: the gate wraps DialFunc, joins the tracer through
// pgx's multitracer and wraps AfterConnect, PrepareConn and BeforeClose to
// honour sub-second lifetime jitter.
func NewWithConfig(ctx context.Context, cfg *pgxpool.Config, opts ...Option) (*Pool, error) {
	if cfg == nil {
		return nil, invalid("NewWithConfig: nil *pgxpool.Config")
	}
	if !madeByParseConfig(cfg) || cfg.ConnConfig == nil || !madeByParseConfig(cfg.ConnConfig) {
		return nil, invalid("NewWithConfig: a *pgxpool.Config not made by pgxpool.ParseConfig " +
			"(pgxpool would panic): make it with pgxpool.ParseConfig(connString), then set its fields")
	}
	if cfg.MaxConns < 1 {
		return nil, invalid("MaxConns %d: must be at least 1", cfg.MaxConns)
	}
	if cfg.MinConns < 0 || cfg.MinIdleConns < 0 {
		return nil, invalid("MinConns %d, MinIdleConns %d: must not be negative", cfg.MinConns, cfg.MinIdleConns)
	}
	if m := max(cfg.MinConns, cfg.MinIdleConns); m > cfg.MaxConns {
		// pgxpool accepts this and never reaches it.
		return nil, invalid("MinConns %d, MinIdleConns %d: must not exceed MaxConns %d", cfg.MinConns, cfg.MinIdleConns, cfg.MaxConns)
	}
	if cfg.MaxConnLifetimeJitter < 0 {
		return nil, invalid("MaxConnLifetimeJitter %v: must not be negative", cfg.MaxConnLifetimeJitter)
	}
	pc, err := newConfig(opts...)
	if err != nil {
		return nil, err
	}
	d, err := dialer.New(pc.dialer...)
	if err != nil {
		return nil, err
	}
	p := &Pool{d: d, config: cfg.Copy()}
	inner := cfg.Copy()
	p.life = newLifetimes(inner, pc)
	if err := d.InstallPool(inner); err != nil {
		return nil, err
	}
	p.g = engine.Installed(inner.ConnConfig.Tracer)
	every := pc.factsEvery
	if !pc.factsSet && !p.g.ReadsFacts(inner.MaxConns) {
		every = 0
	}
	p.facts = newServerFacts(inner, p.g, every, pc.rand)
	metrics, hooks, err := newPoolMetrics(pc.meterProvider, p.g.PoolName())
	if err != nil {
		return nil, err
	}
	join(inner.ConnConfig, hooks)
	p.p, err = pgxpool.NewWithConfig(engine.WarmUpContext(ctx), inner)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", dialer.ErrInvalidOption, err)
	}
	if err := metrics.observe(p.p, inner.MinIdleConns); err != nil {
		p.p.Close()
		return nil, err
	}
	p.metrics = metrics
	return p, nil
}

// madeByParseConfig reports whether cfg, a *pgxpool.Config or a
// *pgx.ConnConfig, says it was made by its package's ParseConfig, as pgxpool
// and pgx check before they use it (they panic otherwise). It reads their
// unexported flag, and reports true if a pgx release renames it.
func madeByParseConfig(cfg any) bool {
	f := reflect.ValueOf(cfg).Elem().FieldByName("createdByParseConfig")
	return !f.IsValid() || f.Kind() != reflect.Bool || f.Bool()
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{dialer.ErrInvalidOption}, args...)...)
}

// Unwrap returns the underlying *pgxpool.Pool for code that needs that type.
// Connections it establishes still pass the gate (startup jitter, rate
// limit, connecting slots, recovery backoff); only the retry loops of
// Pool's own methods are not there. For database/sql use [OpenDB], which
// keeps them, rather than stdlib.OpenDBFromPool(p.Unwrap()).
func (p *Pool) Unwrap() *pgxpool.Pool { return p.p }

// Dialer returns the pool's connection-establishment gate, for its
// [dialer.Dialer.Stats] and [dialer.Dialer.Plan].
func (p *Pool) Dialer() *dialer.Dialer { return p.d }

// Close ends every wait of callers that are connecting (with [ErrClosed]),
// closes all connections and rejects later calls. Like pgxpool's Close it
// blocks until acquired connections are released.
func (p *Pool) Close() {
	p.d.Close()
	p.p.Close()
	p.life.close()
	p.facts.Close()
	p.metrics.close()
}

// Acquire returns a connection from the pool, establishing one through the
// gate if needed and retrying transient connect failures (see
// [dialer.Dialer.Retry]).
func (p *Pool) Acquire(ctx context.Context) (*pgxpool.Conn, error) {
	ctx = p.g.CallerContext(ctx)
	c, err := p.p.Acquire(ctx)
	if err != nil {
		return p.acquireSlow(ctx, err)
	}
	return c, nil
}

func (p *Pool) acquireSlow(ctx context.Context, err error) (c *pgxpool.Conn, _ error) {
	err = p.retry(ctx, err, func(ctx context.Context) (err error) {
		c, err = p.p.Acquire(ctx)
		return err
	})
	return c, err
}

// retry continues with op after a first attempt failed with err.
func (p *Pool) retry(ctx context.Context, err error, op func(context.Context) error) error {
	err = p.g.RetryAfter(ctx, err, op)
	switch {
	case errors.Is(err, puddle.ErrClosedPool) && !errors.Is(err, ErrClosed):
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	case errors.Is(err, dialer.ErrShed):
		p.fillBehind()
	}
	return err
}

// fillBehind makes, in the background, the connection a caller was shed
// from, unless one is already being made so: the gate refused to make the
// caller wait past its deadline, not the connection. pgxpool itself makes
// a connection whose caller gave up, and puts it in the pool; without
// this, a pool whose connections the server ended, and whose own refill
// failed while it was down, makes no connection until a caller's
// deadline can take its wait, and then at the moment of the call: a
// fleet whose processes query on the same beat dials on that beat, in
// bursts (a simulated restart of 10,000 workers querying every second:
// the bystander's p99 in recovery 151-166ms with the bursts, 8ms without).
// The connection waits for the gate like any other, and goes to the pool
// idle.
func (p *Pool) fillBehind() {
	if !p.behind.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer p.behind.Store(false)
		// As pgxpool's background connects, a minute at most: longer
		// than any reconnect window (engine.MaxRecoveryWindow).
		ctx, cancel := context.WithTimeout(context.Background(), fillBehindTimeout)
		defer cancel()
		if c, err := p.p.Acquire(ctx); err == nil {
			c.Release()
		}
	}()
}

// fillBehindTimeout bounds fillBehind's acquire.
const fillBehindTimeout = engine.MaxRecoveryWindow + 10*time.Second

// AcquireFunc acquires a connection, calls f with it and releases it. ctx
// only bounds the acquire.
func (p *Pool) AcquireFunc(ctx context.Context, f func(*pgxpool.Conn) error) error {
	c, err := p.Acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	return f(c)
}

// AcquireAllIdle atomically acquires all currently idle connections, as
// pgxpool.Pool.AcquireAllIdle.
func (p *Pool) AcquireAllIdle(ctx context.Context) []*pgxpool.Conn {
	return p.p.AcquireAllIdle(ctx)
}

// Reset closes all connections but leaves the pool open; new connections
// pass the gate.
func (p *Pool) Reset() { p.p.Reset() }

// Config returns a copy of the configuration the pool was created with, as
// the caller gave it (without the gate's hooks).
func (p *Pool) Config() *pgxpool.Config { return p.config.Copy() }

// Stat returns pgxpool's statistics of the pool. See [dialer.Dialer.Stats]
// for the gate's.
func (p *Pool) Stat() *pgxpool.Stat { return p.p.Stat() }

// Exec acquires a connection, executes sql and releases the connection.
// Connect failures are retried; errors from the query never are.
func (p *Pool) Exec(ctx context.Context, sql string, arguments ...any) (pgconn.CommandTag, error) {
	ctx = p.g.CallerContext(ctx)
	tag, err := p.p.Exec(ctx, sql, arguments...)
	if err != nil {
		return p.execSlow(ctx, err, sql, arguments)
	}
	return tag, nil
}

func (p *Pool) execSlow(ctx context.Context, err error, sql string, arguments []any) (tag pgconn.CommandTag, _ error) {
	err = p.retry(ctx, err, func(ctx context.Context) (err error) {
		tag, err = p.p.Exec(ctx, sql, arguments...)
		return err
	})
	return tag, err
}

// Query acquires a connection and runs sql; the connection is released when
// the rows are closed. Connect failures are retried; query errors never are.
func (p *Pool) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	ctx = p.g.CallerContext(ctx)
	rows, err := p.p.Query(ctx, sql, args...)
	if err != nil {
		return p.querySlow(ctx, err, rows, sql, args)
	}
	return rows, nil
}

func (p *Pool) querySlow(ctx context.Context, err error, rows pgx.Rows, sql string, args []any) (pgx.Rows, error) {
	err = p.retry(ctx, err, func(ctx context.Context) (err error) {
		rows, err = p.p.Query(ctx, sql, args...)
		return err
	})
	if err != nil {
		rows = errRows{err}
	}
	return rows, err
}

// QueryRow acquires a connection and runs sql; the connection is released
// by the row's Scan. Connect failures are retried; query errors never are.
func (p *Pool) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	c, err := p.Acquire(ctx)
	if err != nil {
		return errRow{err}
	}
	r := rowPool.Get().(*poolRow)
	r.c, r.r = c, c.QueryRow(ctx, sql, args...)
	return r
}

// SendBatch acquires a connection and sends b; the connection is released
// when the results are closed (or, for a batch that begins a transaction,
// when the transaction ends). Connect failures are retried.
func (p *Pool) SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	c, err := p.Acquire(ctx)
	if err != nil {
		return pgx.FailedBatchResults(b, err)
	}
	br := c.SendBatch(ctx, b)
	if t := br.Tx(); t != nil {
		return &batchResults{br: br, tx: &tx{Tx: t, c: c}}
	}
	return &batchResults{br: br, c: c}
}

// Begin acquires a connection and begins a transaction on it; the
// connection is released when the transaction ends. Connect failures are
// retried.
func (p *Pool) Begin(ctx context.Context) (pgx.Tx, error) {
	return p.BeginTx(ctx, pgx.TxOptions{})
}

// BeginTx is [Pool.Begin] with transaction options.
func (p *Pool) BeginTx(ctx context.Context, txOptions pgx.TxOptions) (pgx.Tx, error) {
	ctx = p.g.CallerContext(ctx)
	t, err := p.p.BeginTx(ctx, txOptions)
	if err != nil {
		return p.beginSlow(ctx, err, txOptions)
	}
	return t, nil
}

func (p *Pool) beginSlow(ctx context.Context, err error, txOptions pgx.TxOptions) (t pgx.Tx, _ error) {
	err = p.retry(ctx, err, func(ctx context.Context) (err error) {
		t, err = p.p.BeginTx(ctx, txOptions)
		return err
	})
	return t, err
}

// CopyFrom acquires a connection and copies rows into tableName with the
// COPY protocol. Connect failures are retried; copy errors never are.
func (p *Pool) CopyFrom(ctx context.Context, tableName pgx.Identifier, columnNames []string, rowSrc pgx.CopyFromSource) (int64, error) {
	c, err := p.Acquire(ctx)
	if err != nil {
		return 0, err
	}
	defer c.Release()
	return c.Conn().CopyFrom(ctx, tableName, columnNames, rowSrc)
}

// Ping acquires a connection and checks that the server answers. Connect
// failures are retried.
func (p *Pool) Ping(ctx context.Context) error {
	c, err := p.Acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	return c.Ping(ctx)
}
