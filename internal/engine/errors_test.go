package engine

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"
)

func TestClassify(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	pg := func(code string) error { return &pgconn.PgError{Severity: "FATAL", Code: code} }
	cases := []struct {
		name string
		err  error
		want Class
	}{
		{"nil", nil, OK},
		{"refused", refused, Transient},
		{"reset", fmt.Errorf("read: %w", syscall.ECONNRESET), Transient},
		{"unexpected EOF", fmt.Errorf("receive message: %w", io.ErrUnexpectedEOF), Transient},
		{"deadline", fmt.Errorf("dial: %w", context.DeadlineExceeded), Transient},
		{"too many connections", pg("53300"), Transient},
		{"starting up", pg("57P03"), Transient},
		{"admin shutdown", pg("57P01"), Transient},
		{"connection exception class", pg("08006"), Transient},
		{"wrong password", pg("28P01"), Permanent},
		{"no such role", pg("28000"), Permanent},
		{"unknown database", pg("3D000"), Permanent},
		{"no connect privilege", pg("42501"), Permanent},
		{"other SQLSTATE", pg("42P01"), Permanent},
		{"unknown CA", fmt.Errorf("tls: %w", x509.UnknownAuthorityError{}), Permanent},
		{"wrong host", x509.HostnameError{Host: "x"}, Permanent},
		{"canceled", context.Canceled, Permanent},
		{"unknown error", errors.New("something else"), Permanent},
		{"invalid option", fmt.Errorf("%w: x", ErrInvalidOption), Permanent},
		{"shed", &shedError{wait: "rate limit"}, Shed},
		{"closed", ErrClosed, Closed},
		{"pgxpool closed", fmt.Errorf("acquire: %w", puddle.ErrClosedPool), Closed},
		{"one host down, one refusing auth", errors.Join(refused, pg("28P01")), Permanent},
		{"all hosts down", errors.Join(refused, refused), Transient},
		{"gave up keeps the cause", &GaveUpError{Attempts: 3, Err: refused}, Transient},
		{"sslmode=require, no TLS", errors.Join(fmt.Errorf("tls error: %w", errors.New("server refused TLS connection"))), Permanent},
		// sslmode=prefer against a server without TLS: pgconn joins the
		// refusal with what the plain dial after it met.
		{"prefer, then too many connections", errors.Join(fmt.Errorf("tls error: %w", errors.New("server refused TLS connection")), pg("53300")), Transient},
		{"prefer, then the pool closed", errors.Join(fmt.Errorf("tls error: %w", errors.New("server refused TLS connection")), fmt.Errorf("dial error: %w", ErrClosed)), Closed},
	}
	for _, c := range cases {
		if got := Classify(c.err); got != c.want {
			t.Errorf("%s: Classify(%v) = %v, want %v", c.name, c.err, got, c.want)
		}
	}
}

func TestErrorsMatch(t *testing.T) {
	shed := error(&shedError{wait: "startup jitter"})
	if !errors.Is(shed, ErrShed) || !errors.Is(shed, context.DeadlineExceeded) {
		t.Errorf("shed error %v must match ErrShed and context.DeadlineExceeded", shed)
	}
	cause := errors.New("refused")
	gave := error(&GaveUpError{Attempts: 4, Err: cause, ctxErr: context.DeadlineExceeded})
	var g *GaveUpError
	if !errors.As(gave, &g) || g.Attempts != 4 || !errors.Is(gave, cause) || !errors.Is(gave, context.DeadlineExceeded) {
		t.Errorf("GaveUpError %v must expose attempts, cause and deadline", gave)
	}
	if errors.Is(&GaveUpError{Attempts: 2, Err: cause}, context.DeadlineExceeded) {
		t.Errorf("a policy stop must not match context.DeadlineExceeded")
	}
}
