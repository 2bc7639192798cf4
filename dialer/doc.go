// Package dialer is pgstagger's connection-establishment gate: the part that
// stands between a client and PostgreSQL's postmaster and decides when a new
// connection may be made.
//
// The postmaster accepts every connection in one single-threaded loop and
// forks a backend for each. When a fleet of processes connects at once the
// loop saturates and every client waits, not only the fleet. A [Dialer]
// keeps a process from taking part in such a stampede:
//
//   - startup jitter: its first connections wait a uniform random delay in
//     [0, window) ([WithStartupJitter]);
//   - a token bucket (golang.org/x/time/rate) on new TCP connections, counted
//     per connection the server forks for: multi-host fallbacks and
//     sslmode=prefer's second dial take a token each ([WithConnectRate],
//     [WithLimiter]). CancelRequest connections take a token too, waiting
//     for it up to their own deadline: pgx opens one for every query whose
//     context ends, and a stall that times out many queries at once must
//     not become a stampede of cancels. The CancelRequest pgx sends for
//     process ID 0 whenever a connect fails before the server named its
//     backend cancels nothing: sent in plain text, it is answered without a
//     connection;
//   - at most n establishments in flight ([WithMaxConnecting]);
//   - retries of transient failures with backoff and full jitter
//     (github.com/cenkalti/backoff/v4, [WithBackOff]), and a shared recovery
//     delay after a failure: every later establishment of the process waits
//     the longer of the backoff and a fresh draw over the startup window, so
//     a fleet that loses its server together comes back spread out, as at
//     a fresh start. The draw counts from when the bucket next holds a
//     token, so that buckets emptied together do not release the fleet
//     together. A dial refused at the TCP level, or reset or closed before
//     the server sent a byte (a postmaster exiting drops the connections it
//     has not accepted), gives its token back: the server forked nothing
//     for it;
//   - per-host backoff for multi-host connection strings (host=a,b): a host
//     whose dial failed, or that accepted and sent nothing until
//     connect_timeout, is skipped without a dial, for the retry policy's
//     next interval, while another host of the list is up, so a dead first
//     host is not dialed, or waited on, before every connection to the live
//     one;
//   - a fleet budget that derives the window and the rate from the fleet's
//     size and what the server should absorb ([WithFleet]).
//
// Every wait is bounded by the caller's context. A wait whose end is known
// (startup delay, bucket, backoff) and leaves the caller less than twice the
// time connects have been taking (a moving average of this Dialer's
// successful ones) is not waited at all: the caller gets an error matching
// [ErrShed] and context.DeadlineExceeded at once, and the server is not
// touched. A connection that reached its caller too late to be used would
// be closed by pgx with its query, wasting the fork.
//
// # Using it
//
// One connection with the protections:
//
//	conn, err := dialer.Connect(ctx, "postgres://app@db/app", dialer.WithFleet(500, 200))
//
// Installed on a configuration, every connection made with it passes the
// gate. [Dialer.Install] takes a *pgx.ConnConfig and [Dialer.InstallPool] a
// *pgxpool.Config; both keep the configuration's DialFunc, LookupFunc and
// Tracer working, composing the tracer with pgx's multitracer. Package
// [github.com/pgstagger/pgstagger/pool] does this for pgxpool and adds the
// retry loops to the pool's methods.
//
// # Errors
//
// [Classify] sorts errors from connection attempts into [Transient] (refused,
// reset, unexpected EOF, timeouts, SQLSTATE 53300, 57P01-57P03, class 08),
// [Permanent] (authentication 28P01/28000, unknown database 3D000, privilege
// 42501, TLS verification, invalid configuration, anything unknown), [Shed]
// and [Closed]. Only transient failures of establishing a connection are
// retried; an error from a query on an established connection never is. A
// retry loop that stops returns a [*GaveUpError] with the attempt count and
// the last cause. [ErrInvalidOption] marks bad options and connection
// strings; no error the package makes contains a password.
//
// # Telemetry
//
// Every establishment gets a pgstagger.connect span ([WithTracerProvider]):
// a child of the caller's span, or a root span for a pool's background work
// ([ReasonWarmUp], [ReasonRefill]). Child spans cover each wait the gate
// imposed, the lookup, each TCP dial, the TLS handshake and server startup;
// [AttrPostmasterResponseTime] is measured on the wire, from the client's
// first byte to the server's first byte back. Failures carry error.type and
// db.response.status_code (the SQLSTATE). Metrics ([WithMeterProvider])
// include db.client.connection.create_time and pgstagger.connect.attempts,
// pgstagger.connect.wait_time and pgstagger.postmaster.response_time, with
// [DurationBuckets]. [WithLogger] logs failures, retries and sheds. None of
// them ever carries a password.
//
// A Dialer is safe for concurrent use.
package dialer
