package engine

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// cancelConn is the connection pgconn gets for a CancelRequest. It dials
// when pgconn first writes, so that it can see the request first: pgx sends
// a CancelRequest for process ID 0 whenever a connect fails before the
// server named its backend (a read error during the startup closes the
// half-made connection, and closing always cancels). Such a request cancels
// nothing, yet costs the postmaster a fork; at a server restart every
// process of a fleet sends one at the same moment. cancelConn answers it
// itself when it is sent in plain text (over TLS the first write is the
// SSLRequest, and the request cannot be seen).
//
// Every other request is a fork like any connection, and pgx sends one for
// every query whose context ends (pgx issue #1780): a stall that times out
// many queries at once becomes a storm of them. So it takes a token from the
// bucket, waiting for one as long as its context allows (pgx gives the
// cancel it sends when closing a connection 15s); a wait that cannot end
// before that deadline is not begun, and the request is not sent
// (Stats.CancelsShed). It is not shed earlier, as a connect is: a cancel
// needs no time after its dial but to write 16 bytes. A refused dial gives
// its token back.
//
// pgconn uses a cancelConn from one goroutine, except that its context
// watcher may set deadlines from another: mu serializes them, and the wait
// for the token and the dial happen outside it, so that Close and the
// deadline setters never wait for them.
type cancelConn struct {
	g             *Gate
	ctx           context.Context // the request's: ended by Close too
	stop          context.CancelFunc
	next          pgconn.DialFunc
	network, addr string
	dialOnce      sync.Once

	mu      sync.Mutex
	dialed  bool      // the dial was made (conn or dialErr is its result)
	conn    net.Conn  // the dialed connection
	dialErr error     // the dial's error, or why no dial was made
	skipped bool      // a keyless request, answered here
	closed  bool      // Close was called
	rd, wd  time.Time // deadlines set before the dial
}

func newCancelConn(g *Gate, ctx context.Context, next pgconn.DialFunc, network, address string) *cancelConn {
	ctx, stop := context.WithCancel(ctx)
	return &cancelConn{g: g, ctx: ctx, stop: stop, next: next, network: network, addr: address}
}

// cancelRequestCode is the protocol's CancelRequest code; the message is
// length, code, process ID, secret key.
const cancelRequestCode = 80877102

// keylessCancel reports whether b is a CancelRequest for process ID 0.
func keylessCancel(b []byte) bool {
	return len(b) >= 12 && int(binary.BigEndian.Uint32(b[0:4])) == len(b) &&
		binary.BigEndian.Uint32(b[4:8]) == cancelRequestCode &&
		binary.BigEndian.Uint32(b[8:12]) == 0
}

// connect takes a token and dials, once; c.mu must not be held.
func (c *cancelConn) connect() (net.Conn, error) {
	c.dialOnce.Do(func() {
		var conn net.Conn
		refund, err := c.g.cancelToken(c.ctx)
		if err == nil {
			c.g.stats.CancelDials.Add(1)
			conn, err = c.next(c.ctx, c.network, c.addr)
			if errors.Is(err, syscall.ECONNREFUSED) {
				// Nothing listened: as for an establishment's dial.
				c.g.refund(refund)
			}
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		c.dialed, c.conn, c.dialErr = true, conn, err
		if conn == nil {
			return
		}
		if c.closed {
			_ = conn.Close()
			return
		}
		if !c.rd.IsZero() {
			_ = conn.SetReadDeadline(c.rd)
		}
		if !c.wd.IsZero() {
			_ = conn.SetWriteDeadline(c.wd)
		}
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, net.ErrClosed
	}
	return c.conn, c.dialErr
}

func (c *cancelConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return 0, net.ErrClosed
	}
	if !c.dialed && !c.skipped && keylessCancel(b) {
		c.skipped = true
		c.mu.Unlock()
		c.g.stats.CancelsSkipped.Add(1)
		return len(b), nil
	}
	if c.skipped {
		c.mu.Unlock()
		return 0, net.ErrClosed
	}
	c.mu.Unlock()
	conn, err := c.connect()
	if err != nil {
		return 0, err
	}
	return conn.Write(b)
}

func (c *cancelConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return 0, net.ErrClosed
	}
	if c.skipped {
		// What the server does after a CancelRequest: close.
		c.mu.Unlock()
		return 0, io.EOF
	}
	c.mu.Unlock()
	conn, err := c.connect()
	if err != nil {
		return 0, err
	}
	return conn.Read(b)
}

func (c *cancelConn) Close() error {
	c.stop() // ends a wait for the token
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if c.conn != nil {
		return c.conn.Close()
	}
	return nil
}

// addr is the address dialed, for LocalAddr and RemoteAddr before the dial.
type addr struct{ network, s string }

func (a addr) Network() string { return a.network }
func (a addr) String() string  { return a.s }

func (c *cancelConn) LocalAddr() net.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		return c.conn.LocalAddr()
	}
	return addr{c.network, ""}
}

func (c *cancelConn) RemoteAddr() net.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		return c.conn.RemoteAddr()
	}
	return addr{c.network, c.addr}
}

func (c *cancelConn) SetDeadline(t time.Time) error      { return c.setDeadlines(true, true, t) }
func (c *cancelConn) SetReadDeadline(t time.Time) error  { return c.setDeadlines(true, false, t) }
func (c *cancelConn) SetWriteDeadline(t time.Time) error { return c.setDeadlines(false, true, t) }

// setDeadlines sets the read and/or write deadline: on the connection once
// dialed, and kept for it before.
func (c *cancelConn) setDeadlines(read, write bool, t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if read {
		c.rd = t
	}
	if write {
		c.wd = t
	}
	switch {
	case c.conn == nil:
		return nil
	case read && write:
		return c.conn.SetDeadline(t)
	case read:
		return c.conn.SetReadDeadline(t)
	default:
		return c.conn.SetWriteDeadline(t)
	}
}
