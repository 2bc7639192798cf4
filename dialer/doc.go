// Package dialer is pgstagger's connection-establishment gate: it stands
// between a client and PostgreSQL's postmaster and decides when a new
// connection may be made, so that a fleet of processes connecting at once
// does not saturate the postmaster's single accept-and-fork loop.
//
// A [Dialer] delays a process's first connections by startup jitter, takes a
// token from a bucket for every TCP connection the server forks for
// (CancelRequests included), caps establishments in flight, retries
// transient failures with backoff and full jitter, spreads reconnects
// after a failure, and backs off dead hosts of multi-host connection
// strings. Every wait is bounded by the caller's context; a wait that
// cannot end in time is shed at once with [ErrShed], without touching the
// server. Every establishment is traced and measured with OpenTelemetry.
//
// One connection with the protections:
//
//	conn, err := dialer.Connect(ctx, "postgres://app@db/app", dialer.WithFleet(500, 200))
//
// Or gate a configuration, keeping its DialFunc, LookupFunc and Tracer:
//
//	d, err := dialer.New(dialer.WithFleet(500, 200))
//	err = d.InstallPool(cfg) // cfg from pgxpool.ParseConfig
//
// Package [github.com/pgstagger/pgstagger/pool] does this for pgxpool and
// adds the retry loops to the pool's methods. The repository's README
// explains each protection, its measurements and the failure behaviour:
// https://github.com/pgstagger/pgstagger.
package dialer
