package dialer

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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
	// ctx is handed to pgconn: it ends when the Dialer closes or the
	// connect's own context ends, not when the caller leaves (the
	// connection then goes to the pool, as in pgxpool).
	ctx    context.Context
	cancel context.CancelCauseFunc
	stop   func() bool // unregisters the close watcher
	// wait bounds the gate's own waits: ctx plus the caller's deadline
	// and cancellation when known.
	wait     context.Context
	waitStop func()      // releases wait's resources
	refused  error       // set when the gate refused before touching the server
	slot     bool        // holds a connecting slot
	prepaid  atomic.Bool // admit took the token for the first dial
	ended    atomic.Bool
}

// begin runs the waits that come before the server is touched.
func (d *Dialer) begin(ctx context.Context) *establishment {
	d.inflight.Add(1)
	d.stats.establishments.Add(1)
	e := &establishment{start: time.Now()}
	e.ctx, e.cancel = context.WithCancelCause(ctx)
	e.stop = context.AfterFunc(d.closeCtx, func() { e.cancel(ErrClosed) })
	e.wait, e.waitStop = e.ctx, func() {}
	c := callerOf(ctx)
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

// admit waits for the startup delay, the recovery backoff, a connecting
// slot and the first dial's token, in that order, all before pgconn starts
// its connect_timeout clock. The token comes last so that a token is never
// spent long before its dial: the server sees dials at the bucket's pace.
func (d *Dialer) admit(e *establishment, c *caller) error {
	if d.closeCtx.Err() != nil {
		return ErrClosed
	}
	if !d.released.Load() {
		if err := d.waitUntil(e, d.release, "startup jitter", &d.stats.jitterWait); err != nil {
			return err
		}
		d.released.Store(true)
	}
	if c == nil || c.attempt == 0 {
		d.mu.Lock()
		until := d.until
		d.mu.Unlock()
		if err := d.waitUntil(e, until, "backoff", &d.stats.backoffWait); err != nil {
			return err
		}
	}
	if err := d.takeSlot(e); err != nil {
		return err
	}
	if err := d.takeToken(e); err != nil {
		return err
	}
	e.prepaid.Store(true)
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
	start := time.Now()
	defer func() { d.stats.slotWait.add(time.Since(start)) }()
	select {
	case d.slots <- struct{}{}:
		e.slot = true
		// A slot freed by Close or cancellation may win the race against
		// the wait's end: do not go on to the server then.
		if e.wait.Err() != nil {
			return d.waitError(e, "connecting slot", 0)
		}
		return nil
	case <-e.wait.Done():
		return d.waitError(e, "connecting slot", 0)
	}
}

// waitUntil waits for t, shedding at once if the caller's deadline comes
// first.
func (d *Dialer) waitUntil(e *establishment, t time.Time, what string, w *waitCounter) error {
	wait := time.Until(t)
	if wait <= 0 {
		return nil
	}
	if dl, ok := e.wait.Deadline(); ok && dl.Before(t) {
		d.stats.shed.Add(1)
		return &shedError{wait: what, need: wait, left: time.Until(dl)}
	}
	if err := d.sleep(e.wait, wait, w); err != nil {
		return d.waitError(e, what, 0)
	}
	return nil
}

// waitError explains why e.wait ended during a wait.
func (d *Dialer) waitError(e *establishment, what string, need time.Duration) error {
	if d.closeCtx.Err() != nil {
		return ErrClosed
	}
	if cause := context.Cause(e.ctx); cause != nil {
		return cause
	}
	if errors.Is(e.wait.Err(), context.DeadlineExceeded) {
		d.stats.shed.Add(1)
		return &shedError{wait: what, need: need}
	}
	return e.wait.Err()
}

// end releases what begin took and learns from the outcome.
func (d *Dialer) end(e *establishment, err error) {
	if !e.ended.CompareAndSwap(false, true) {
		return
	}
	if e.slot {
		<-d.slots
	}
	e.stop()
	e.waitStop()
	e.cancel(nil)
	d.inflight.Add(-1)

	switch Classify(err) {
	case OK:
		d.stats.ok.Add(1)
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
		if now := time.Now(); d.failedAt.IsZero() || e.admitted.After(d.failedAt) {
			wait := d.recovery.NextBackOff()
			if wait == backoff.Stop {
				d.recovery.Reset()
				wait = max(d.recovery.NextBackOff(), 0)
			}
			d.until, d.failedAt = now.Add(wait), now
			d.failing.Store(true)
		}
		d.mu.Unlock()
	case Permanent:
		d.stats.permanent.Add(1)
	case Closed:
		d.stats.closedCount.Add(1)
	}
}

// dialFunc wraps next so that every TCP connection of an establishment takes
// a token: the first was taken by admit, further ones (sslmode=prefer's
// plain-text redial, multi-host fallbacks) are taken here. Dials outside an
// establishment are CancelRequests: they are charged to the bucket but never
// wait for it, so a cancel is never starved.
func (d *Dialer) dialFunc(next pgconn.DialFunc) pgconn.DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		e, _ := ctx.Value(establishmentKey{}).(*establishment)
		if e == nil || e.ended.Load() {
			d.stats.cancelDials.Add(1)
			d.limiter.ReserveN(time.Now(), 1)
			return next(ctx, network, addr)
		}
		if e.refused != nil {
			return nil, e.refused
		}
		if context.Cause(e.ctx) == ErrClosed {
			return nil, ErrClosed
		}
		if !e.prepaid.CompareAndSwap(true, false) {
			if err := d.takeToken(e); err != nil {
				return nil, err
			}
		}
		d.stats.dials.Add(1)
		return next(ctx, network, addr)
	}
}

// takeToken takes one token from the bucket for e, waiting for it unless
// the wait cannot end before the caller's deadline.
func (d *Dialer) takeToken(e *establishment) error {
	now := time.Now()
	r := d.limiter.ReserveN(now, 1)
	if !r.OK() {
		return ErrInvalidOption // burst 0: validated away in New
	}
	wait := r.DelayFrom(now)
	if wait == 0 {
		return nil
	}
	if dl, ok := e.wait.Deadline(); ok && dl.Before(now.Add(wait)) {
		r.CancelAt(now)
		d.stats.shed.Add(1)
		return &shedError{wait: "rate limit", need: wait, left: dl.Sub(now)}
	}
	if err := d.sleep(e.wait, wait, &d.stats.rateWait); err != nil {
		r.Cancel()
		return d.waitError(e, "rate limit", wait)
	}
	return nil
}
