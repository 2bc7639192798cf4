package pool

import (
	"bytes"
	"context"
	"log/slog"
	"net/url"
	"strings"
	"testing"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/testdb"
)

// withSSLMode returns connString with its sslmode set to mode ("" : none).
func withSSLMode(t *testing.T, connString, mode string) string {
	t.Helper()
	u, err := url.Parse(connString)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Del("sslmode")
	if mode != "" {
		q.Set("sslmode", mode)
	}
	u.RawQuery = q.Encode()
	return u.String()
}

func TestPreferAgainstAServerWithoutTLSWarnsOncePerPool(t *testing.T) {
	ctx := context.Background()
	plain := db(t).ConnString("")
	tc, err := testdb.Start(testdb.Options{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	const conns = 3
	for _, tt := range []struct {
		name, url string
		warned    bool
	}{
		{"prefer, server without TLS", withSSLMode(t, plain, "prefer"), true},
		{"sslmode unset, server without TLS", withSSLMode(t, plain, ""), true},
		{"disable", withSSLMode(t, plain, "disable"), false},
		{"prefer, TLS server", withSSLMode(t, tc.ConnString(""), "prefer"), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for i := range 2 { // two pools: a warning each
				logs := new(bytes.Buffer)
				cfg, err := pgxpool.ParseConfig(tt.url)
				if err != nil {
					t.Fatal(err)
				}
				cfg.MaxConns = conns
				p, err := NewWithConfig(ctx, cfg, append(fast, WithLogger(slog.New(slog.NewTextHandler(logs, nil))))...)
				if err != nil {
					t.Fatal(err)
				}
				var held []*pgxpool.Conn
				for range conns {
					c, err := p.Acquire(ctx)
					if err != nil {
						t.Fatal(err)
					}
					held = append(held, c)
				}
				for _, c := range held {
					c.Release()
				}
				p.Close()

				warnings := strings.Count(logs.String(), "refused TLS")
				got := p.Dialer().Stats().PlainAfterTLSRefused
				if tt.warned && (warnings != 1 || got != conns) {
					t.Errorf("pool %d: %d warnings, PlainAfterTLSRefused %d; want 1 warning and %d\n%s", i, warnings, got, conns, logs)
				}
				if !tt.warned && (warnings != 0 || got != 0) {
					t.Errorf("pool %d: %d warnings, PlainAfterTLSRefused %d; want none\n%s", i, warnings, got, logs)
				}
				if tt.warned && !strings.Contains(logs.String(), "sslmode") {
					t.Errorf("the warning does not say what to set:\n%s", logs)
				}
			}
		})
	}
}

// Under sslmode=prefer (pgx's default) against a server without TLS, pgconn
// joins the server's refusal of TLS with what the plain dial after it met:
// that decides the class. A role over its connection limit (53300) is
// transient, and Pool retries it, as it would with sslmode=disable.
func TestPreferAgainstAServerWithoutTLSIsClassifiedByThePlainDial(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	ctx := context.Background()
	if err := c.Exec(ctx, `create role limited login password 'limited-pw' connection limit 0`); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"disable", "prefer"} {
		p := newPool(t, withSSLMode(t, c.ConnStringAs("limited", "limited-pw", ""), mode),
			WithBackOff(func() backoff.BackOff { return backoff.WithMaxRetries(&backoff.ZeroBackOff{}, 1) }))
		err := p.Ping(ctx)
		if got := dialer.Classify(err); got != dialer.Transient || !strings.Contains(err.Error(), "53300") {
			t.Errorf("sslmode=%s: %v classified %v, want transient (53300)", mode, err, got)
		}
		if s := p.Dialer().Stats(); s.Retries != 1 {
			t.Errorf("sslmode=%s: %d retries, want the 1 allowed", mode, s.Retries)
		}
	}
}
