package pool

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/internal/engine"
	"github.com/pgstagger/pgstagger/jitter"
)

// DefaultServerFactsEvery is how often, at most, a pool reads the server's
// facts ([WithServerFacts]) once it has run a while.
const DefaultServerFactsEvery = 30 * time.Second

// factsTimeout bounds the facts query: it should take a round trip.
const factsTimeout = time.Second

// serverFacts reads pg_stat_activity on a connection the pool holds and
// tells the gate ([engine.Gate.LearnFacts]), so that after a restart the
// fleet's reconnects spread over a window sized from what the server held.
// It never opens a connection: when a read is due, the next Acquire that
// takes a connection from the pool runs it on that connection, in
// ShouldPing, before the caller gets it. The first read is due at once,
// the next 1s later, then 2s, 4s … up to every (a fleet that has just
// started has not finished connecting), each interval ±15% so that a
// fleet's reads do not line up. The hot path pays one atomic load.
type serverFacts struct {
	g     *engine.Gate
	every time.Duration
	rand  jitter.Rand

	due atomic.Bool // a read is due; the acquirer that clears it reads

	mu       sync.Mutex
	interval time.Duration // guarded by mu: the wait after the next read
	timer    *time.Timer   // guarded by mu: sets due
	closed   bool          // guarded by mu
}

// newServerFacts installs the facts reader on inner's ShouldPing,
// composing with the caller's (or pgxpool's default, a ping after a second
// idle); it returns nil when every is 0.
func newServerFacts(inner *pgxpool.Config, g *engine.Gate, every time.Duration, r jitter.Rand) *serverFacts {
	if every <= 0 {
		return nil
	}
	f := &serverFacts{g: g, every: every, rand: r, interval: min(time.Second, every)}
	f.due.Store(true)
	shouldPing := inner.ShouldPing
	if shouldPing == nil {
		shouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool { return p.IdleDuration > time.Second }
	}
	inner.ShouldPing = func(ctx context.Context, p pgxpool.ShouldPingParams) bool {
		if f.due.Load() && f.due.CompareAndSwap(true, false) && !f.read(p.Conn.PgConn()) {
			return true // the connection failed: pgxpool's ping finds out
		}
		return shouldPing(ctx, p)
	}
	return f
}

// errFactsReply is a reply to the facts query with the wrong shape.
var errFactsReply = errors.New("pgstagger: unexpected reply to the server facts query")

// read runs the facts query on c and schedules the next read, unless the
// server cannot run it. It goes through pgconn, below pgx's query tracers
// and statement cache: the caller's tracer does not see it. It reports
// whether c is still usable.
func (f *serverFacts) read(c *pgconn.PgConn) bool {
	ctx, cancel := context.WithTimeout(context.Background(), factsTimeout)
	defer cancel()
	held, peak, err := factsOf(c.Exec(ctx, engine.FactsQuery).ReadAll())
	if err == nil {
		f.g.LearnFacts(engine.ServerFacts{Held: held, PeakStarts: peak, At: time.Now()})
	}
	if c.IsClosed() || err == nil {
		f.schedule()
	}
	// Else the server answered and cannot run it (an SQL proxy without
	// pg_stat_activity): no more reads.
	return !c.IsClosed()
}

// factsOf parses the facts query's reply.
func factsOf(rs []*pgconn.Result, err error) (held, peak int, _ error) {
	if err != nil {
		return 0, 0, err
	}
	if len(rs) != 1 || len(rs[0].Rows) != 1 || len(rs[0].Rows[0]) != 2 {
		return 0, 0, errFactsReply
	}
	row := rs[0].Rows[0]
	if held, err = strconv.Atoi(string(row[0])); err != nil {
		return 0, 0, errFactsReply
	}
	if peak, err = strconv.Atoi(string(row[1])); err != nil {
		return 0, 0, errFactsReply
	}
	return held, peak, nil
}

// schedule makes the next read due after the current interval, ±15%, and
// doubles the interval up to every.
func (f *serverFacts) schedule() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	wait := time.Duration(float64(f.interval) * (0.85 + 0.3*f.rand()))
	f.interval = min(2*f.interval, f.every)
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
