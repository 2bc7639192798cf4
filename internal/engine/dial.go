package engine

import (
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// lookupFunc wraps next: an establishment admit refused ends here, before
// any lookup, and a traced one gets a span.
func (g *Gate) lookupFunc(next pgconn.LookupFunc) pgconn.LookupFunc {
	return func(ctx context.Context, host string) ([]string, error) {
		if e := establishmentOf(ctx); e != nil {
			if e.admitErr != nil {
				return nil, e.admitErr
			}
			e.netStart.CompareAndSwap(0, time.Now().UnixNano())
			// Under the connect span, as the other phases are, even where
			// a tracer after the hook (otelpgx) put a span of its own in
			// ctx.
			ctx = trace.ContextWithSpan(ctx, e.span)
		}
		if !trace.SpanFromContext(ctx).IsRecording() {
			return next(ctx, host)
		}
		ctx, span := g.tel.tracer.Start(ctx, SpanLookup, trace.WithAttributes(semconv.ServerAddress(host)))
		defer span.End()
		addrs, err := next(ctx, host)
		if err != nil {
			span.SetStatus(codes.Error, err.Error())
		}
		return addrs, err
	}
}

// dialFunc wraps next so that every TCP connection of an establishment takes
// a token (see tokens.go): the first was taken by admit, further ones are
// taken here. An establishment admit refused ends here if pgx did not look
// anything up first (a unix socket). A host of a multi-host connection
// string whose dial failed is backed off: see [hostHealth]. Dials outside
// an establishment are CancelRequests: see [cancelConn].
func (g *Gate) dialFunc(next pgconn.DialFunc, group string) pgconn.DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		e := establishmentOf(ctx)
		if e == nil || e.ended.Load() {
			return newCancelConn(g, ctx, next, network, addr), nil
		}
		if e.admitErr != nil {
			return nil, e.admitErr
		}
		if context.Cause(e.ctx) == ErrClosed {
			return nil, ErrClosed
		}
		if prev := e.lastDial(); prev != nil && prev.addr != addr && prev.conn != nil &&
			prev.conn.firstRead.Load() == 0 && e.wait.Err() == nil {
			// pgconn gave up on a host that accepted the connection
			// but never answered (a frozen or swamped postmaster) and
			// moved on: as dead, for this list, as a refused one.
			g.hosts.record(group, prev.network, prev.addr, errHostSilent, time.Now())
		}
		if err := g.hosts.skip(group, network, addr, time.Now()); err != nil {
			g.stats.HostsSkipped.Add(1)
			return nil, err
		}
		e.netStart.CompareAndSwap(0, time.Now().UnixNano())
		var refund func()
		if p := e.firstDialRefund.Swap(nil); p != nil {
			refund = *p
		} else {
			var err error
			if refund, err = g.takeToken(e); err != nil {
				return nil, err
			}
		}
		g.stats.Dials.Add(1)
		r := &dialRecord{network: network, addr: addr, start: time.Now(), refund: refund}
		conn, err := next(ctx, network, addr)
		if errors.Is(err, syscall.ECONNREFUSED) {
			// Nothing listened: the server forked nothing for it.
			r.giveBack(g)
		}
		if err == nil || e.wait.Err() == nil {
			// A dial that failed because the caller gave up says
			// nothing of the host; one that timed out at
			// connect_timeout (ctx is pgconn's, per host) does.
			g.hosts.record(group, network, addr, err, time.Now())
		}
		r.end, r.err = time.Now(), err
		if err == nil {
			g.LearnRoundTrip(r.end.Sub(r.start))
		}
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

// LearnRoundTrip keeps the quickest round trip seen, an upper bound on the
// network's: a TCP handshake (the kernel answers it, not the postmaster) or
// a query on a connection the server already holds. Both, because a
// process that dialed once or twice may have dialed only inside a storm,
// whose accept queue made its handshakes take hundreds of milliseconds (a
// restart's single-connection workers: 600ms, against a loopback round
// trip of a tenth of a millisecond), and the bound on the pacer's
// baseline it feeds ([Gate.LearnFacts]) would be as loose. A quicker
// round trip tightens that bound at once: a process whose facts were read
// on a saturated server (a round trip of 50ms) dials again after a restart
// in a tenth of a millisecond, and its pacer's next spacing should not be
// sized from the old bound.
func (g *Gate) LearnRoundTrip(d time.Duration) {
	d = max(d, 1)
	for {
		old := g.roundTrip.Load()
		if old != 0 && old <= int64(d) {
			return
		}
		if g.roundTrip.CompareAndSwap(old, int64(d)) {
			if f := g.facts.Load(); f != nil && old != 0 {
				g.capBaseline(*f, time.Now())
			}
			return
		}
	}
}

// afterNetConnect marks the end of TLS (or of the dial, without TLS) on the
// establishment's current connection, then runs next.
func afterNetConnect(next func(context.Context, *pgconn.Config, net.Conn) (net.Conn, error)) func(context.Context, *pgconn.Config, net.Conn) (net.Conn, error) {
	return func(ctx context.Context, cfg *pgconn.Config, conn net.Conn) (net.Conn, error) {
		if e := establishmentOf(ctx); e != nil {
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

// dialRecord is one TCP dial of an establishment. Its establishment's mu
// guards refunded once the dial is recorded.
type dialRecord struct {
	network, addr string
	start, end    time.Time
	err           error
	conn          *tracedConn // nil if the dial failed
	refund        func()      // gives the dial's token back
	refunded      bool
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

// startup is how long the establishment took, until now, after the
// server's first byte on its connection (0 if unknown): what the backend
// did after the postmaster forked it, and the client with it.
func (e *establishment) startup(now time.Time) time.Duration {
	c := e.current()
	if c == nil {
		return 0
	}
	r := c.firstRead.Load()
	if r == 0 || now.UnixNano() < r {
		return 0
	}
	return now.Sub(time.Unix(0, r))
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

// tracedConn is a TCP connection of an establishment. It records when the
// client first wrote and the server first answered, whether the first write
// was an SSLRequest and how the server answered it, whether the server
// dropped the connection before answering, and when the connection was
// closed; it adds nothing else to reads and writes.
type tracedConn struct {
	net.Conn
	firstWrite   atomic.Int64 // unix nanoseconds
	firstRead    atomic.Int64
	firstByte    atomic.Int32 // first byte the server sent, +1 (0: none yet)
	sslRequest   atomic.Bool
	unanswered   atomic.Bool  // reset or closed by the server before its first byte
	netConnected atomic.Int64 // when pgconn finished TLS (AfterNetConnect)
	closed       atomic.Int64
}

// sslRequestCode is the protocol's SSLRequest: length 8, code 80877103.
var sslRequestCode = [8]byte{0, 0, 0, 8, 4, 210, 22, 47}

// tlsRefused reports whether the server answered the connection's
// SSLRequest with N: it has no TLS.
func (c *tracedConn) tlsRefused() bool { return c.sslRequest.Load() && c.firstByte.Load() == 'N'+1 }

func (c *tracedConn) Write(b []byte) (int, error) {
	if c.firstWrite.Load() == 0 && c.firstWrite.CompareAndSwap(0, time.Now().UnixNano()) {
		c.sslRequest.Store(len(b) >= 8 && [8]byte(b[:8]) == sslRequestCode)
	}
	return c.Conn.Write(b)
}

func (c *tracedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if c.firstRead.Load() == 0 {
		switch {
		case n > 0:
			if c.firstRead.CompareAndSwap(0, time.Now().UnixNano()) {
				c.firstByte.Store(int32(b[0]) + 1)
			}
		case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
			c.unanswered.Store(true)
		}
	}
	return n, err
}

func (c *tracedConn) Close() error {
	c.closed.CompareAndSwap(0, time.Now().UnixNano())
	return c.Conn.Close()
}

// responseTime is the postmaster's response time, or 0 if unknown.
func (c *tracedConn) responseTime() time.Duration {
	w, r := c.firstWrite.Load(), c.firstRead.Load()
	if w == 0 || r == 0 || r < w {
		return 0
	}
	return time.Duration(r - w)
}
