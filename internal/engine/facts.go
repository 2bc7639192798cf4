package engine

import (
	"log/slog"
	"math"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// ServerFacts is what a pool read from pg_stat_activity ([FactsQuery]), on
// a connection it already held, about the server it connects to: how many
// connections the whole fleet would have to re-establish after a restart,
// and how fast the server has been seen to accept them.
type ServerFacts struct {
	// Held is how many connections to a database the server held (any
	// role can count them: other roles' rows keep their datid).
	Held int
	// PeakStarts is the most of the backends visible to the role (its
	// own, or all with pg_read_all_stats) that started within one
	// calendar second: a connect rate the server has served. A Gate keeps
	// the largest it was told, so that a fleet reconnected at a paced
	// rate does not lower its own budget restart after restart.
	PeakStarts int
	// At is when they were read.
	At time.Time
}

// FactsQuery reads [ServerFacts]' Held and PeakStarts. It costs one round
// trip and a scan of the server's backend table, and forks nothing.
const FactsQuery = `select count(*) filter (where datid is not null),
	coalesce((select max(n) from (select count(*) as n from pg_stat_activity
		where datid is not null and backend_start is not null
		group by date_trunc('second', backend_start)) as s), 0)
from pg_stat_activity`

// MaxRecoveryWindow bounds the reconnect window a Gate sizes from
// [ServerFacts], however many connections the server held.
const MaxRecoveryWindow = time.Minute

// LearnFacts records f, keeping the largest PeakStarts seen.
func (g *Gate) LearnFacts(f ServerFacts) {
	for {
		old := g.facts.Load()
		nf := f
		if old != nil {
			nf.PeakStarts = max(nf.PeakStarts, old.PeakStarts)
		}
		if g.facts.CompareAndSwap(old, &nf) {
			return
		}
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
// can come back at a rate it has served: f.Held at the larger of half
// f.PeakStarts per second and a quarter of the rate of a postmaster whose
// every connect took baseline (0: unknown), capped at [MaxRecoveryWindow].
// With neither rate known it is 0. Half of a served rate leaves the other
// half to the server's other clients, as WithFleet's documentation advises
// for a budget.
func FactsWindow(f ServerFacts, baseline time.Duration) time.Duration {
	budget := float64(f.PeakStarts) / 2
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
		if lostCodes[err.Code] {
			admitted, _ := c.CustomData()[establishedKey].(time.Time)
			g.lost(admitted, time.Now(), err.Code)
		}
		if next == nil {
			return true
		}
		return next(c, err)
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
			slog.Int("server_peak_connects_per_second", f.PeakStarts))
	}
}
