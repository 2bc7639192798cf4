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
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/pgstagger/pgstagger/dialer"
)

// TestPasswordAppearsNowhere runs the success and failure paths with a
// password-authenticated role and searches every span, metric attribute,
// log line and error for the password.
func TestPasswordAppearsNowhere(t *testing.T) {
	const secret, wrong = "Sup3r-s3cret-pw-41", "Wr0ng-pw-guess-93"
	if err := db.Exec(context.Background(), fmt.Sprintf(
		`do $$ begin create role keeper login password '%s'; exception when duplicate_object then null; end $$`, secret)); err != nil {
		t.Fatal(err)
	}
	env := newOtelEnv(t)
	var logs bytes.Buffer
	opts := append(env.opts(), WithStartupJitter(0),
		WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))),
		WithBackOff(func() backoff.BackOff {
			return backoff.WithMaxRetries(backoff.NewConstantBackOff(5*time.Millisecond), 2)
		}))
	var errs []error
	ctx := context.Background()

	// Success.
	good := newPool(t, db.ConnStringAs("keeper", secret, ""), opts...)
	if err := good.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	// Authentication failure.
	bad := newPool(t, db.ConnStringAs("keeper", wrong, ""), opts...)
	errs = append(errs, bad.Ping(ctx))
	// Server not there: refused, retried, given up.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := strings.Replace(db.ConnStringAs("keeper", secret, ""), db.Addr(), l.Addr().String(), 1)
	l.Close()
	gone := newPool(t, down, opts...)
	errs = append(errs, gone.Ping(ctx))
	// Shed before touching the server.
	shed := newPool(t, db.ConnStringAs("keeper", secret, ""), append(opts, WithStartupJitter(time.Hour),
		WithDialerOptions(dialer.WithRand(func() float64 { return 0.5 })))...)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	errs = append(errs, shed.Ping(sctx))
	cancel()
	// A bad option next to a password in the connection string.
	_, err = New(ctx, db.ConnStringAs("keeper", secret, "", "pool_max_conns=none"))
	errs = append(errs, err)

	var haystack []string
	for _, e := range errs {
		if e == nil {
			t.Fatalf("a failure path succeeded")
		}
		haystack = append(haystack, e.Error())
	}
	if dialer.Classify(errs[0]) != dialer.Permanent || dialer.Classify(errs[1]) != dialer.Transient || dialer.Classify(errs[2]) != dialer.Shed {
		t.Errorf("failure paths not as intended: %v", errs)
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
	if err := env.Reader.Collect(ctx, &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			haystack = append(haystack, metricAttrStrings(m)...)
		}
	}
	haystack = append(haystack, logs.String())
	if !strings.Contains(logs.String(), "28P01") || !strings.Contains(logs.String(), "retrying") {
		t.Errorf("the failure paths were not logged:\n%s", logs.String())
	}
	for _, needle := range []string{secret, wrong, url.QueryEscape(secret), url.QueryEscape(wrong)} {
		for _, h := range haystack {
			if strings.Contains(h, needle) {
				t.Errorf("a password appears in %q", h)
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
