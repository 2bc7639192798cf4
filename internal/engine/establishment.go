package engine

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/otel/trace"
)

// connectHook is the Gate's pgx.ConnectTracer: pgx calls TraceConnectStart
// before it resolves or dials anything and TraceConnectEnd with the
// outcome, for every connection made with a configuration the Gate is
// installed on. It does nothing for queries.
type connectHook struct{ g *Gate }

func (h *connectHook) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (h *connectHook) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (h *connectHook) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	e := h.g.begin(ctx)
	return context.WithValue(e.ctx, establishmentKey{}, e)
}

func (h *connectHook) TraceConnectEnd(ctx context.Context, data pgx.TraceConnectEndData) {
	made := data.Err == nil && data.Conn != nil
	var pid uint32
	if made {
		pid = data.Conn.PgConn().PID()
	}
	if admitted, ok := h.g.ConnectEnded(ctx, pid, data.Err); ok && made {
		data.Conn.PgConn().CustomData()[establishedKey] = admitted
	}
}

// ConnectStarted and ConnectEnded are what the Gate does for pgx's
// TraceConnectStart and TraceConnectEnd, for a client that speaks the
// protocol without pgx (the stampede demo's simulated fleets of 100,000):
// between them it calls the configuration's LookupFunc, DialFunc and
// AfterNetConnect in pgconn's order, with the context ConnectStarted
// returned. pid is the server's process ID of the connection made (0 if
// err is not nil); admitted, when the gate let the establishment touch
// the server, is what [Gate.SessionError] needs of the session. ok is
// false if ctx did not come from ConnectStarted.
func (g *Gate) ConnectStarted(ctx context.Context) context.Context {
	return (&connectHook{g: g}).TraceConnectStart(ctx, pgx.TraceConnectStartData{})
}

// ConnectEnded: see [Gate.ConnectStarted].
func (g *Gate) ConnectEnded(ctx context.Context, pid uint32, err error) (admitted time.Time, ok bool) {
	e := establishmentOf(ctx)
	if e == nil {
		return time.Time{}, false
	}
	if err == nil && pid != 0 {
		g.pid.Store(pid)
	}
	g.end(e, err)
	return e.admitted, true
}

type establishmentKey struct{}

func establishmentOf(ctx context.Context) *establishment {
	e, _ := ctx.Value(establishmentKey{}).(*establishment)
	return e
}

// establishment is one connection being made through the gate, from
// TraceConnectStart to TraceConnectEnd. What begin takes, end gives back:
//
//	taken by begin (or admit)       given back by end (release)
//	Gate.inflight + 1               Gate.inflight - 1
//	ctx, cancel                     cancel, after report
//	closeWatch (Close cancels ctx)  closeWatch()
//	wait, waitStop                  waitStop()
//	a connecting slot (holdsSlot)   the slot
//	a pacer slot (pacerHeld)        the slot, after the pacer learns
//	                                  the establishment's time (release)
//	the first dial's token          spent by the first dial; refunded by
//	  (firstDialRefund)               end if the server dropped it
//	                                  unanswered, or if nothing dialed (a
//	                                  failed lookup)
//	span                            ended by report
type establishment struct {
	start    time.Time // begin
	admitted time.Time // end of the gate's waits: the server is touched after this
	reason   string
	attempt  int
	span     trace.Span // the connect span

	// ctx is handed to pgconn: it carries the connect span and ends when
	// the Gate closes or the connect's own context ends, not when the
	// caller leaves (the connection then goes to the pool, as in pgxpool).
	ctx        context.Context
	cancel     context.CancelCauseFunc
	closeWatch func() bool // unregisters the watcher that cancels ctx on Close

	// wait bounds the gate's own waits: ctx plus the caller's deadline
	// and cancellation when known.
	wait     context.Context
	waitStop func() // releases wait's resources

	admitErr        error                  // why admit refused; set before pgx dials or looks up anything
	holdsSlot       bool                   // a connecting slot is held
	pacerHeld       bool                   // a pacer slot is held
	pacerInUse      int                    // pacer slots held, this one included, when it was taken
	firstDialRefund atomic.Pointer[func()] // gives back the token admit took for the first dial; taken by it
	ended           atomic.Bool

	// netStart is when pgconn first touched the network (its first lookup
	// or dial), in unix nanoseconds: the time from admitted to it is pgx
	// preparing the connect.
	netStart atomic.Int64

	mu    sync.Mutex    // guards dials
	dials []*dialRecord // in order
}

// begin starts the connect span and runs the waits that come before the
// server is touched.
func (g *Gate) begin(ctx context.Context) *establishment {
	g.inflight.Add(1)
	g.stats.Establishments.Add(1)
	e := &establishment{start: time.Now(), attempt: 1}
	c := callerOf(ctx)
	if c != nil && c.attempt > 1 {
		e.attempt = c.attempt
	}
	e.reason = g.reasonFor(ctx, c)
	spanCtx, span := g.tel.startConnect(ctx, e)
	e.span = span

	e.ctx, e.cancel = context.WithCancelCause(spanCtx)
	e.closeWatch = context.AfterFunc(g.closeCtx, func() { e.cancel(ErrClosed) })
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
	e.admitErr = g.admit(e)
	e.admitted = time.Now()
	return e
}

// admit waits for the startup delay, the recovery delay after failures, a
// connecting slot and the first dial's token, in that order, all before
// pgconn starts its connect_timeout clock. The token comes last so that a
// token is never spent long before its dial: the server sees dials at the
// bucket's pace.
func (g *Gate) admit(e *establishment) error {
	if g.closeCtx.Err() != nil {
		return ErrClosed
	}
	if !g.startupOver.Load() {
		if err := g.waitUntil(e, g.startupEnd, WaitJitter); err != nil {
			return err
		}
		g.startupOver.Store(true)
	}
	if err := g.waitRecovery(e); err != nil {
		return err
	}
	if err := g.takeSlot(e); err != nil {
		return err
	}
	if err := g.takePacerSlot(e); err != nil {
		return err
	}
	refund, err := g.takeToken(e)
	if err != nil {
		return err
	}
	e.firstDialRefund.Store(&refund)
	return nil
}

// waitUntil waits for t, shedding at once if the caller's deadline comes
// first.
func (g *Gate) waitUntil(e *establishment, t time.Time, kind WaitKind) error {
	wait := time.Until(t)
	if wait <= 0 {
		return nil
	}
	if err := g.shedIfTooLate(e, kind, wait, t); err != nil {
		return err
	}
	start := g.startWait(kind)
	err := g.sleep(e.wait, wait)
	g.endWait(e.ctx, kind, start, time.Now())
	if err != nil {
		return g.waitError(e, kind, 0)
	}
	return nil
}

// takeSlot waits for a connecting slot.
func (g *Gate) takeSlot(e *establishment) error {
	select {
	case g.slots <- struct{}{}:
		e.holdsSlot = true
		return nil
	default:
	}
	start := g.startWait(WaitSlot)
	defer func() { g.endWait(e.ctx, WaitSlot, start, time.Now()) }()
	select {
	case g.slots <- struct{}{}:
		e.holdsSlot = true
		// A slot freed by Close or cancellation may win the race against
		// the wait's end: do not go on to the server then.
		if e.wait.Err() != nil {
			return g.waitError(e, WaitSlot, 0)
		}
		return nil
	case <-e.wait.Done():
		return g.waitError(e, WaitSlot, 0)
	}
}

// takePacerSlot waits for one of the pacer's slots: a place among the
// establishments under way, from the first lookup or dial until the
// connection is ready.
func (g *Gate) takePacerSlot(e *establishment) error {
	if g.pacer == nil {
		return nil
	}
	g.pacer.wake(time.Now())
	if ok, inUse := g.pacer.tryTake(); ok {
		e.pacerInUse = inUse
		e.pacerHeld = true
		return g.pacerSpacing(e)
	}
	start := g.startWait(WaitPacer)
	inUse, err := g.pacer.take(e.wait)
	g.endWait(e.ctx, WaitPacer, start, time.Now())
	if err != nil {
		return g.waitError(e, WaitPacer, 0)
	}
	e.pacerInUse = inUse
	e.pacerHeld = true
	if e.wait.Err() != nil {
		return g.waitError(e, WaitPacer, 0)
	}
	return g.pacerSpacing(e)
}

// awaitFirstFacts waits, holding the pacer's slot, until the pool has read
// the server's facts on its first connection (see [pacer.factsWait]), or
// for factsWaitMax at most: the read is a round trip, and a pool whose
// hooks fail the connection before it runs reads on the next one.
func (g *Gate) awaitFirstFacts(e *establishment) error {
	ch := g.pacer.factsWait()
	if ch == nil {
		return nil
	}
	start := g.startWait(WaitPacer)
	t := time.NewTimer(factsWaitMax)
	defer t.Stop()
	var err error
	select {
	case <-ch:
	case <-t.C:
	case <-e.wait.Done():
		err = g.waitError(e, WaitPacer, 0)
	}
	g.endWait(e.ctx, WaitPacer, start, time.Now())
	return err
}

// factsWaitMax bounds awaitFirstFacts.
const factsWaitMax = time.Second

// shedReserve is the part of a caller's time, from its connect's start to
// its deadline, that the gate's waits leave it: one quarter.
const shedReserve = 4

// pacerSpacing waits, holding the pacer's one slot, until the pacer admits
// the next establishment: below a limit of 1 it spaces them (see
// [pacer.space]). The slot goes back when e ends, whatever the wait did.
func (g *Gate) pacerSpacing(e *establishment) error {
	if err := g.awaitFirstFacts(e); err != nil {
		return err
	}
	return g.waitUntil(e, g.pacer.admitAt(), WaitPacer)
}

// shedIfTooLate sheds a wait of kind, lasting need and ending at t, that
// would leave the caller less than twice the time connects have been
// taking, or less than a quarter of the time it gave the connect
// (shedReserve): such a connection would reach the caller too late to be
// used, and pgx closes a connection whose query outlives its context,
// wasting the fork. The quarter covers what the moving average cannot
// know: connects slower than they were (a server recovering from a
// restart, its fleet reconnecting, is slower than the idle one the
// average learned) and the caller's own query.
func (g *Gate) shedIfTooLate(e *establishment, kind WaitKind, need time.Duration, t time.Time) error {
	dl, ok := e.wait.Deadline()
	if !ok {
		return nil
	}
	margin := max(2*g.ConnectTime(), dl.Sub(e.start)/shedReserve)
	if dl.Before(t.Add(margin)) {
		return g.shed(kind, need, time.Until(dl), margin)
	}
	return nil
}

// shed refuses an establishment because a wait of kind, lasting need, and
// then a connect expected to take connect cannot end in the time left
// before the caller's deadline (left and need are 0 when unknown).
func (g *Gate) shed(kind WaitKind, need, left, connect time.Duration) error {
	g.stats.Shed.Add(1)
	return &shedError{wait: waitNames[kind], need: need, left: left, connect: connect}
}

// waitError explains why e.wait ended during a wait.
func (g *Gate) waitError(e *establishment, kind WaitKind, need time.Duration) error {
	if g.closeCtx.Err() != nil {
		return ErrClosed
	}
	if cause := context.Cause(e.ctx); cause != nil {
		return cause
	}
	if errors.Is(e.wait.Err(), context.DeadlineExceeded) {
		return g.shed(kind, need, 0, 0)
	}
	return e.wait.Err()
}

// end gives back what begin took, learns from the outcome and reports it.
func (g *Gate) end(e *establishment, err error) {
	if !e.ended.CompareAndSwap(false, true) {
		return
	}
	now := time.Now()
	if err != nil && errors.Is(context.Cause(e.ctx), ErrClosed) {
		// Close cancelled e: a dial under way returns the cancellation
		// (net.Dialer's context.Canceled, not Close's cause), and it
		// ended because the Gate closed.
		err = errors.Join(ErrClosed, err)
	}
	class := Classify(err)
	g.release(e, class, now)
	g.learn(e, class, now)
	g.report(e, err, class, now)
	e.cancel(nil)
}

// release gives back what begin took but the span and ctx, which report
// still uses, the tokens of dials the server never answered (see
// dialFunc) and the first dial's token if nothing dialed, before learn
// counts a recovery delay from the bucket. A fleet member also gives back
// the tokens of an establishment that failed transiently: its reconnect
// cycle paces its attempts, one a window, and a bucket refilled on its own
// schedule would add up to a window to each.
// A success teaches the pacer first, so that its slot goes to the next
// establishment with the limit and spacing it set.
func (g *Gate) release(e *establishment, class Class, now time.Time) {
	giveBack := class == Transient && g.tokenGrid() > 0
	if e.holdsSlot {
		<-g.slots
	}
	if e.pacerHeld {
		e.pacerHeld = false
		if ns := e.netStart.Load(); class == OK && ns != 0 {
			g.pacer.succeeded(now, e.admitted, now.Sub(time.Unix(0, ns)), e.startup(now), e.pacerInUse)
		}
		g.pacer.give()
	}
	e.closeWatch()
	e.waitStop()
	g.inflight.Add(-1)
	e.mu.Lock()
	for _, r := range e.dials {
		if r.conn != nil && (giveBack || r.conn.dropped()) {
			r.giveBack(g)
		}
	}
	e.mu.Unlock()
	if p := e.firstDialRefund.Swap(nil); p != nil {
		// No dial took it: the lookup failed, or the connect ended
		// before dialing. Nothing was forked.
		g.refund(*p)
	}
}

// learn counts the outcome and updates what the gate knows of the server:
// the connect time a success took, or the recovery state and the pacer's
// fall after a transient failure (release fed a success to the pacer).
func (g *Gate) learn(e *establishment, class Class, now time.Time) {
	switch class {
	case OK:
		g.stats.OK.Add(1)
		g.learnConnectTime(now.Sub(e.admitted))
		g.recovered()
	case Transient:
		g.stats.Transient.Add(1)
		g.failed(e.admitted, now)
		if g.pacer != nil {
			g.pacer.failed(now)
		}
	case Permanent:
		g.stats.Permanent.Add(1)
	case Closed:
		g.stats.Closed.Add(1)
	}
}

// learnConnectTime folds a successful establishment's time into the moving
// average shedIfTooLate uses.
func (g *Gate) learnConnectTime(took time.Duration) {
	for {
		old := g.connectTime.Load()
		v := int64(took)
		if old != 0 {
			v = old + (v-old)/4
		}
		if g.connectTime.CompareAndSwap(old, v) {
			return
		}
	}
}
