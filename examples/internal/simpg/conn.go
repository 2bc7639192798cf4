package simpg

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// pipe returns the two ends of an in-memory connection that behaves as a
// TCP connection does for its users: a write never waits for the reader (the
// kernel buffers it) and is dropped if the peer has closed; a read waits for
// data, for the peer's close (io.EOF) or for its deadline. net.Pipe would make a client's startup message wait
// for the server to read it, so a client would see the postmaster's queue
// in its write, not where it sees it on a real server: in the wait for the
// first byte back.
//
// Every wait is a sync.Cond's, and every deadline a time.AfterFunc, so that
// both ends are durably blocked in a synctest bubble.
func pipe(client, server net.Addr) (c, s net.Conn) {
	a, b := newHalf(), newHalf() // a: client to server; b: server to client
	return &end{in: b, out: a, local: client, remote: server}, &end{in: a, out: b, local: server, remote: client}
}

// half is one direction of a pipe.
type half struct {
	mu        sync.Mutex
	cond      sync.Cond
	buf       []byte    // guarded by mu: written, not yet read
	eof       error     // guarded by mu: what a read returns once buf is empty: the writer closed
	gone      bool      // guarded by mu: the reader closed; writes fail
	deadline  time.Time // guarded by mu: the reader's
	timer     *time.Timer
	wdeadline time.Time // guarded by mu: the writer's
}

func newHalf() *half {
	h := &half{}
	h.cond.L = &h.mu
	return h
}

// end is one end of a pipe: it reads in and writes out.
type end struct {
	in, out       *half
	local, remote net.Addr
}

func (e *end) Read(p []byte) (int, error) {
	h := e.in
	h.mu.Lock()
	defer h.mu.Unlock()
	for {
		switch {
		case h.gone:
			return 0, e.opError("read", net.ErrClosed)
		case len(h.buf) > 0:
			n := copy(p, h.buf)
			h.buf = h.buf[n:]
			if len(h.buf) == 0 {
				h.buf = nil
			}
			return n, nil
		case h.eof != nil:
			if h.eof == io.EOF {
				return 0, io.EOF
			}
			return 0, e.opError("read", h.eof)
		case !h.deadline.IsZero() && !time.Now().Before(h.deadline):
			return 0, e.opError("read", os.ErrDeadlineExceeded)
		}
		h.cond.Wait()
	}
}

// wait waits until a read would not: for data, the peer's close, the
// end's own, or its read deadline.
func (e *end) wait() {
	h := e.in
	h.mu.Lock()
	defer h.mu.Unlock()
	for len(h.buf) == 0 && h.eof == nil && !h.gone && (h.deadline.IsZero() || time.Now().Before(h.deadline)) {
		h.cond.Wait()
	}
}

func (e *end) Write(p []byte) (int, error) {
	h := e.out
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.eof != nil:
		return 0, e.opError("write", net.ErrClosed)
	case !h.wdeadline.IsZero() && !time.Now().Before(h.wdeadline):
		return 0, e.opError("write", os.ErrDeadlineExceeded)
	case h.gone:
		// TCP takes a write to a peer that has closed, and drops it:
		// the writer learns of the close from its next read.
		return len(p), nil
	}
	h.buf = append(h.buf, p...)
	h.cond.Broadcast()
	return len(p), nil
}

// Close ends both directions: the peer reads what was written, then
// io.EOF, and its writes fail.
func (e *end) Close() error { return e.close(io.EOF) }

// reset closes e as a listen socket closed with the connection in its
// backlog does: the peer reads ECONNRESET.
func (e *end) reset() error { return e.close(syscall.ECONNRESET) }

func (e *end) close(peerReads error) error {
	for _, h := range []*half{e.in, e.out} {
		h.mu.Lock()
		if h == e.in {
			h.gone = true
		} else if h.eof == nil {
			h.eof = peerReads
		}
		h.cond.Broadcast()
		h.mu.Unlock()
	}
	return nil
}

func (e *end) LocalAddr() net.Addr  { return e.local }
func (e *end) RemoteAddr() net.Addr { return e.remote }

func (e *end) SetDeadline(t time.Time) error {
	_ = e.SetReadDeadline(t)
	return e.SetWriteDeadline(t)
}

func (e *end) SetReadDeadline(t time.Time) error {
	h := e.in
	h.mu.Lock()
	defer h.mu.Unlock()
	h.deadline = t
	if h.timer != nil {
		h.timer.Stop()
		h.timer = nil
	}
	if t.IsZero() {
		return nil
	}
	if d := time.Until(t); d > 0 {
		h.timer = time.AfterFunc(d, func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			h.cond.Broadcast()
		})
		return nil
	}
	h.cond.Broadcast()
	return nil
}

// SetWriteDeadline only fails later writes: a write never waits.
func (e *end) SetWriteDeadline(t time.Time) error {
	h := e.out
	h.mu.Lock()
	defer h.mu.Unlock()
	h.wdeadline = t
	return nil
}

func (e *end) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: e.local, Addr: e.remote, Err: err}
}
