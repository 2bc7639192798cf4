package engine

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"
)

// The errors package dialer exports and documents.
var (
	ErrShed          = errors.New("pgstagger: connect shed before touching the server")
	ErrClosed        = errors.New("pgstagger: closed")
	ErrInvalidOption = errors.New("pgstagger: invalid configuration")
)

// shedError is returned for a shed connect: it matches ErrShed and
// context.DeadlineExceeded and says which wait did not fit.
type shedError struct {
	wait    string        // "startup jitter", "rate limit", ...
	need    time.Duration // how long the wait would have been (0 if unknown)
	left    time.Duration // time left before the caller's deadline
	connect time.Duration // time the connect and its use were expected to need after the wait
	why     string        // when set, why it was shed: the fields above are unused
}

func (e *shedError) Error() string {
	if e.why != "" {
		return fmt.Sprintf("%v: %s", ErrShed, e.why)
	}
	if e.need > 0 && e.left > 0 && e.need < e.left {
		return fmt.Sprintf("%v: %s wait of %v would leave less than the %v a connect and its use need of the %v before the caller's deadline",
			ErrShed, e.wait, e.need.Round(time.Microsecond), e.connect.Round(time.Microsecond), e.left.Round(time.Microsecond))
	}
	if e.need > 0 && e.left > 0 {
		return fmt.Sprintf("%v: %s wait of %v exceeds the %v left before the caller's deadline",
			ErrShed, e.wait, e.need.Round(time.Microsecond), e.left.Round(time.Microsecond))
	}
	return fmt.Sprintf("%v: caller's deadline passed during the %s wait", ErrShed, e.wait)
}

func (e *shedError) Unwrap() []error { return []error{ErrShed, context.DeadlineExceeded} }

// GaveUpError is returned when a retry loop stops after transient failures:
// the policy returned backoff.Stop, the next attempt could not start before
// the caller's deadline, or the caller's context ended during a wait. Err is
// the last attempt's error.
type GaveUpError struct {
	Attempts int
	Err      error
	ctxErr   error // the context error that ended the loop, if any
}

func (e *GaveUpError) Error() string {
	why := "retry policy stopped"
	switch {
	case errors.Is(e.ctxErr, context.DeadlineExceeded):
		why = "no time left before the caller's deadline"
	case e.ctxErr != nil:
		why = "caller's context ended: " + e.ctxErr.Error()
	}
	return fmt.Sprintf("pgstagger: gave up connecting after %d attempts (%s): %v", e.Attempts, why, e.Err)
}

// Unwrap returns the last attempt's error and, when the caller's context
// ended the loop, its error (context.DeadlineExceeded or context.Canceled).
func (e *GaveUpError) Unwrap() []error {
	if e.ctxErr != nil {
		return []error{e.Err, e.ctxErr}
	}
	return []error{e.Err}
}

// Class is what [Classify] makes of an error from a connection attempt.
// Package dialer exports the classes and documents what each holds.
type Class int

const (
	OK Class = iota
	Transient
	Permanent
	Shed
	Closed
)

func (c Class) String() string {
	switch c {
	case OK:
		return "ok"
	case Transient:
		return "transient"
	case Permanent:
		return "permanent"
	case Shed:
		return "shed"
	case Closed:
		return "closed"
	}
	return fmt.Sprintf("Class(%d)", int(c))
}

// Classify tells how err from a connection attempt should be treated. It
// looks through wrapping and joined errors (pgconn joins one error per host
// tried): any permanent cause makes the whole permanent, since retrying
// cannot fix it.
func Classify(err error) Class {
	if err == nil {
		return OK
	}
	switch c := classify(err); c {
	case unknown:
		return Permanent
	default:
		return c
	}
}

const unknown Class = -1

func classify(err error) Class {
	if c, ok := classifyNode(err); ok {
		return c
	}
	var kids []error
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		if k := u.Unwrap(); k != nil {
			kids = []error{k}
		}
	case interface{ Unwrap() []error }:
		kids = u.Unwrap()
	}
	result := unknown
	for i, k := range kids {
		if i < len(kids)-1 && isTLSRefusal(k) {
			// sslmode=prefer: pgconn fell back to a plain connection
			// after the refusal, and what that met decides.
			continue
		}
		result = combine(result, classify(k))
	}
	return result
}

// combine orders classes by how decisive they are.
func combine(a, b Class) Class {
	rank := func(c Class) int {
		switch c {
		case Closed:
			return 5
		case Shed:
			return 4
		case Permanent:
			return 3
		case Transient:
			return 2
		}
		return 0
	}
	if rank(b) > rank(a) {
		return b
	}
	return a
}

func classifyNode(err error) (Class, bool) {
	switch err {
	case ErrClosed, puddle.ErrClosedPool:
		return Closed, true
	case ErrShed:
		return Shed, true
	case ErrInvalidOption, context.Canceled:
		return Permanent, true
	case context.DeadlineExceeded, io.EOF, io.ErrUnexpectedEOF:
		return Transient, true
	}
	switch e := err.(type) {
	case *shedError:
		return Shed, true
	case *pgconn.PgError:
		return sqlStateClass(e.Code), true
	case syscall.Errno:
		switch e {
		case syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE,
			syscall.ETIMEDOUT, syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.EAGAIN:
			return Transient, true
		}
		return unknown, false
	case *tls.CertificateVerificationError, x509.UnknownAuthorityError, x509.HostnameError,
		x509.CertificateInvalidError, *x509.UnknownAuthorityError, *x509.HostnameError, *x509.CertificateInvalidError:
		return Permanent, true
	case *net.DNSError:
		if e.IsNotFound {
			return Permanent, true
		}
		return Transient, true
	case *pgconn.ParseConfigError:
		return Permanent, true
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return Transient, true
	}
	// pgconn reports a server without TLS under sslmode=require as a plain
	// error: a configuration mismatch that retrying cannot fix. The error
	// itself, not one that wraps it: pgconn joins one connect's errors,
	// and under sslmode=prefer the refusal is followed by what the plain
	// dial after it met, which decides (see classify).
	if isTLSRefusal(err) && wrapsNothing(err) {
		return Permanent, true
	}
	return unknown, false
}

// isTLSRefusal reports whether err says the server refused TLS.
func isTLSRefusal(err error) bool {
	return strings.Contains(err.Error(), "server refused TLS connection")
}

// wrapsNothing reports whether err has neither Unwrap method.
func wrapsNothing(err error) bool {
	switch err.(type) {
	case interface{ Unwrap() error }, interface{ Unwrap() []error }:
		return false
	}
	return true
}

func sqlStateClass(code string) Class {
	switch code {
	case "53300", // too_many_connections
		"57P01", // admin_shutdown
		"57P02", // crash_shutdown
		"57P03": // cannot_connect_now (starting up, shutting down, recovering)
		return Transient
	}
	if strings.HasPrefix(code, "08") { // connection_exception
		return Transient
	}
	return Permanent
}

// SetupError is an error of a new connection's set-up after pgconn's
// connect and before the pool hands it out (the pool's server facts read in
// AfterConnect): an establishment failure, which the retry loop classifies
// as it does a connect's, since no caller's query ran on the connection.
type SetupError struct{ Err error }

func (e *SetupError) Error() string { return e.Err.Error() }
func (e *SetupError) Unwrap() error { return e.Err }

// isEstablishment reports whether err came from establishing a connection (so
// no query ran and retrying cannot repeat one).
func isEstablishment(err error) bool {
	var ce *pgconn.ConnectError
	var se *SetupError
	return errors.As(err, &ce) || errors.As(err, &se) || errors.Is(err, ErrShed) || errors.Is(err, ErrClosed)
}
