package pool

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/internal/engine"
	"github.com/pgstagger/pgstagger/jitter"
)

// DefaultServerFactsEvery is how often, at most, a pool reads the server's
// facts ([WithServerFacts]) once it has run a while.
const DefaultServerFactsEvery = 30 * time.Second

// factsPerConn is how much longer the interval between reads grows, at
// most, per connection the server holds. A read costs the server about a
// tenth of a microsecond per backend; with the interval growing with what
// it holds, a fleet of n processes costs it about n × 10µs per second in
// all, however large, instead of a cost growing with n².
const factsPerConn = 10 * time.Millisecond

// historyPerConn is the same for the history read
// ([engine.FactsHistoryQuery]), which costs the server about a microsecond
// per backend: about n × 10µs per second in all too.
const historyPerConn = 100 * time.Millisecond

// firstGap is the wait after a pool's first read, ±15%: at least
// engine's minFactsGap (500ms) apart, the growth between two reads counts
// toward the peak rate.
const firstGap = 600 * time.Millisecond

// factsTimeout bounds the facts query: it should take a round trip. On a
// server whose connects take longer than half of it, twice a connect's
// time bounds it instead (see read).
const factsTimeout = time.Second

// serverFacts counts the server's connections on a connection the pool
// holds and tells the gate ([engine.Gate.LearnFacts]), so that after a
// restart the fleet's reconnects spread over a window sized from what the
// server held and how fast it took them on.
// It never opens a connection: when a read is due, the next connection the
// pool establishes (in AfterConnect) or the next Acquire that takes one (in
// ShouldPing) runs it, before the caller gets the connection. Both, because
// a pool filling MinConns may hand its first connection to an Acquire only
// once all of them are made: the read would come after the storm it is
// for. The first read is due at once, the next 1s later (600ms for a pool
// of more than one connection, see newServerFacts), then twice as long
// each time up to every (a fleet that has just started has not finished
// connecting; two reads apart see its rate), each interval ±15% so that a
// fleet's reads do not line up. The second read also reads when the
// backends started (by then a fleet that started together has, and its
// fastest second shows), and so does a later one at most every 4 × every,
// or historyPerConn per connection held if that is longer. The hot path
// pays one atomic load.
type serverFacts struct {
	g     *engine.Gate
	every time.Duration
	rand  jitter.Rand
	early bool // the first read reads the history too

	due atomic.Bool // a read is due; the acquirer that clears it reads

	// Touched only by the reader, one at a time (due serializes them).
	reads       int       // reads done
	nextHistory time.Time // the first read at or after it reads the history

	mu       sync.Mutex
	interval time.Duration // guarded by mu: the wait after the next read
	timer    *time.Timer   // guarded by mu: sets due
	closed   bool          // guarded by mu
}

// newServerFacts installs the facts reader on inner's ShouldPing,
// composing with the caller's (or pgxpool's default, a ping after a second
// idle); it returns nil when every is 0. A pool of more than one
// connection reads the history at its first read too: the fastest rate
// bounds its pacer's baseline ([engine.Gate.LearnFacts]), which matters
// while the pool still has connects to make, perhaps inside a storm.
func newServerFacts(inner *pgxpool.Config, g *engine.Gate, every time.Duration, r jitter.Rand) *serverFacts {
	if every <= 0 {
		return nil
	}
	f := &serverFacts{g: g, every: every, rand: r, interval: min(time.Second, every), early: inner.MaxConns > 1}
	if f.early {
		// The second read comes sooner, just far enough from the first
		// for the growth between them to count as a rate.
		f.interval = min(firstGap, every)
		g.AwaitFacts()
	}
	f.due.Store(true)
	shouldPing := inner.ShouldPing
	if shouldPing == nil {
		shouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool { return p.IdleDuration > time.Second }
	}
	inner.ShouldPing = func(ctx context.Context, p pgxpool.ShouldPingParams) bool {
		if f.due.Load() && f.due.CompareAndSwap(true, false) {
			if err := f.read(p.Conn.PgConn()); err != nil {
				return true // the connection failed: pgxpool's ping finds out
			}
		}
		return shouldPing(ctx, p)
	}
	afterConnect := inner.AfterConnect
	inner.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		if afterConnect != nil {
			if err := afterConnect(ctx, c); err != nil {
				return err
			}
		}
		if f.due.Load() && f.due.CompareAndSwap(true, false) {
			if err := f.read(c.PgConn()); err != nil {
				// The new connection closed under the read: pgxpool
				// discards it. No caller's query ran on it, so it
				// is an establishment failure, and its class (a
				// timeout, a reset: transient) lets Pool's methods
				// retry.
				return &engine.SetupError{Err: fmt.Errorf("%w: %w", errFactsConn, err)}
			}
		}
		return nil
	}
	return f
}

// errFactsConn wraps why a new connection failed during the facts read.
var errFactsConn = errors.New("pgstagger: the connection failed during the server facts read")

// errFactsReply is a reply to the facts query with the wrong shape.
var errFactsReply = errors.New("pgstagger: unexpected reply to the server facts query")

// read runs the facts query on c and schedules the next read, unless the
// server cannot run the query ([cannotRun]). It goes through pgconn, below
// pgx's query tracers and statement cache: the caller's tracer does not see
// it. It returns nil while c is still usable, and otherwise what closed it.
func (f *serverFacts) read(c *pgconn.PgConn) (closedBy error) {
	// A server whose connects take seconds is saturated, and answers a
	// query as slowly: a read that timed out would close a connection
	// that cost a fork and a place in its queue.
	ctx, cancel := context.WithTimeout(context.Background(), max(factsTimeout, 2*f.g.ConnectTime()))
	defer cancel()
	now := time.Now()
	history := f.reads == 1 || (f.reads == 0 && f.early) || (f.reads > 1 && !now.Before(f.nextHistory))
	sql, columns := engine.FactsQuery, 1
	if history {
		sql, columns = engine.FactsHistoryQuery, 3
	}
	vals, err := intsOf(c.Exec(ctx, sql).ReadAll())
	if err == nil && len(vals) != columns {
		err = errFactsReply
	}
	if err == nil {
		// A round trip, and the query's work: an upper bound on the
		// network's round trip, where a process's few handshakes may
		// all have met a storm ([engine.Gate.LearnRoundTrip]).
		f.g.LearnRoundTrip(time.Since(now))
	}
	switch {
	case err == nil:
		held, starts, tenth := vals[0], 0, 0
		if history {
			starts, tenth = vals[1], vals[2]
			f.nextHistory = now.Add(max(4*f.every, time.Duration(held)*historyPerConn))
		}
		f.reads++
		f.g.LearnFacts(held, starts, tenth, time.Now())
		f.schedule(held)
	case cannotRun(err):
		// An SQL proxy without PostgreSQL's statistics functions, or a
		// reply of the wrong shape: no more reads.
	default:
		f.schedule(f.g.Facts().Held)
	}
	if err != nil || f.reads >= 2 {
		f.g.FactsSettled()
	}
	if c.IsClosed() {
		return cmp.Or(err, io.ErrUnexpectedEOF)
	}
	return nil
}

// cannotRun reports whether err says the server cannot run the facts
// query at all: a reply of the wrong shape, or SQLSTATE class 42 (an
// unknown function or relation) or 0A (not supported).
func cannotRun(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return strings.HasPrefix(pe.Code, "42") || strings.HasPrefix(pe.Code, "0A")
	}
	return errors.Is(err, errFactsReply)
}

// intsOf parses a one-row reply of integers.
func intsOf(rs []*pgconn.Result, err error) ([]int, error) {
	if err != nil {
		return nil, err
	}
	if len(rs) != 1 || len(rs[0].Rows) != 1 {
		return nil, errFactsReply
	}
	vals := make([]int, len(rs[0].Rows[0]))
	for i, v := range rs[0].Rows[0] {
		if vals[i], err = strconv.Atoi(string(v)); err != nil {
			return nil, errFactsReply
		}
	}
	return vals, nil
}

// schedule makes the next read due after the current interval, ±15%, and
// doubles the interval up to every, or factsPerConn per connection the
// server held if that is longer.
func (f *serverFacts) schedule(held int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	wait := time.Duration(float64(f.interval) * (0.85 + 0.3*f.rand()))
	f.interval = min(2*f.interval, max(f.every, time.Duration(held)*factsPerConn))
	f.timer = time.AfterFunc(wait, func() { f.due.Store(true) })
}

// close stops the reads.
func (f *serverFacts) close() {
	if f == nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	if f.timer != nil {
		f.timer.Stop()
	}
}
