package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/examples/internal/simpg"
	"github.com/pgstagger/pgstagger/internal/engine"
	"github.com/pgstagger/pgstagger/jitter"
	"github.com/pgstagger/pgstagger/pool"
)

// The lite client (-client lite) runs a simulated fleet of workers with one
// connection each without pgx's connections and pools, so that 100,000 of
// them take a minute, not a quarter of an hour: through pgconn, every write
// resets a 15ms timer (its guard against a write that blocks), and in a
// synctest bubble, which keeps one heap of timers, a reset makes the
// runtime walk every timer of the fleet within 15ms of simulated time.
//
// What it keeps is pgstagger's: a litePool installs a real Dialer on a
// pgxpool configuration, and a connect calls the gate's hooks, LookupFunc,
// DialFunc and AfterNetConnect in pgconn's order, then speaks the startup
// and simple query protocol itself (liteConn), or has the simulated server
// answer its queries by a call (simpg.Server.Query) in the same simulated
// time. The gate, its pacer, recovery and retries, and the server facts
// reader are the library's code. What it re-creates is pgconn's and
// pgxpool's (puddle's) behaviour for MaxConns = MinConns = 1, checked
// against them figure by figure at 10,000 workers (BENCHMARKS.md, eleventh
// session): the background fill at start, then a health check every minute
// and half a second after a released connection is destroyed; Acquire's
// creation, which outlives an acquirer that gives up; a ping before handing
// out a connection idle for over a second, counted from the start of its
// creation, then from its last release; a destroy after a failed ping, which
// triggers no health check; and pgstagger's Pool's retry around Acquire,
// with the connection of a caller the gate shed made in the background.

// liteConn is one connection made without pgconn.
type liteConn struct {
	nc       net.Conn
	pid      uint32
	g        *engine.Gate // nil without a gate
	admitted time.Time    // when the gate admitted its establishment
	closed   bool
	// direct runs a query on the simulated server without the wire
	// protocol (nil: through it); see query.
	direct queryFunc
	// lastUsed is puddle's: when the pool began creating the connection,
	// then when it was last released. Its pool pings it if over a second
	// old when acquired: a connection that waited for its reconnect place
	// is pinged before its first use, as with pgxpool.
	lastUsed time.Time
}

// liteConnect makes a connection with cfg as pgx's connect does (one host,
// no TLS), through g's hooks when g is not nil.
func liteConnect(ctx context.Context, cfg *pgconn.Config, g *engine.Gate) (c *liteConn, err error) {
	if g != nil {
		ctx = g.ConnectStarted(ctx)
		defer func() {
			var pid uint32
			if err == nil {
				pid = c.pid
			}
			admitted, _ := g.ConnectEnded(ctx, pid, err)
			if c != nil {
				c.admitted = admitted
			}
		}()
	}
	addrs, err := cfg.LookupFunc(ctx, cfg.Host)
	if err != nil {
		return nil, &engine.SetupError{Err: fmt.Errorf("hostname resolving error: %w", err)}
	}
	cctx := ctx
	if cfg.ConnectTimeout != 0 {
		var cancel context.CancelFunc
		cctx, cancel = context.WithTimeout(ctx, cfg.ConnectTimeout)
		defer cancel()
	}
	fail := func(msg string, err error) error {
		return &engine.SetupError{Err: fmt.Errorf("%s: %w", msg, timeoutError(cctx, err))}
	}
	nc, err := cfg.DialFunc(cctx, "tcp", net.JoinHostPort(addrs[0], strconv.Itoa(int(cfg.Port))))
	if err != nil {
		return nil, fail("dial error", err)
	}
	if cfg.AfterNetConnect != nil {
		if nc, err = cfg.AfterNetConnect(cctx, cfg, nc); err != nil {
			return nil, fail("AfterNetConnect failed", err)
		}
	}
	c = &liteConn{nc: nc, g: g}
	defer c.watch(cctx)()
	params := maps.Clone(cfg.RuntimeParams)
	params["user"], params["database"] = cfg.User, cfg.Database
	if err := c.send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: params}); err != nil {
		_ = nc.Close()
		return nil, fail("failed to write startup message", err)
	}
	for {
		t, body, err := c.receive()
		if err != nil {
			_ = nc.Close()
			return nil, fail("failed to receive message", err)
		}
		switch t {
		case 'K':
			var m pgproto3.BackendKeyData
			if err := m.Decode(body); err != nil {
				_ = nc.Close()
				return nil, fail("failed to receive message", err)
			}
			c.pid = m.ProcessID
		case 'E':
			pe := pgError(body)
			if g != nil {
				// As the gate's OnPgError, which pgconn calls with a
				// connection whose CustomData is still empty.
				g.SessionError(time.Time{}, pe)
			}
			_ = nc.Close()
			return nil, fail("server error", pe)
		case 'Z':
			return c, nil
		}
	}
}

// send writes msg.
func (c *liteConn) send(msg pgproto3.FrontendMessage) error {
	b, err := msg.Encode(nil)
	if err != nil {
		return err
	}
	_, err = c.nc.Write(b)
	return err
}

// receive reads the server's next message: its type and body. It reads
// exactly the message, its header then its body, where pgproto3's Frontend
// would keep an 8 KiB buffer for the connection's life: a simulated fleet
// of 100,000 connections' worth, made and zeroed at every connect, was the
// largest part of a simulation's allocations.
func (c *liteConn) receive() (byte, []byte, error) {
	var h [5]byte
	if _, err := io.ReadFull(c.nc, h[:]); err != nil {
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(h[1:])) - 4
	if n < 0 || n > 1<<20 {
		return 0, nil, fmt.Errorf("message of %d bytes from the server", n+4)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.nc, body); err != nil {
		return 0, nil, err
	}
	return h[0], body, nil
}

// pgError is an ErrorResponse's body as pgconn's error.
func pgError(body []byte) *pgconn.PgError {
	var m pgproto3.ErrorResponse
	if err := m.Decode(body); err != nil {
		return &pgconn.PgError{Severity: "FATAL", Message: "malformed error response: " + err.Error()}
	}
	return pgconn.ErrorResponseToPgError(&m)
}

// watch makes c's reads and writes fail once ctx ends, as pgconn's context
// watcher does, until the returned function is called.
func (c *liteConn) watch(ctx context.Context) (unwatch func()) {
	stop := context.AfterFunc(ctx, func() { _ = c.nc.SetDeadline(time.Unix(1, 0)) })
	return func() {
		if !stop() {
			_ = c.nc.SetDeadline(time.Time{})
		}
	}
}

// timeoutError is pgconn's normalizeTimeoutError: a read or write that
// failed because ctx ended reports why ctx ended.
func timeoutError(ctx context.Context, err error) error {
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		return err
	}
	if ctx.Err() == context.Canceled {
		return context.Canceled
	}
	if ctx.Err() != nil {
		return fmt.Errorf("timeout: %w", ctx.Err())
	}
	return err
}

// query runs sql with the simple protocol and returns its first row, of
// integers. A FATAL error or a broken connection closes c, as pgconn does,
// and so does a query its context ended. With direct, the simulated
// server answers without the protocol, in the same simulated time, unless
// the session ended: then c reads why (57P01) from its connection.
func (c *liteConn) query(ctx context.Context, sql string) ([]int, error) {
	if c.closed {
		return nil, net.ErrClosed
	}
	if c.direct != nil {
		vals, err := c.direct(ctx, int(c.pid), sql)
		if !errors.Is(err, simpg.ErrNoSession) {
			if err != nil {
				c.close()
				return nil, timeoutError(ctx, os.ErrDeadlineExceeded)
			}
			return vals, nil
		}
	}
	defer c.watch(ctx)()
	if err := c.send(&pgproto3.Query{String: sql}); err != nil {
		c.close()
		return nil, timeoutError(ctx, err)
	}
	var (
		row  [][]byte
		qerr error
	)
	for {
		t, body, err := c.receive()
		if err != nil {
			c.close()
			return nil, timeoutError(ctx, err)
		}
		switch t {
		case 'D':
			var m pgproto3.DataRow
			if err := m.Decode(body); err != nil {
				c.close()
				return nil, err
			}
			if row == nil {
				row = m.Values // body is this message's own
			}
		case 'E':
			pe := pgError(body)
			if c.g != nil {
				c.g.SessionError(c.admitted, pe)
			}
			if pe.Severity == "FATAL" {
				c.close()
				return nil, pe
			}
			qerr = pe
		case 'Z':
			if qerr != nil {
				return nil, qerr
			}
			vals := make([]int, len(row))
			for i, v := range row {
				var err error
				if vals[i], err = strconv.Atoi(string(v)); err != nil {
					return nil, engine.ErrFactsReply
				}
			}
			return vals, nil
		}
	}
}

func (c *liteConn) close() {
	if !c.closed {
		c.closed = true
		_ = c.nc.Close()
	}
}

// Close is for the demo's measurements, which open and close connections.
func (c *liteConn) Close(context.Context) error {
	c.close()
	return nil
}

// litePool is a worker's pool of one connection, pgxpool's behaviour for
// MaxConns = MinConns = 1 over liteConns; with a Dialer (d), pgstagger's.
type litePool struct {
	cfg   *pgconn.Config      // the gate's hooks installed when d is not nil
	query queryFunc           // the server's queries without the protocol (nil: none)
	d     *dialer.Dialer      // nil: plain pgxpool
	g     *engine.Gate        // d's engine
	facts *engine.FactsReader // d's server facts reader

	mu       sync.Mutex
	conn     *liteConn     // guarded by mu: the connection, idle or acquired (nil: none)
	acquired bool          // guarded by mu: conn is a worker's
	creating bool          // guarded by mu: a connect is under way
	changed  chan struct{} // guarded by mu: closed and replaced when any of the above changes
	refill   *time.Timer   // guarded by mu: triggers the health check after a destroy
	closed   bool          // guarded by mu

	behind atomic.Bool // an acquire behind a shed one is under way

	check chan struct{} // the health check's trigger, as pgxpool's healthCheckChan
	done  chan struct{} // closed by Close
}

// healthCheckPeriod and healthCheckDelay are pgxpool's: its health check
// runs every minute, and half a second after a connection is destroyed.
const (
	healthCheckPeriod = time.Minute
	healthCheckDelay  = 500 * time.Millisecond
)

// litePlainPool is plainPool for the lite client, its queries run with
// query when not nil.
func litePlainPool(query queryFunc) func(context.Context, *pgxpool.Config, int) (workerPool, error) {
	return func(ctx context.Context, cfg *pgxpool.Config, _ int) (workerPool, error) {
		return newLitePool(ctx, cfg, nil, query)
	}
}

// liteStaggeredPool is staggeredPool for the lite client: worker i's pool
// gated by a Dialer with the options opts(i) gives.
func liteStaggeredPool(query queryFunc, opts func(i int) []dialer.Option) func(context.Context, *pgxpool.Config, int) (workerPool, error) {
	return func(ctx context.Context, cfg *pgxpool.Config, i int) (workerPool, error) {
		d, err := dialer.New(opts(i)...)
		if err != nil {
			return nil, err
		}
		return newLitePool(ctx, cfg, d, query)
	}
}

func newLitePool(ctx context.Context, cfg *pgxpool.Config, d *dialer.Dialer, query queryFunc) (*litePool, error) {
	if cfg.MaxConns != 1 || cfg.MinConns != 1 {
		return nil, fmt.Errorf("-client lite: workers of one connection only (-conns 1), not %d", cfg.MaxConns)
	}
	p := &litePool{d: d, query: query, changed: make(chan struct{}), check: make(chan struct{}, 1), done: make(chan struct{})}
	if d != nil {
		if err := d.InstallPool(cfg); err != nil {
			return nil, err
		}
		p.g = engine.Installed(cfg.ConnConfig.Tracer)
		if p.g.ReadsFacts(cfg.MaxConns) {
			p.facts = engine.NewFactsReader(p.g, pool.DefaultServerFactsEvery, jitter.Float64, false)
		}
		ctx = engine.WarmUpContext(ctx)
	}
	p.cfg = &cfg.ConnConfig.Config
	go p.background(context.WithoutCancel(ctx))
	return p, nil
}

// background is pgxpool's: it fills MinConns with the constructor's values
// and not its cancellation, then runs the health check every minute and
// when triggered, one at a time; a trigger during a check waits for it, a
// tick during a check is dropped.
func (p *litePool) background(ctx context.Context) {
	p.fill(ctx)
	t := time.NewTicker(healthCheckPeriod)
	defer t.Stop()
	for {
		select {
		case <-p.done:
			return
		case <-p.check:
		case <-t.C:
		}
		// The connection is kept (its lifetime, an hour, and idle
		// time, 30 minutes, outlast any run): a missing one is made.
		p.fill(context.Background())
	}
}

// fill creates the connection if the pool has none and makes none, with
// pgxpool's minute for createIdleResources, and waits for it. Its error is
// dropped, as pgxpool drops it.
func (p *litePool) fill(ctx context.Context) {
	p.mu.Lock()
	if p.closed || p.conn != nil || p.creating {
		p.mu.Unlock()
		return
	}
	p.creating = true
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	_, _ = p.create(ctx, false)
}

// create connects (p.creating is set) and then, as pgxpool's AfterConnect
// does, reads the server's facts if due. The connection goes to the
// acquirer that made it (take) or is idle.
func (p *litePool) create(ctx context.Context, take bool) (*liteConn, error) {
	start := time.Now()
	c, err := liteConnect(ctx, p.cfg, p.g)
	if err == nil {
		c.lastUsed, c.direct = start, p.query
	}
	if err == nil && p.facts != nil && p.facts.Due() {
		if ferr := p.facts.Read(c.query); ferr != nil && c.closed {
			err = &engine.SetupError{Err: fmt.Errorf("the connection failed during the server facts read: %w", ferr)}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.creating = false
	if err == nil && !p.closed {
		p.conn, p.acquired = c, take
	} else if c != nil {
		c.close()
	}
	p.signal()
	if err != nil {
		return nil, err
	}
	return c, nil
}

// signal wakes the acquirers waiting for a change; p.mu is held.
func (p *litePool) signal() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// acquire is pgxpool's Acquire: the idle connection (pinged first if idle
// for over a second, or used for a due facts read), or a new one, or a
// wait for either; two tries, as pgxpool tries MaxConns + 1 times.
func (p *litePool) acquire(ctx context.Context) (*liteConn, error) {
	for range 2 {
		c, err := p.take(ctx)
		if err != nil || p.usable(ctx, c) {
			return c, err
		}
		// pgxpool destroys a connection whose ping failed without
		// the refill a release's destroy brings.
		p.destroy(c, false)
	}
	return nil, errTooManyAttempts
}

// errTooManyAttempts is pgxpool's error after MaxConns + 1 connections
// failed their ping in one Acquire.
var errTooManyAttempts = errors.New("pgxpool: too many failed attempts acquiring connection")

// take takes the idle connection, or makes one, or waits.
func (p *litePool) take(ctx context.Context) (*liteConn, error) {
	p.mu.Lock()
	for {
		switch {
		case p.closed:
			p.mu.Unlock()
			return nil, pool.ErrClosed
		case p.conn != nil && !p.acquired:
			p.acquired = true
			c := p.conn
			p.mu.Unlock()
			return c, nil
		case p.conn == nil && !p.creating:
			p.creating = true
			p.mu.Unlock()
			// puddle's constructor runs with the acquirer's values, not
			// its cancellation: a connection the acquirer gave up on
			// goes to the pool.
			type result struct {
				c   *liteConn
				err error
			}
			done := make(chan result, 1)
			go func() {
				c, err := p.create(context.WithoutCancel(ctx), true)
				done <- result{c, err}
			}()
			select {
			case r := <-done:
				return r.c, r.err
			case <-ctx.Done():
				go func() {
					// puddle releases it as last used when its
					// creation began.
					if r := <-done; r.err == nil {
						p.mu.Lock()
						p.acquired = false
						p.signal()
						p.mu.Unlock()
					}
				}()
				return nil, ctx.Err()
			}
		}
		changed := p.changed
		p.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		p.mu.Lock()
	}
}

// usable runs what pgxpool's ShouldPing does with c before handing it out:
// a due facts read (pgstagger's), else a ping if c was idle for over a
// second.
func (p *litePool) usable(ctx context.Context, c *liteConn) bool {
	idle := time.Since(c.lastUsed) // pgxpool's ShouldPingParams, taken first
	if p.facts != nil && p.facts.Due() {
		if p.facts.Read(c.query); c.closed {
			return false
		}
	}
	if idle <= time.Second {
		return true
	}
	_, err := c.query(ctx, "-- ping")
	return err == nil
}

// release gives c back: idle, or destroyed if it broke.
func (p *litePool) release(c *liteConn) {
	if c.closed {
		p.destroy(c, true)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	c.lastUsed = time.Now()
	p.acquired = false
	p.signal()
}

// destroy closes c and, with refill, triggers the health check half a
// second later, as pgxpool does when a released connection is destroyed:
// it refills the pool.
func (p *litePool) destroy(c *liteConn, refill bool) {
	c.close()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn == c {
		p.conn, p.acquired = nil, false
	}
	p.signal()
	if p.closed || !refill {
		return
	}
	if p.refill == nil {
		p.refill = time.AfterFunc(healthCheckDelay, func() {
			select {
			case p.check <- struct{}{}:
			default:
			}
		})
	} else {
		p.refill.Reset(healthCheckDelay)
	}
}

// work is the fleet's work for one connection: acquire it and run a
// query, retried as pgstagger's Pool retries Acquire.
func (p *litePool) work(ctx context.Context, conns int) error {
	if conns != 1 {
		return fmt.Errorf("-client lite: workers of one connection only, not %d", conns)
	}
	var c *liteConn
	var err error
	if p.g == nil {
		c, err = p.acquire(ctx)
	} else {
		ctx = p.g.CallerContext(ctx)
		if c, err = p.acquire(ctx); err != nil {
			err = p.g.RetryAfter(ctx, err, func(ctx context.Context) (err error) {
				c, err = p.acquire(ctx)
				return err
			})
		}
		if errors.Is(err, engine.ErrShed) && p.behind.CompareAndSwap(false, true) {
			// As pgstagger's Pool: the shed caller's connection is
			// made in the background (Pool.fillBehind).
			go func() {
				defer p.behind.Store(false)
				ctx, cancel := context.WithTimeout(context.Background(), engine.MaxRecoveryWindow+10*time.Second)
				defer cancel()
				if c, err := p.acquire(ctx); err == nil {
					p.release(c)
				}
			}()
		}
	}
	if err != nil {
		return err
	}
	defer p.release(c)
	_, err = c.query(ctx, "select 1")
	return err
}

// Dialer is the pool's Dialer (nil: plain pgxpool), for countGates.
func (p *litePool) Dialer() *dialer.Dialer { return p.d }

func (p *litePool) Close() {
	if p.d != nil {
		p.d.Close()
	}
	p.facts.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	close(p.done)
	if p.refill != nil {
		p.refill.Stop()
	}
	if p.conn != nil {
		p.conn.close()
	}
	p.signal()
}
