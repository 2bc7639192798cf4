// Package pool is a drop-in replacement for pgxpool that cannot stampede
// the PostgreSQL postmaster.
//
// Migrating is one import and one constructor:
//
//	import "github.com/pgstagger/pgstagger/pool"
//
//	p, err := pool.New(ctx, os.Getenv("DATABASE_URL")) // was pgxpool.New
//
// [*Pool] has every method of *pgxpool.Pool with the same signature, and
// [Pool.Unwrap] returns the *pgxpool.Pool itself for code that needs that
// type. [OpenDB] gives database/sql (GORM, ent, sqlx) a *sql.DB on the pool,
// with the pool's retries. Every connection the pool
// establishes, for an Acquire, for MinConns or for a health-check refill,
// passes the gate of package [github.com/pgstagger/pgstagger/dialer]:
// startup jitter, a token bucket on new connections, a cap on
// establishments in flight and a recovery delay after failures, which
// spreads a fleet's reconnects after a restart over a window sized from
// the server's own count of its connections ([WithServerFacts]). Transient
// connect failures of the pool's methods are retried with backoff and full
// jitter; query errors never are. Connection lifetimes are jittered to the
// nanosecond. Each option states its default; all of them protect a single
// process with no option at all, and [WithFleet] budgets a fleet, also
// from the connection string (pgstagger_fleet_size, pgstagger_fleet_budget,
// pgstagger_fleet_member) as pgxpool's pool_* parameters set a pool.
//
// Errors match [dialer.ErrShed], [ErrClosed] or [dialer.ErrInvalidOption],
// or are a [*dialer.GaveUpError]; [dialer.Classify] sorts them, so callers
// never need pgconn or puddle. A caller shed from a connection's wait gets
// its error at once; the pool still makes the connection in the
// background, as pgxpool makes one whose caller gave up. The repository's README explains each
// protection, its measurements, the telemetry and the failure behaviour:
// https://github.com/pgstagger/pgstagger.
package pool
