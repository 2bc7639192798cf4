package pool

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstagger/pgstagger/dialer"
)

// FuzzNew creates pools from arbitrary connection strings, built as prefix +
// password + suffix so that the password's place is known: New never
// panics, rejects bad input with an error matching dialer.ErrInvalidOption,
// and never puts the password in the error. A pool it returns is closed at
// once; its startup delay of an hour keeps it from dialing anything.
func FuzzNew(f *testing.F) {
	for _, s := range [][3]string{
		{"postgres://app:", "s3cr3t-pw", "@127.0.0.1:1/db?pool_max_conns=4"},
		{"host=127.0.0.1 port=1 user=app password=", "s3cr3t-pw", " pool_max_conns=0"},
		{"postgres://app:", "s3cr3t-pw", "@127.0.0.1:99999/db"},
		{"postgres://app:", "s3cr3t-pw", "@[::1/db"},
		{"host=h password=", "s3cr3t-pw", " pool_min_conns=5 pool_max_conns=2"},
		{"host=h password=", "s3cr3t-pw", " sslmode=bogus"},
		{"host=h password='", "s3cr3t 'pw\\", "' pool_max_conn_lifetime=-1s"},
		{"postgres://app:", "s3cr3t-pw", "@h/db?connect_timeout=abc"},
		{"postgres://app:", "s3cr3t%20pw", "@a,b:5433/db?target_session_attrs=read-write"},
		{"postgres://app:", "s3cr3t-pw", "@h/db?pool_max_conn_lifetime_jitter=-5s"},
		{"", "", ""},
	} {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, prefix, password, suffix string) {
		connString := prefix + password + suffix
		p, err := New(context.Background(), connString, WithStartupJitter(time.Hour))
		if err == nil {
			p.Close()
			return
		}
		if !errors.Is(err, dialer.ErrInvalidOption) || dialer.Classify(err) != dialer.Permanent {
			t.Fatalf("New(%q): err = %v (%v), want a permanent ErrInvalidOption", connString, err, dialer.Classify(err))
		}
		if pw := passwordOf(connString); len(pw) >= 4 && strings.Contains(err.Error(), pw) {
			t.Fatalf("New(%q): error leaks the password %q: %v", connString, pw, err)
		}
	})
}

// passwordOf is the password connString carries, as far as it can be told
// (a connection string too broken to parse may carry none that is
// recognisable).
func passwordOf(connString string) string {
	if cfg, err := pgconn.ParseConfig(connString); err == nil {
		return cfg.Password
	}
	if u, err := url.Parse(connString); err == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok {
			return pw
		}
	}
	if i := strings.Index(connString, "password="); i >= 0 {
		pw, _, _ := strings.Cut(strings.TrimPrefix(connString[i+len("password="):], "'"), " ")
		return strings.TrimSuffix(pw, "'")
	}
	return ""
}
