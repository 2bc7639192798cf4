package engine

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstagger/pgstagger/jitter"
)

// factsPerConn is how much longer the interval between facts reads grows,
// at most, per connection the server holds. A read costs the server about
// a tenth of a microsecond per backend; with the interval growing with
// what it holds, a fleet of n processes costs it about n × 10µs per
// second in all, however large, instead of a cost growing with n².
const factsPerConn = 10 * time.Millisecond

// historyPerConn is the same for the history read ([FactsHistoryQuery]),
// which costs the server up to a microsecond per backend: about n × 10µs
// per second in all too.
const historyPerConn = 100 * time.Millisecond

// rampPerConn is the least interval between a reader's first reads, per
// connection the server held. Each process of a fleet reads at once, then
// after 1s (600ms for an early reader), 2s, 4s and so on up to its
// interval, to follow a fleet that is still connecting, and reads the
// history at its second read. A process joining a server that already
// holds many connections would pay those reads, each costing as much as
// the server holds, and a fleet joining one process after another would
// pay them all, however long its members had run. Below 3,200 connections
// the bound is shorter than the first interval, and nothing changes. An
// early reader's second read keeps its 600ms: its pacer waits for that
// read ([Gate.AwaitFacts]), and a fleet of pools has a reader per pool,
// not per connection.
const rampPerConn = factsPerConn / 32

// firstGap is the wait after an early reader's first read, ±15%: at least
// minFactsGap (500ms) apart, the growth between two reads counts toward
// the peak rate.
const firstGap = 600 * time.Millisecond

// factsTimeout bounds the facts query: it should take a round trip. On a
// server whose connects take longer than half of it, twice a connect's
// time bounds it instead (see [FactsReader.Read]).
const factsTimeout = time.Second

// ErrFactsReply is a reply to the facts query with the wrong shape.
var ErrFactsReply = errors.New("pgstagger: unexpected reply to the server facts query")

// A FactsReader schedules the reads of the server's facts on connections a
// pool already holds and tells the Gate what they found
// ([Gate.LearnFacts]); package pool runs it from pgxpool's AfterConnect
// and ShouldPing. It never opens a connection: whoever takes a due read
// ([FactsReader.Due]) runs it on the connection at hand.
//
// The first read is due at once, the next 1s later (600ms for an early
// reader, see [NewFactsReader]), then twice as long each time up to every
// (a fleet that has just started has not finished connecting; two reads
// apart see its rate), each interval ±15% so that a fleet's reads do not
// line up, and none shorter than rampPerConn per connection the server
// held (but an early reader's second read). The second read also reads
// when the backends started (by then a fleet that started together has,
// and its fastest second shows; on a server holding thousands, a sample,
// see [FactsHistoryQuery]), and so does a later one at most every
// 4 × every, or historyPerConn per connection held if that is longer. Due
// costs one atomic load.
type FactsReader struct {
	g     *Gate
	every time.Duration
	rand  jitter.Rand
	early bool // the first read reads the history too

	due atomic.Bool // a read is due; the caller of Due that clears it reads

	// Touched only by the reader, one at a time (due serializes them).
	reads       int       // reads done
	nextHistory time.Time // the first read at or after it reads the history

	mu       sync.Mutex
	interval time.Duration // guarded by mu: the wait after the next read
	timer    *time.Timer   // guarded by mu: sets due
	closed   bool          // guarded by mu
}

// NewFactsReader returns g's reader, reading at most every every (not 0).
// An early reader (a pool of more than one connection) reads the history
// at its first read too and makes g's pacer wait for it: the fastest rate
// bounds the pacer's baseline ([Gate.LearnFacts]), which matters while the
// pool still has connects to make, perhaps inside a storm.
func NewFactsReader(g *Gate, every time.Duration, r jitter.Rand, early bool) *FactsReader {
	f := &FactsReader{g: g, every: every, rand: r, interval: min(time.Second, every), early: early}
	if early {
		// The second read comes sooner, just far enough from the first
		// for the growth between them to count as a rate.
		f.interval = min(firstGap, every)
		g.AwaitFacts()
	}
	f.due.Store(true)
	return f
}

// ReadsFacts reports whether a pool of maxConns connections installed with
// g reads the server's facts unless told otherwise: every pool but a
// configured fleet's pool of one connection. That pool's reconnect window
// is its fleet's ([Gate.RecoveryWindow]), and it has no connects to pace
// while it fills, so the facts would bound no more than its pacer's
// baseline, while every read costs the server about as much as it holds:
// a fleet of n such processes pays about n² × 0.05µs of the server's time
// in first reads alone as it joins, and a read comes due on many a
// reconnect after a restart (simulated, 10,000 workers restarted at 679
// connects a second, three runs each: a bystander's connect p99 during
// the recovery 132-140ms with the reads, 14ms without).
func (g *Gate) ReadsFacts(maxConns int32) bool {
	return maxConns > 1 || g.Plan().FleetSize == 0
}

// Due reports whether a read is due, and if so makes the caller its
// reader: it must call Read.
func (f *FactsReader) Due() bool {
	return f.due.Load() && f.due.CompareAndSwap(true, false)
}

// A FactsQuerier runs sql on a connection the pool holds and returns its one
// row of integers.
type FactsQuerier func(ctx context.Context, sql string) ([]int, error)

// Read runs the due read with query and schedules the next, unless the
// server cannot run the query ([CannotReadFacts]). It returns query's
// error.
func (f *FactsReader) Read(query FactsQuerier) error {
	// A server whose connects take seconds is saturated, and answers a
	// query as slowly: a read that timed out would close a connection
	// that cost a fork and a place in its queue.
	ctx, cancel := context.WithTimeout(context.Background(), max(factsTimeout, 2*f.g.ConnectTime()))
	defer cancel()
	now := time.Now()
	history := (f.reads == 0 && f.early) || (f.reads > 0 && !now.Before(f.nextHistory))
	sql, columns := FactsQuery, 1
	if history {
		sql, columns = FactsHistoryQuery, 4
	}
	vals, err := query(ctx, sql)
	if err == nil && len(vals) != columns {
		err = ErrFactsReply
	}
	if err == nil {
		// A round trip, and the query's work: an upper bound on the
		// network's round trip, where a process's few handshakes may
		// all have met a storm ([Gate.LearnRoundTrip]).
		f.g.LearnRoundTrip(time.Since(now))
	}
	switch {
	case err == nil:
		held, starts, tenth := vals[0], 0, 0
		if history {
			// Every k-th backend's counts: k times as many started.
			k := max(1, vals[1])
			starts, tenth = k*vals[2], k*vals[3]
		}
		if history && f.reads > 0 {
			// The first read's history (an early reader's) is read
			// again at the second, after the storm it may have met.
			f.nextHistory = now.Add(max(4*f.every, time.Duration(held)*historyPerConn))
		}
		f.reads++
		f.g.LearnFacts(held, starts, tenth, time.Now())
		f.schedule(held)
	case CannotReadFacts(err):
		// An SQL proxy without PostgreSQL's statistics functions, or a
		// reply of the wrong shape: no more reads.
	default:
		f.schedule(f.g.Facts().Held)
	}
	if err != nil || f.reads >= 2 {
		f.g.FactsSettled()
	}
	return err
}

// CannotReadFacts reports whether err says the server cannot run the facts
// query at all: a reply of the wrong shape ([ErrFactsReply]), or SQLSTATE
// class 42 (an unknown function or relation) or 0A (not supported).
func CannotReadFacts(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return strings.HasPrefix(pe.Code, "42") || strings.HasPrefix(pe.Code, "0A")
	}
	return errors.Is(err, ErrFactsReply)
}

// schedule makes the next read due after the current interval, at least
// rampPerConn per connection the server held (but an early reader's second
// read), ±15%, and doubles the interval up to every, or factsPerConn per
// connection held if that is longer. Only the reader calls it.
func (f *FactsReader) schedule(held int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	if !f.early || f.reads != 1 {
		f.interval = max(f.interval, time.Duration(held)*rampPerConn)
	}
	wait := time.Duration(float64(f.interval) * (0.85 + 0.3*f.rand()))
	f.interval = min(2*f.interval, max(f.every, time.Duration(held)*factsPerConn))
	f.timer = time.AfterFunc(wait, func() { f.due.Store(true) })
}

// Close stops the reads. A nil FactsReader does nothing.
func (f *FactsReader) Close() {
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
