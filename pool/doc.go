// Package pool is a drop-in replacement for pgxpool that cannot stampede
// the PostgreSQL postmaster.
//
// Migrating is one import and one constructor:
//
//	import "github.com/pgstagger/pgstagger/pool"
//
//	p, err := pool.New(ctx, os.Getenv("DATABASE_URL")) // was pgxpool.New
//
// [*Pool] has every method of *pgxpool.Pool with the same signature
// (Acquire, AcquireFunc, AcquireAllIdle, Begin, BeginTx, Close, Config,
// CopyFrom, Exec, Ping, Query, QueryRow, Reset, SendBatch, Stat), and
// [Pool.Unwrap] returns the *pgxpool.Pool itself for code that needs that
// type, such as stdlib.OpenDBFromPool; connections it makes still pass the
// gate.
//
// # What changes
//
// Every connection the pool establishes, for an Acquire, for MinConns and
// MinIdleConns, or for a health-check refill, passes a [dialer.Dialer]:
//
//   - the pool's first connections wait a random startup delay in [0, 1s)
//     ([WithStartupJitter]); [New] itself never blocks;
//   - new TCP connections are limited to 20/s with bursts of 4
//     ([WithConnectRate], [WithLimiter] to share one bucket among pools);
//   - at most 2 establishments are in flight ([WithMaxConnecting]), so
//     MinConns is filled at a pace instead of by one goroutine per missing
//     connection all at once;
//   - transient connect failures (refused, reset, 53300, 57P03, class 08...)
//     are retried with exponential backoff and full jitter until the
//     caller's context ends or the policy gives up ([WithBackOff]); query
//     errors never are;
//   - connection lifetimes are jittered (MaxConnLifetime/10 by default,
//     honoured to the nanosecond) so pools started together do not renew
//     their connections together ([WithLifetimeJitter]);
//   - the CancelRequest connections pgx opens when a query's context ends
//     take tokens too, so a stall that times out many queries at once does
//     not become a storm of forks;
//   - a dead host of a multi-host connection string (host=a,b) is backed
//     off instead of being dialed before every connection to a live one.
//
// [WithFleet] derives the startup window and the rate from how many
// processes start together and how many connections per second the server
// should absorb from all of them. All defaults protect the server with no
// option at all.
//
// # Errors
//
// A caller whose deadline falls before a wait pgstagger imposes can end, with
// time left to connect, gets an error matching [dialer.ErrShed] (and
// context.DeadlineExceeded) at once.
// A retry loop that stops returns a [*dialer.GaveUpError]. A closed pool's
// methods, and callers waiting when it closes, return errors matching
// [ErrClosed]. [dialer.Classify] sorts any of these; callers never need
// pgconn or puddle for it. Invalid options and connection strings fail in
// [New] with [dialer.ErrInvalidOption], naming the option and the value and
// never the password.
//
// # Telemetry
//
// With [WithTracerProvider] and [WithMeterProvider] (the global providers by
// default), every connection the pool establishes is a span with child spans
// for every wait and every phase on the wire (see [dialer]), and the pool
// reports the semantic conventions' db.client.connection.* metrics: count by
// state, max, idle.max, idle.min, pending_requests, timeouts, create_time,
// wait_time and use_time. The acquire-path instruments are installed only
// when enabled as the pool is created, so a pool without metrics pays
// nothing per Acquire. [WithLogger] logs connect failures, retries and
// sheds.
//
// # Hooks and tracers
//
// The configuration's BeforeConnect, AfterConnect, PrepareConn (or the
// deprecated BeforeAcquire), AfterRelease, BeforeClose, ShouldPing,
// ConnConfig.Tracer, DialFunc and LookupFunc keep working: the gate wraps
// DialFunc, joins ConnConfig.Tracer through pgx's multitracer (so pool
// tracers such as AcquireTracer are still found) and wraps AfterConnect,
// PrepareConn and BeforeClose around the caller's. [Pool.Config] returns
// the configuration as the caller gave it.
//
// A Pool is safe for concurrent use.
package pool
