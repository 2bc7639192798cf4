package dialer

import "github.com/pgstagger/pgstagger/internal/engine"

var (
	// ErrShed reports that a wait pgstagger would impose (startup jitter,
	// rate limit, connecting slot or backoff) could not end before the
	// caller's deadline, so the caller was answered at once and the server
	// was not touched. A wait whose end is known is shed too when it would
	// leave the caller less than twice the time this Dialer's connects have
	// been taking (a moving average), or less than a quarter of the time
	// from the connect's start to the caller's deadline: the connection
	// would reach the caller too late to be used, and pgx would close it
	// with the query, wasting the fork. Errors matching it also match
	// context.DeadlineExceeded.
	ErrShed = engine.ErrShed

	// ErrClosed reports that the Dialer (or the pool owning it) was closed.
	ErrClosed = engine.ErrClosed

	// ErrInvalidOption reports an option or connection setting that cannot
	// work; the error names the option and the value.
	ErrInvalidOption = engine.ErrInvalidOption
)

// GaveUpError is returned when a retry loop stops after transient failures:
// the policy returned backoff.Stop, the next attempt could not start before
// the caller's deadline, or the caller's context ended during a wait. Its
// field Attempts counts the attempts made and Err is the last attempt's
// error. It unwraps to Err and, when the caller's context ended the loop,
// to the context's error (context.DeadlineExceeded or context.Canceled).
type GaveUpError = engine.GaveUpError

// Class is what [Classify] makes of an error from a connection attempt.
type Class = engine.Class

const (
	// OK is the class of a nil error.
	OK = engine.OK
	// Transient failures may succeed if tried again later: connection
	// refused or reset, unexpected EOF, timeouts, SQLSTATE 53300
	// too_many_connections, 57P01-57P03 (shutdown, crash, cannot connect
	// now) and class 08 (connection exception).
	Transient = engine.Transient
	// Permanent failures will fail again: authentication (28P01, 28000),
	// unknown database (3D000), missing privilege (42501), TLS certificate
	// verification, invalid configuration, and anything not known to be
	// transient.
	Permanent = engine.Permanent
	// Shed is a connect refused by pgstagger before touching the server
	// ([ErrShed]).
	Shed = engine.Shed
	// Closed is a connect ended by closing the Dialer or pool ([ErrClosed]).
	Closed = engine.Closed
)

// Classify tells how err from a connection attempt should be treated. It
// looks through wrapping and joined errors (pgconn joins one error per host
// tried): any permanent cause makes the whole permanent, since retrying
// cannot fix it. A closed pgxpool (puddle's ErrClosedPool) is [Closed].
func Classify(err error) Class { return engine.Classify(err) }
