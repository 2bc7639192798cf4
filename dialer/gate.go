package dialer

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel/codes"

	"github.com/pgstagger/pgstagger/jitter"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"
)

// tracer is the Dialer's pgx.ConnectTracer: pgx calls TraceConnectStart
// before it resolves or dials anything and TraceConnectEnd with the outcome,
// for every connection made with a configuration the Dialer is installed
// on. It does nothing for queries.
type tracer struct{ d *Dialer }

func (t *tracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (t *tracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (t *tracer) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	e := t.d.begin(ctx)
	return context.WithValue(e.ctx, establishmentKey{}, e)
}

func (t *tracer) TraceConnectEnd(ctx context.Context, data pgx.TraceConnectEndData) {
	if e, ok := ctx.Value(establishmentKey{}).(*establishment); ok {
		t.d.end(e, data.Err)
	}
}

type establishmentKey struct{}

// establishment is one connection being made through the gate, from
// TraceConnectStart to TraceConnectEnd.
type establishment struct {
	start    time.Time // begin
	admitted time.Time // end of the gate's waits: the server is touched after this
	reason   string
	attempt  int
	span     trace.Span // the connect span
	// ctx is handed to pgconn: it carries the connect span and ends when
	// the Dialer closes or the connect's own context ends, not when the
	// caller leaves (the connection then goes to the pool, as in pgxpool).
	ctx    context.Context
	cancel context.CancelCauseFunc
	stop   func() bool // unregisters the close watcher
	// wait bounds the gate's own waits: ctx plus the caller's deadline
	// and cancellation when known.
	wait     context.Context
	waitStop func()                 // releases wait's resources
	refused  error                  // set when the gate refused before touching the server
	slot     bool                   // holds a connecting slot
	prepaid  atomic.Pointer[func()] // refund of the token admit took for the first dial
	ended    atomic.Bool

	// netStart is when pgconn first touched the network (its first lookup
	// or dial), in unix nanoseconds: the time from admitted to it is pgx
	// preparing the connect.
	netStart atomic.Int64

	mu    sync.Mutex    // guards dials
	dials []*dialRecord // in order
}

// current returns the connection of the latest successful dial.
func (e *establishment) current() *tracedConn {
	e.mu.Lock()
	defer e.mu.Unlock()
	for i := len(e.dials) - 1; i >= 0; i-- {
		if c := e.dials[i].conn; c != nil {
			return c
		}
	}
	return nil
}

// lastDial returns the establishment's latest dial, or nil.
func (e *establishment) lastDial() *dialRecord {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.dials) == 0 {
		return nil
	}
	return e.dials[len(e.dials)-1]
}

// begin starts the connect span and runs the waits that come before the
// server is touched.
func (d *Dialer) begin(ctx context.Context) *establishment {
	d.inflight.Add(1)
	d.stats.establishments.Add(1)
	e := &establishment{start: time.Now(), attempt: 1}
	c := callerOf(ctx)
	if c != nil && c.attempt > 1 {
		e.attempt = c.attempt
	}
	e.reason = d.reasonFor(ctx, c)

	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindClient),
		trace.WithTimestamp(e.start),
		trace.WithAttributes(d.tel.spanAttrs...),
		trace.WithAttributes(AttrAttempt.Int(e.attempt), AttrReason.String(e.reason)),
	}
	if e.reason == ReasonWarmUp || e.reason == ReasonRefill {
		// Background work gets a trace of its own, linked to whatever
		// span created the pool.
		opts = append(opts, trace.WithNewRoot())
		if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
			opts = append(opts, trace.WithLinks(trace.Link{SpanContext: sc}))
		}
	}
	spanCtx, span := d.tel.tracer.Start(ctx, spanConnect, opts...)
	e.span = span

	e.ctx, e.cancel = context.WithCancelCause(spanCtx)
	e.stop = context.AfterFunc(d.closeCtx, func() { e.cancel(ErrClosed) })
	e.wait, e.waitStop = e.ctx, func() {}
	if c != nil && c.ctx.Done() != nil {
		var cancel context.CancelFunc
		if dl, ok := c.ctx.Deadline(); ok {
			e.wait, cancel = context.WithDeadline(e.ctx, dl)
		} else {
			e.wait, cancel = context.WithCancel(e.ctx)
		}
		stop := context.AfterFunc(c.ctx, cancel)
		e.waitStop = func() { stop(); cancel() }
	}
	if err := d.admit(e, c); err != nil {
		e.refused = err
	}
	e.admitted = time.Now()
	return e
}

// reasonFor tells why ctx's establishment happens.
func (d *Dialer) reasonFor(ctx context.Context, c *caller) string {
	switch {
	case c != nil && c.attempt > 1:
		return ReasonRetry
	case ctx.Value(warmUpKey{}) != nil:
		return ReasonWarmUp
	case !d.forPool:
		return ReasonConnect
	}
	// pgxpool makes connections for callers on its own context, which has
	// no deadline, and background ones (MinConns, MinIdleConns) with a
	// 60-second timeout each.
	if _, ok := ctx.Deadline(); ok && c == nil {
		return ReasonRefill
	}
	return ReasonAcquire
}

type warmUpKey struct{}

// WarmUpContext marks ctx, the context given to pgxpool.NewWithConfig, so
// that the establishments of the pool's initial MinConns/MinIdleConns fill
// are reported with reason warm-up, each in a trace of its own linked to
// ctx's span. pool.New does this itself.
func WarmUpContext(ctx context.Context) context.Context {
	return context.WithValue(ctx, warmUpKey{}, true)
}

// admit waits for the startup delay, the recovery delay after failures, a
// connecting slot and the first dial's token, in that order, all before
// pgconn starts its connect_timeout clock. The token comes last so that a
// token is never spent long before its dial: the server sees dials at the
// bucket's pace.
func (d *Dialer) admit(e *establishment, c *caller) error {
	if d.closeCtx.Err() != nil {
		return ErrClosed
	}
	if !d.released.Load() {
		if err := d.waitUntil(e, d.release, waitJitter); err != nil {
			return err
		}
		d.released.Store(true)
	}
	d.mu.Lock()
	until := d.until
	d.mu.Unlock()
	if err := d.waitUntil(e, until, waitBackoff); err != nil {
		return err
	}
	if d.failing.Load() {
		// The bucket may still be empty after the recovery delay (the
		// dials and CancelRequests of the failure took its tokens). A
		// fleet that failed together spent together, and its buckets
		// refill together: spread from the refill, as from the failure.
		now := time.Now()
		if d.nextToken(now).After(now) {
			if err := d.waitUntil(e, d.spreadFrom(now), waitBackoff); err != nil {
				return err
			}
		}
	}
	if err := d.takeSlot(e); err != nil {
		return err
	}
	refund, err := d.takeToken(e)
	if err != nil {
		return err
	}
	e.prepaid.Store(&refund)
	return nil
}

// waitUntil waits for t, shedding at once if the caller's deadline comes
// first.
func (d *Dialer) waitUntil(e *establishment, t time.Time, kind waitKind) error {
	wait := time.Until(t)
	if wait <= 0 {
		return nil
	}
	if err := d.fits(e, kind, wait, t); err != nil {
		return err
	}
	start := d.startWait(kind)
	err := d.sleep(e.wait, wait)
	d.emitWait(e.ctx, kind, start, time.Now())
	if err != nil {
		return d.waitError(e, kind, 0)
	}
	return nil
}

// takeSlot waits for a connecting slot.
func (d *Dialer) takeSlot(e *establishment) error {
	select {
	case d.slots <- struct{}{}:
		e.slot = true
		return nil
	default:
	}
	start := d.startWait(waitSlot)
	defer func() { d.emitWait(e.ctx, waitSlot, start, time.Now()) }()
	select {
	case d.slots <- struct{}{}:
		e.slot = true
		// A slot freed by Close or cancellation may win the race against
		// the wait's end: do not go on to the server then.
		if e.wait.Err() != nil {
			return d.waitError(e, waitSlot, 0)
		}
		return nil
	case <-e.wait.Done():
		return d.waitError(e, waitSlot, 0)
	}
}

// takeToken takes one token from the bucket for e, waiting for it unless
// the wait cannot end before the caller's deadline. refund gives the token
// back, for a dial that turned out to cost the server nothing.
func (d *Dialer) takeToken(e *establishment) (refund func(), err error) {
	return d.token(e.wait, e.ctx,
		func(need time.Duration, at time.Time) error { return d.fits(e, waitRate, need, at) },
		func(need time.Duration, _ error) error { return d.waitError(e, waitRate, need) })
}

// cancelToken takes a token for a CancelRequest, waiting for it until ctx
// ends (see [cancelConn]); a wait that cannot end before ctx's deadline is
// not begun. refund gives the token back.
func (d *Dialer) cancelToken(ctx context.Context) (refund func(), err error) {
	return d.token(ctx, ctx,
		func(need time.Duration, at time.Time) error {
			if dl, ok := ctx.Deadline(); ok && dl.Before(at) {
				d.stats.cancelsShed.Add(1)
				return &shedError{wait: waitNames[waitRate], need: need, left: time.Until(dl)}
			}
			return nil
		},
		func(_ time.Duration, err error) error {
			d.stats.cancelsShed.Add(1)
			return err
		})
}

// token takes one token from the bucket, waiting for it until ctx ends
// (the wait's span and metric go under spanCtx) unless fits refuses a wait
// of need ending at at; ended turns the error of a wait that ended early
// into the one returned. refund gives the token back.
func (d *Dialer) token(ctx, spanCtx context.Context, fits func(need time.Duration, at time.Time) error,
	ended func(need time.Duration, err error) error) (refund func(), err error) {
	now := time.Now()
	r := d.limiter.ReserveN(now, 1)
	if !r.OK() {
		return nil, ErrInvalidOption // burst 0: validated away in New
	}
	wait := r.DelayFrom(now)
	// Cancelling as of the moment the token was used restores it exactly,
	// less whatever other reservations took since.
	act := now.Add(wait)
	refund = func() { r.CancelAt(act) }
	if wait == 0 {
		return refund, nil
	}
	if err := fits(wait, act); err != nil {
		r.CancelAt(now)
		return nil, err
	}
	start := d.startWait(waitRate)
	err = d.sleep(ctx, wait)
	d.emitWait(spanCtx, waitRate, start, time.Now())
	if err != nil {
		r.Cancel()
		return nil, ended(wait, err)
	}
	return refund, nil
}

// fits sheds a wait of kind, lasting need and ending at t, that would leave
// the caller less than twice the time connects have been taking: such a
// connection would reach the caller too late to be used, and pgx closes a
// connection whose query outlives its context, wasting the fork.
func (d *Dialer) fits(e *establishment, kind waitKind, need time.Duration, t time.Time) error {
	dl, ok := e.wait.Deadline()
	if !ok {
		return nil
	}
	margin := 2 * time.Duration(d.connectTime.Load())
	if dl.Before(t.Add(margin)) {
		return d.shed(kind, need, time.Until(dl), margin)
	}
	return nil
}

// learnConnectTime folds a successful establishment's time into the moving
// average fits uses.
func (d *Dialer) learnConnectTime(took time.Duration) {
	for {
		old := d.connectTime.Load()
		v := int64(took)
		if old != 0 {
			v = old + (v-old)/4
		}
		if d.connectTime.CompareAndSwap(old, v) {
			return
		}
	}
}

// spreadFrom is a fresh draw over the startup window, counted from when the
// bucket next has a whole token after now.
func (d *Dialer) spreadFrom(now time.Time) time.Time {
	return d.nextToken(now).Add(jitter.Uniform(d.plan.StartupWindow, d.cfg.rand()))
}

// nextToken is when the bucket will next have a whole token.
func (d *Dialer) nextToken(now time.Time) time.Time {
	lim := d.limiter.Limit()
	tokens := d.limiter.TokensAt(now)
	if lim == rate.Inf || tokens >= 1 || lim <= 0 {
		return now
	}
	return now.Add(time.Duration((1 - tokens) / float64(lim) * float64(time.Second)))
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// shed refuses an establishment because a wait of kind, lasting need, and
// then a connect expected to take connect cannot end in the time left
// before the caller's deadline (left and need are 0 when unknown).
func (d *Dialer) shed(kind waitKind, need, left, connect time.Duration) error {
	d.stats.shed.Add(1)
	return &shedError{wait: waitNames[kind], need: need, left: left, connect: connect}
}

// waitError explains why e.wait ended during a wait.
func (d *Dialer) waitError(e *establishment, kind waitKind, need time.Duration) error {
	if d.closeCtx.Err() != nil {
		return ErrClosed
	}
	if cause := context.Cause(e.ctx); cause != nil {
		return cause
	}
	if errors.Is(e.wait.Err(), context.DeadlineExceeded) {
		return d.shed(kind, need, 0, 0)
	}
	return e.wait.Err()
}

// end releases what begin took, learns from the outcome and reports it.
func (d *Dialer) end(e *establishment, err error) {
	if !e.ended.CompareAndSwap(false, true) {
		return
	}
	now := time.Now()
	if e.slot {
		<-d.slots
	}
	e.stop()
	e.waitStop()
	d.inflight.Add(-1)

	// Give back the tokens of dials the server never answered (see
	// dialFunc) before the recovery delay is counted from the bucket.
	e.mu.Lock()
	for _, r := range e.dials {
		if r.conn != nil && r.conn.dropped() {
			r.giveBack(d)
		}
	}
	e.mu.Unlock()

	class := Classify(err)
	switch class {
	case OK:
		d.stats.ok.Add(1)
		d.learnConnectTime(now.Sub(e.admitted))
		d.mu.Lock()
		if !d.until.IsZero() {
			d.recovery.Reset()
			d.until, d.failedAt = time.Time{}, time.Time{}
			d.failing.Store(false)
		}
		d.mu.Unlock()
	case Transient:
		d.stats.transient.Add(1)
		d.mu.Lock()
		// Failures of establishments that touched the server before
		// the last failure was recorded belong to the same outage: they
		// do not lengthen the backoff.
		if d.failedAt.IsZero() || e.admitted.After(d.failedAt) {
			wait := d.recovery.NextBackOff()
			if wait == backoff.Stop {
				d.recovery.Reset()
				wait = max(d.recovery.NextBackOff(), 0)
			}
			// A failing server is often failing for the whole fleet
			// (a restart): spread this process's reconnects over the
			// startup window, as at a fresh start, so that the fleet
			// comes back at its budget and not all at once. The
			// spread starts when the bucket lets this process connect
			// again: the whole fleet spent its tokens at the same
			// moment, and would otherwise get them back together.
			d.until, d.failedAt = maxTime(now.Add(wait), d.spreadFrom(now)), now
			d.failing.Store(true)
		}
		d.mu.Unlock()
	case Permanent:
		d.stats.permanent.Add(1)
	case Closed:
		d.stats.closedCount.Add(1)
	}
	d.report(e, err, class, now)
	e.cancel(nil)
}

// report emits e's spans, metrics and log line.
func (d *Dialer) report(e *establishment, err error, class Class, now time.Time) {
	t := d.tel
	ctx := e.ctx
	e.mu.Lock()
	dials := e.dials
	e.mu.Unlock()
	recording := e.span.IsRecording()
	if ns := e.netStart.Load(); recording && ns != 0 && e.refused == nil {
		// pgx's own work before the network: building the connection's
		// type map, checking the configuration.
		_, s := t.tracer.Start(ctx, spanSetup, trace.WithTimestamp(e.admitted))
		s.End(trace.WithTimestamp(nanos(ns)))
	}
	for _, r := range dials {
		t.emitDial(ctx, r, now, recording)
	}
	t.attempts.Add(ctx, 1, metric.WithAttributeSet(t.outcomes[class]))
	if class == OK {
		t.createTime.RecordSet(ctx, now.Sub(e.start).Seconds(), t.poolSet)
	}
	if recording {
		e.span.SetAttributes(AttrDials.Int(len(dials)))
		if c := e.current(); c != nil && c.responseTime() > 0 {
			e.span.SetAttributes(AttrPostmasterResponseTime.Float64(c.responseTime().Seconds()))
		}
		if err != nil {
			e.span.SetAttributes(errorAttrs(err)...)
			e.span.SetAttributes(AttrOutcome.String(class.String()))
			e.span.SetStatus(codes.Error, err.Error())
		}
	}
	e.span.End(trace.WithTimestamp(now))
	if t.log != nil && err != nil {
		level, msg := slog.LevelWarn, "pgstagger: connect failed"
		switch class {
		case Permanent:
			level = slog.LevelError
		case Shed:
			level, msg = slog.LevelInfo, "pgstagger: connect shed"
		case Closed:
			level, msg = slog.LevelInfo, "pgstagger: connect ended by Close"
		}
		t.log.LogAttrs(ctx, level, msg, d.logAttrs(e, class, err)...)
	}
}

func (d *Dialer) logAttrs(e *establishment, class Class, err error) []slog.Attr {
	return []slog.Attr{
		slog.String(string(d.tel.poolAttr.Key), d.tel.poolName),
		slog.String(string(AttrReason), e.reason),
		slog.Int(string(AttrAttempt), e.attempt),
		slog.String(string(AttrOutcome), class.String()),
		slog.Any("error", err),
	}
}

// dialFunc wraps next so that every TCP connection of an establishment takes
// a token: the first was taken by admit, further ones (sslmode=prefer's
// plain-text redial, multi-host fallbacks) are taken here. A dial's token is
// given back when the server forked nothing for it: the dial was refused,
// or the connection was reset or closed before the server sent a byte (a
// postmaster exiting drops the connections it had not accepted yet). A host
// of a multi-host connection string whose dial failed is backed off: see
// [hostHealth]. Dials outside an establishment are CancelRequests: see
// [cancelConn].
func (d *Dialer) dialFunc(next pgconn.DialFunc, group string) pgconn.DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		e, _ := ctx.Value(establishmentKey{}).(*establishment)
		if e == nil || e.ended.Load() {
			return newCancelConn(d, ctx, next, network, addr), nil
		}
		if e.refused != nil {
			return nil, e.refused
		}
		if context.Cause(e.ctx) == ErrClosed {
			return nil, ErrClosed
		}
		if prev := e.lastDial(); prev != nil && prev.addr != addr && prev.conn != nil &&
			prev.conn.firstRead.Load() == 0 && e.wait.Err() == nil {
			// pgconn gave up on a host that accepted the connection
			// but never answered (a frozen or swamped postmaster) and
			// moved on: as dead, for this list, as a refused one.
			d.hosts.record(group, prev.network, prev.addr, errHostSilent, time.Now())
		}
		if err := d.hosts.skip(group, network, addr, time.Now()); err != nil {
			d.stats.hostsSkipped.Add(1)
			return nil, err
		}
		e.netStart.CompareAndSwap(0, time.Now().UnixNano())
		var refund func()
		if p := e.prepaid.Swap(nil); p != nil {
			refund = *p
		} else {
			var err error
			if refund, err = d.takeToken(e); err != nil {
				return nil, err
			}
		}
		d.stats.dials.Add(1)
		r := &dialRecord{network: network, addr: addr, start: time.Now(), refund: refund}
		conn, err := next(ctx, network, addr)
		if errors.Is(err, syscall.ECONNREFUSED) {
			// Nothing listened: the server forked nothing for it.
			r.giveBack(d)
		}
		if err == nil || e.wait.Err() == nil {
			// A dial that failed because the caller gave up says
			// nothing of the host; one that timed out at
			// connect_timeout (ctx is pgconn's, per host) does.
			d.hosts.record(group, network, addr, err, time.Now())
		}
		r.end, r.err = time.Now(), err
		if conn != nil {
			r.conn = &tracedConn{Conn: conn}
			conn = r.conn
		}
		e.mu.Lock()
		e.dials = append(e.dials, r)
		e.mu.Unlock()
		return conn, err
	}
}

// afterNetConnect marks the end of TLS (or of the dial, without TLS) on the
// establishment's current connection, then runs next.
func afterNetConnect(next func(context.Context, *pgconn.Config, net.Conn) (net.Conn, error)) func(context.Context, *pgconn.Config, net.Conn) (net.Conn, error) {
	return func(ctx context.Context, cfg *pgconn.Config, conn net.Conn) (net.Conn, error) {
		if e, _ := ctx.Value(establishmentKey{}).(*establishment); e != nil {
			if c := e.current(); c != nil {
				c.netConnected.CompareAndSwap(0, time.Now().UnixNano())
			}
		}
		if next != nil {
			return next(ctx, cfg, conn)
		}
		return conn, nil
	}
}

// lookupFunc wraps next with a span when the establishment is traced.
func (d *Dialer) lookupFunc(next pgconn.LookupFunc) pgconn.LookupFunc {
	return func(ctx context.Context, host string) ([]string, error) {
		if e, _ := ctx.Value(establishmentKey{}).(*establishment); e != nil {
			e.netStart.CompareAndSwap(0, time.Now().UnixNano())
		}
		if !trace.SpanFromContext(ctx).IsRecording() {
			return next(ctx, host)
		}
		ctx, span := d.tel.tracer.Start(ctx, spanLookup, trace.WithAttributes(semconv.ServerAddress(host)))
		defer span.End()
		addrs, err := next(ctx, host)
		if err != nil {
			span.SetStatus(codes.Error, err.Error())
		}
		return addrs, err
	}
}
