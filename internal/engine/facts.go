package engine

import (
	"log/slog"
	"math"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// ServerFacts is what a pool read from the server's statistics
// ([FactsQuery], [FactsHistoryQuery]), on a connection it already held: how
// many connections the whole fleet would have to re-establish after a
// restart, and how fast the server has been seen to take them on.
type ServerFacts struct {
	// Held is how many connections to a database the server held.
	Held int
	// PeakRate is the fastest connect rate seen, per second: the most
	// backends that started within one calendar second, among those the
	// role can see (its own, or all with pg_read_all_stats), or the
	// fastest growth of Held between two reads, whichever is larger. A
	// Gate keeps the largest it saw, so that a fleet reconnected at a
	// paced rate does not lower its own budget restart after restart.
	PeakRate float64
	// ForkRate is the fastest the postmaster was seen to fork, per second,
	// over a tenth of one: n visible backends started within one tenth of
	// a calendar second are n − 1 forks in at most 100ms, so the
	// postmaster forks at least 10 × (n − 1) a second. A storm shows it in
	// its first tenth of a second, where PeakRate needs a second. A Gate
	// keeps the largest it saw.
	ForkRate float64
	// At is when Held was read.
	At time.Time
}

// FactsQuery reads [ServerFacts]' Held. Any role may run it. It costs one
// round trip and a count of the server's backends, and forks nothing:
// 0.2ms on a 2-core machine holding 1,500 connections, where a query of
// pg_stat_activity takes 2-5ms, since it builds every backend's row.
const FactsQuery = `select coalesce(sum(pg_stat_get_db_numbackends(oid)), 0) from pg_database`

// FactsHistoryQuery reads Held, then k, and the most visible backends that
// started within one calendar second and within one tenth of a second
// among every k-th backend, k being 1 up to 1,999 connections and 1 per
// 1,000 above ([Gate.LearnFacts] takes k times the counts). It counts
// backends connected to a database: the server's own processes
// (checkpointer, WAL writer and the rest, all started with the server in
// one second) have none (database 0). Unsampled it costs about a
// microsecond per backend (1.4ms with 1,500), seven times FactsQuery;
// sampled, FactsQuery's cost and about a millisecond, however many the
// server holds, and a fleet's fastest second (hundreds to thousands of
// starts) shows within a few percent.
const FactsHistoryQuery = `with h as (select coalesce(sum(pg_stat_get_db_numbackends(oid)), 0) as held from pg_database),
	k as (select greatest(1, held / 1000) as k from h)
	select (select held from h), (select k from k), coalesce(max(s), 0), coalesce(max(t), 0)
	from (select sum(n) as s, max(n) as t from (select count(*) as n, floor(extract(epoch from pg_stat_get_backend_start(id)) * 10) as tenth
		from pg_stat_get_backend_idset() as id
		where id % (select k from k) = 0 and pg_stat_get_backend_dbid(id) <> 0 and pg_stat_get_backend_start(id) is not null group by tenth) as b
	group by floor(tenth / 10)) as s`

// FactsShare is the share of the fastest connect rate seen that a fleet's
// reconnects are budgeted: half, as WithFleet's documentation advises for a
// budget, leaving the rest to the server's other clients. The fastest
// second of a fleet's start is about what the server could take then, or
// more (a backlog drains into it). Measured in the demo's restart, 1,500
// workers, pgxpool reconnecting all at once in the same runs: at half, all
// back 1.96-2.40× as long after the server was up as with pgxpool, and a
// bystander's connect p99 1.4-3.9× its loaded steady state (4 runs); at two
// thirds, 1.39-2.38× and 0.6-21× (6 runs); at the full rate, one run
// reached 641 dials a second against a capacity of 216.
const FactsShare = 0.5

// MaxRecoveryWindow bounds the reconnect window a Gate sizes from
// [ServerFacts], however many connections the server held.
const MaxRecoveryWindow = time.Minute

// minFactsGap is the least time between two reads whose growth counts
// toward PeakRate: over a shorter one, a few connects would look like a
// fast rate.
const minFactsGap = 500 * time.Millisecond

// idleForks bounds an idle connect's answer, after the round trip, in
// units of the postmaster's time per fork: its own fork, and the child's
// start up to its first byte, which on a server with cores to spare runs
// beside the postmaster's next fork.
const idleForks = 2

// LearnFacts records that the server held held connections at at, with
// peakStarts and tenthStarts the most backends seen to start within one
// second and within a tenth of one (0: not read), and the growth since the
// previous read as a rate, keeping the fastest rates.
//
// The fastest rate also bounds the pacer's baseline: a postmaster that
// forked rate backends in a second (PeakRate or ForkRate, the larger)
// spends at most 1/rate on one, so an idle connect's first byte comes
// within a round trip (the quickest seen, see [Gate.LearnRoundTrip]) and
// [idleForks] times that, and the connection is ready within the start-up
// after that byte (authentication and the backend's InitPostgres, the
// quickest the pacer saw); a pacer that measured more (its first connects
// met a storm's queue) takes that bound as its baseline instead.
func (g *Gate) LearnFacts(held, peakStarts, tenthStarts int, at time.Time) {
	for {
		old := g.facts.Load()
		f := ServerFacts{Held: held, PeakRate: float64(peakStarts), ForkRate: 10 * float64(max(0, tenthStarts-1)), At: at}
		if old != nil {
			f.PeakRate = math.Max(f.PeakRate, old.PeakRate)
			f.ForkRate = math.Max(f.ForkRate, old.ForkRate)
			if gap := at.Sub(old.At); gap >= minFactsGap && held > old.Held {
				f.PeakRate = math.Max(f.PeakRate, float64(held-old.Held)/gap.Seconds())
			}
		}
		if g.facts.CompareAndSwap(old, &f) {
			g.capBaseline(f, at)
			return
		}
	}
}

// capBaseline bounds the pacer's baseline, at now, by what f and the
// quickest round trip say an idle connect takes (see LearnFacts).
func (g *Gate) capBaseline(f ServerFacts, now time.Time) {
	if g.pacer == nil {
		return
	}
	var ceiling time.Duration // unknown
	if rate := math.Max(f.PeakRate, f.ForkRate); rate > 0 {
		ceiling = time.Duration(g.roundTrip.Load()) + time.Duration(idleForks*float64(time.Second)/rate)
	}
	g.pacer.capBaseline(now, ceiling)
}

// AwaitFacts tells the Gate that its pool will read the server's facts on
// its first connections: until [Gate.FactsSettled], the pacer's limit does
// not grow (see LearnFacts).
func (g *Gate) AwaitFacts() {
	if g.pacer != nil {
		g.pacer.holdForFacts()
	}
}

// FactsSettled ends AwaitFacts: the pool has read the facts twice, far
// enough apart to see a fleet's rate (a storm that has just begun shows
// little in its first second), or a read failed.
func (g *Gate) FactsSettled() {
	if g.pacer != nil {
		g.pacer.factsRead()
	}
}

// Facts returns the newest facts learned (the zero ServerFacts before any).
func (g *Gate) Facts() ServerFacts {
	if f := g.facts.Load(); f != nil {
		return *f
	}
	return ServerFacts{}
}

// RecoveryWindow is how long a cycle of the fleet's reconnects lasts after
// a failure or a lost connection: the process reconnects at its phase in
// it. A configured fleet's is its startup window; otherwise it is the
// startup window or, if longer, the window [FactsWindow] sizes from the
// server's facts and the pacer's baseline.
func (g *Gate) RecoveryWindow() time.Duration {
	w := g.plan.StartupWindow
	if g.plan.FleetSize > 0 {
		return w
	}
	f := g.facts.Load()
	if f == nil {
		return w
	}
	var baseline time.Duration
	if g.pacer != nil {
		baseline = g.pacer.state().baseline
	}
	return max(w, FactsWindow(*f, baseline))
}

// FactsWindow is the window over which the connections the server held
// can come back at a rate it has served: f.Held at the larger of
// [FactsShare] of f.PeakRate and a quarter of the rate of a server whose
// every establishment took baseline (0: unknown), capped at
// [MaxRecoveryWindow]. With neither rate known it is 0.
func FactsWindow(f ServerFacts, baseline time.Duration) time.Duration {
	budget := f.PeakRate * FactsShare
	if baseline > 0 {
		budget = math.Max(budget, 1/(4*baseline.Seconds()))
	}
	if f.Held <= 0 || budget <= 0 {
		return 0
	}
	return min(saturatingSeconds(float64(f.Held)/budget), MaxRecoveryWindow)
}

// establishedKey is the key of a connection's CustomData under which the
// Gate keeps when the connection's establishment was admitted.
const establishedKey = "pgstagger.admitted"

// lostCodes are the SQLSTATEs with which a server ends the sessions it
// holds when it shuts down or crashes.
var lostCodes = map[string]bool{
	"57P01": true, // admin_shutdown (also pg_terminate_backend)
	"57P02": true, // crash_shutdown
}

// onPgError wraps next, a connection's OnPgError, so that a server ending
// the session sets the Gate's recovery state: a server shutting down or
// crashing is gone for the whole fleet, and the process's next
// establishments wait for its place in the reconnect window instead of
// dialing at once.
func (g *Gate) onPgError(next pgconn.PgErrorHandler) pgconn.PgErrorHandler {
	return func(c *pgconn.PgConn, err *pgconn.PgError) bool {
		admitted, _ := c.CustomData()[establishedKey].(time.Time)
		g.SessionError(admitted, err)
		if next == nil {
			return true
		}
		return next(c, err)
	}
}

// SessionError is what the Gate's OnPgError does, for a client without
// pgconn (see [Gate.ConnectStarted]): the server sent err on a session
// established (admitted) at admitted.
func (g *Gate) SessionError(admitted time.Time, err *pgconn.PgError) {
	if lostCodes[err.Code] {
		g.lost(admitted, time.Now(), err.Code)
	}
}

// lost records that the server ended a session established (admitted) at
// admitted. A session older than the last failure recorded died in that
// outage, which the gate already handled: it changes nothing.
func (g *Gate) lost(admitted, now time.Time, code string) {
	g.stats.Lost.Add(1)
	if last := g.lastFailure.Load(); !admitted.After(time.Unix(0, last)) && last != 0 {
		return
	}
	if !g.failed(admitted, now) {
		return
	}
	if g.pacer != nil {
		g.pacer.failed(now)
	}
	if g.tel.log != nil {
		f := g.Facts()
		g.tel.log.LogAttrs(g.closeCtx, slog.LevelWarn, "pgstagger: the server ended a session; new connections wait for this process's place in the reconnect window",
			slog.String(string(g.tel.poolAttr.Key), g.tel.poolName),
			slog.String("code", code),
			slog.Duration("window", g.RecoveryWindow()),
			slog.Int("server_connections", f.Held),
			slog.Float64("server_peak_connects_per_second", f.PeakRate))
	}
}
