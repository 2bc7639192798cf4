package dialer

import "github.com/pgstagger/pgstagger/internal/engine"

// ScopeName is the instrumentation scope of pgstagger's spans and metrics.
const ScopeName = engine.ScopeName

// Attributes pgstagger adds to spans, metrics and log lines beside the
// OpenTelemetry semantic conventions for database clients (no convention
// covers them).
const (
	// AttrAttempt is the attempt number of an establishment within its
	// retry loop, from 1.
	AttrAttempt = engine.AttrAttempt
	// AttrReason is why a connection was established: one of the Reason
	// constants.
	AttrReason = engine.AttrReason
	// AttrOutcome is the [Class] of an attempt's result, as a string.
	AttrOutcome = engine.AttrOutcome
	// AttrWait is the kind of wait of a wait span or the
	// pgstagger.connect.wait_time metric: startup_jitter, backoff,
	// max_connecting, rate_limit or pacer.
	AttrWait = engine.AttrWait
	// AttrPostmasterResponseTime is the time, in seconds, from the first
	// byte the client sent on a TCP connection (SSLRequest or
	// StartupMessage) to the first byte the server sent back: how long the
	// postmaster took to accept and fork a backend that answered.
	AttrPostmasterResponseTime = engine.AttrPostmasterResponseTime
	// AttrDials is how many TCP connections an establishment opened.
	AttrDials = engine.AttrDials
	// AttrConnectLimit is how many connects the pacer let be under way at
	// once when an establishment ended (see [WithResponseTarget]).
	AttrConnectLimit = engine.AttrConnectLimit
	// AttrPostmasterBaseline is the pacer's baseline when an establishment
	// ended: the quickest establishment seen (first lookup or dial to a
	// ready connection), in seconds.
	AttrPostmasterBaseline = engine.AttrPostmasterBaseline
	// AttrTLSRefused is true on a connect span, and on its TLS handshake
	// span, when the server refused TLS and pgx dialed again in plain text
	// (sslmode=prefer against a server without TLS): see
	// [Stats].PlainAfterTLSRefused.
	AttrTLSRefused = engine.AttrTLSRefused
)

// Reasons for establishing a connection (the [AttrReason] attribute).
const (
	ReasonAcquire = engine.ReasonAcquire // a pool's caller needed a connection
	ReasonConnect = engine.ReasonConnect // a direct connect (Connect, or a config with the Dialer installed)
	ReasonWarmUp  = engine.ReasonWarmUp  // a new pool filling MinConns/MinIdleConns
	ReasonRefill  = engine.ReasonRefill  // a pool's health check restoring MinConns/MinIdleConns
	ReasonRetry   = engine.ReasonRetry   // a retry loop's later attempt
)
