package pool

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/testdb"
)

// TestPasswordAppearsNowhere runs the success and failure paths with a
// password-authenticated role and searches every span, metric attribute,
// log line and error for the password.
func TestPasswordAppearsNowhere(t *testing.T) {
	const secret, wrong = "Sup3r-s3cret-pw-41", "Wr0ng-pw-guess-93"
	if err := db(t).Exec(context.Background(), fmt.Sprintf(
		`do $$ begin create role keeper login password '%s'; exception when duplicate_object then null; end $$`, secret)); err != nil {
		t.Fatal(err)
	}
	env, logs, opts := recordEverything(t)
	var errs []error
	ctx := context.Background()

	// Success.
	good := newPool(t, db(t).ConnStringAs("keeper", secret, ""), opts...)
	if err := good.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	// Authentication failure.
	bad := newPool(t, db(t).ConnStringAs("keeper", wrong, ""), opts...)
	errs = append(errs, bad.Ping(ctx))
	// Server not there: refused, retried, given up.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := strings.Replace(db(t).ConnStringAs("keeper", secret, ""), db(t).Addr(), l.Addr().String(), 1)
	l.Close()
	gone := newPool(t, down, opts...)
	errs = append(errs, gone.Ping(ctx))
	// Shed before touching the server.
	shed := newPool(t, db(t).ConnStringAs("keeper", secret, ""), append(opts, WithStartupJitter(time.Hour),
		WithDialerOptions(dialer.WithRand(func() float64 { return 0.5 })))...)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	errs = append(errs, shed.Ping(sctx))
	cancel()
	// A bad option next to a password in the connection string.
	_, err = New(ctx, db(t).ConnStringAs("keeper", secret, "", "pool_max_conns=none"))
	errs = append(errs, err)

	for _, e := range errs {
		if e == nil {
			t.Fatalf("a failure path succeeded")
		}
	}
	if dialer.Classify(errs[0]) != dialer.Permanent || dialer.Classify(errs[1]) != dialer.Transient || dialer.Classify(errs[2]) != dialer.Shed {
		t.Errorf("failure paths not as intended: %v", errs)
	}
	if !strings.Contains(logs.String(), "28P01") || !strings.Contains(logs.String(), "retrying") {
		t.Errorf("the failure paths were not logged:\n%s", logs.String())
	}
	assertNowhere(t, env, logs, errs, secret, wrong)
}

// recordEverything returns pool options that record every span, metric and
// log line (at debug level), with no startup delay and two quick retries.
func recordEverything(t *testing.T) (otelEnv, *bytes.Buffer, []Option) {
	env := newOtelEnv(t)
	logs := new(bytes.Buffer)
	return env, logs, append(env.opts(), WithStartupJitter(0),
		WithLogger(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))),
		WithBackOff(func() backoff.BackOff {
			return backoff.WithMaxRetries(backoff.NewConstantBackOff(20*time.Millisecond), 2)
		}))
}

// assertNowhere searches errs, every span env recorded (names, status,
// attributes, events, links), every metric attribute and the log for each
// secret, as it is and URL-escaped.
func assertNowhere(t *testing.T, env otelEnv, logs *bytes.Buffer, errs []error, secrets ...string) {
	t.Helper()
	var haystack []string
	for _, e := range errs {
		if e != nil {
			haystack = append(haystack, e.Error())
		}
	}
	for _, s := range env.Spans.Ended() {
		haystack = append(haystack, s.Name(), s.Status().Description)
		haystack = append(haystack, attrStrings(s.Attributes())...)
		for _, ev := range s.Events() {
			haystack = append(haystack, ev.Name)
			haystack = append(haystack, attrStrings(ev.Attributes)...)
		}
		for _, ln := range s.Links() {
			haystack = append(haystack, attrStrings(ln.Attributes)...)
		}
	}
	var rm metricdata.ResourceMetrics
	if err := env.Reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			haystack = append(haystack, metricAttrStrings(m)...)
		}
	}
	haystack = append(haystack, logs.String())
	for _, secret := range secrets {
		for _, needle := range []string{secret, url.QueryEscape(secret)} {
			for _, h := range haystack {
				if strings.Contains(h, needle) {
					t.Errorf("a password appears in %q", h)
				}
			}
		}
	}
}

func attrStrings(kvs []attribute.KeyValue) []string {
	var out []string
	for _, kv := range kvs {
		out = append(out, string(kv.Key)+"="+kv.Value.String())
	}
	return out
}

func metricAttrStrings(m metricdata.Metrics) []string {
	var sets []attribute.Set
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		for _, dp := range d.DataPoints {
			sets = append(sets, dp.Attributes)
		}
	case metricdata.Histogram[float64]:
		for _, dp := range d.DataPoints {
			sets = append(sets, dp.Attributes)
		}
	case metricdata.Gauge[int64]:
		for _, dp := range d.DataPoints {
			sets = append(sets, dp.Attributes)
		}
	}
	var out []string
	for _, s := range sets {
		out = append(out, attrStrings(s.ToSlice())...)
	}
	return out
}

// TestPasswordAppearsNowhereOnFaultPaths runs the fault paths of the fault
// tests against a TLS cluster of its own and searches their errors, spans,
// metric attributes and log lines for the passwords.
func TestPasswordAppearsNowhereOnFaultPaths(t *testing.T) {
	const limitedPW = "L1mited-s3cret-pw-58"
	c := ownCluster(t, testdb.Options{TLS: true, Password: "Cl0ster-s3cret-pw-77"})
	ctx := context.Background()
	if err := c.Exec(ctx, fmt.Sprintf(`create role limited login password '%s' connection limit 0`, limitedPW)); err != nil {
		t.Fatal(err)
	}
	env, logs, opts := recordEverything(t)
	var errs []error
	try := func(name string, class dialer.Class, err error) {
		t.Helper()
		if got := dialer.Classify(err); got != class {
			t.Errorf("%s: err = %v (%v), want %v", name, err, got, class)
		}
		errs = append(errs, err)
	}

	// Unknown database: one attempt.
	try("unknown database", dialer.Permanent, newPool(t, c.ConnString("no_such_db"), opts...).Ping(ctx))
	// Too many connections (53300): retried, then given up.
	try("53300", dialer.Transient, newPool(t, c.ConnStringAs("limited", limitedPW, ""), opts...).Ping(ctx))
	// Wrong CA: one attempt.
	wrongCA, err := c.ConnStringWrongCA(t.TempDir(), "")
	if err != nil {
		t.Fatal(err)
	}
	try("wrong CA", dialer.Permanent, newPool(t, wrongCA, opts...).Ping(ctx))
	// PgBouncer's max_client_conn (08P01): retried, then given up.
	b := startPgBouncer(t, c, testdb.PgBouncerOptions{MaxClientConn: 1})
	holder, err := pgx.Connect(ctx, b.ConnString("", "default_query_exec_mode=exec"))
	if err != nil {
		t.Fatal(err)
	}
	try("max_client_conn", dialer.Transient, newPool(t, b.ConnString("", "default_query_exec_mode=exec"), opts...).Ping(ctx))
	holder.Close(ctx)
	// Close during a wait.
	waiting := newPool(t, c.ConnString(""), append(opts, WithStartupJitter(time.Hour))...)
	closed := make(chan error, 1)
	go func() { closed <- waiting.Ping(ctx) }()
	for waiting.Dialer().Stats().JitterWait.Waiting == 0 {
		time.Sleep(time.Millisecond) // polling: the gate signals nothing on entering a wait
	}
	waiting.Close()
	try("closed", dialer.Closed, <-closed)
	// Multi-host with a dead host first: served by the live one.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	multi := strings.Replace(c.ConnString(""), c.Addr(), l.Addr().String()+","+c.Addr(), 1)
	l.Close()
	mp := newPool(t, multi, opts...)
	for range 3 {
		cn, err := mp.Acquire(ctx)
		if err != nil {
			t.Fatalf("multi-host: %v", err)
		}
		cn.Conn().Close(ctx) // the next Acquire connects again
		cn.Release()
	}
	// Frozen postmaster: connects end at connect_timeout, then at the
	// caller's deadline.
	if err := c.Freeze(); err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	try("frozen", dialer.Transient, newPool(t, c.ConnString("", "connect_timeout=1"), opts...).Ping(fctx))
	cancel()
	if err := c.Thaw(); err != nil {
		t.Fatal(err)
	}
	// Crash: 57P03 while it recovers, retried until it is up.
	recovering := newPool(t, c.ConnString(""), append(opts, WithBackOff(func() backoff.BackOff {
		return backoff.NewConstantBackOff(50 * time.Millisecond)
	}))...)
	started := crash(t, c, 300*time.Millisecond)
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := recovering.Ping(rctx); err != nil {
		t.Fatalf("through the crash: %v", err)
	}
	if err := <-started; err != nil {
		t.Fatal(err)
	}

	for _, code := range []string{"3D000", "53300", "08P01", "57P03", "certificate"} {
		if !strings.Contains(logs.String(), code) {
			t.Errorf("no log line mentions %s: the path did not run as intended", code)
		}
	}
	assertNowhere(t, env, logs, errs, c.Password(), limitedPW)
}
