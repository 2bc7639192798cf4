package pool

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/oteltest"
)

// otelEnv is oteltest's Env with the options that point a Pool at it.
type otelEnv struct{ *oteltest.Env }

func newOtelEnv(t *testing.T) otelEnv { return otelEnv{oteltest.New(t)} }

func (e otelEnv) opts() []Option {
	return []Option{WithTracerProvider(e.TP), WithMeterProvider(e.MP)}
}

func connectSpans(spans []sdktrace.ReadOnlySpan, reason string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range spans {
		if s.Name() != "pgstagger.connect" {
			continue
		}
		for _, a := range s.Attributes() {
			if a.Key == dialer.AttrReason && a.Value.AsString() == reason {
				out = append(out, s)
			}
		}
	}
	return out
}

// connected returns a config whose AfterConnect reports each new connection.
func connected(t *testing.T, params ...string) (*pgxpool.Config, chan struct{}) {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(db(t).ConnString("", params...))
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan struct{}, 100)
	cfg.AfterConnect = func(context.Context, *pgx.Conn) error { ch <- struct{}{}; return nil }
	return cfg, ch
}

func receive(t *testing.T, ch chan struct{}, n int) {
	t.Helper()
	for i := range n {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d of %d connections made", i, n)
		}
	}
}

func TestBackgroundConnectsGetRootSpans(t *testing.T) {
	env := newOtelEnv(t)
	cfg, made := connected(t, "pool_min_conns=2", "pool_max_conns=4")
	cfg.HealthCheckPeriod = 50 * time.Millisecond
	ctx, creator := env.TP.Tracer("test").Start(context.Background(), "service start")
	p, err := NewWithConfig(ctx, cfg, append(env.opts(), fast...)...)
	creator.End()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	receive(t, made, 2) // warm-up
	p.Reset()
	receive(t, made, 2) // refill by the health check

	p.Close()
	// An empty pool must establish a connection for this caller.
	empty := newPool(t, db(t).ConnString(""), append(env.opts(), fast...)...)
	ctx2, caller := env.TP.Tracer("test").Start(context.Background(), "request")
	if err := empty.Ping(ctx2); err != nil {
		t.Fatal(err)
	}
	caller.End()

	spans := env.Spans.Ended()
	warm, refill, acquire := connectSpans(spans, dialer.ReasonWarmUp), connectSpans(spans, dialer.ReasonRefill), connectSpans(spans, dialer.ReasonAcquire)
	if len(warm) != 2 || len(refill) != 2 {
		t.Fatalf("%d warm-up and %d refill connect spans, want 2 each", len(warm), len(refill))
	}
	for _, s := range append(warm, refill...) {
		if s.Parent().IsValid() {
			t.Errorf("background connect span has a parent %v", s.Parent().SpanID())
		}
	}
	for _, s := range warm {
		if len(s.Links()) != 1 || s.Links()[0].SpanContext.SpanID() != creator.SpanContext().SpanID() {
			t.Errorf("warm-up span not linked to the pool's creator: %v", s.Links())
		}
	}
	if len(acquire) != 1 || acquire[0].Parent().SpanID() != caller.SpanContext().SpanID() {
		t.Errorf("%d acquire connect spans; want 1, a child of the caller's span", len(acquire))
	}
}

func point(m metricdata.Metrics, attrs ...attribute.KeyValue) (int64, bool) {
	want := attribute.NewSet(attrs...)
	v, _, ok := oteltest.Point(m, func(s attribute.Set) bool { return s.Equals(&want) })
	return v, ok
}

func TestPoolMetricsFollowTheConventions(t *testing.T) {
	env := newOtelEnv(t)
	cfg, made := connected(t, "pool_max_conns=2", "pool_min_idle_conns=1")
	acquiring := make(chan struct{}, 10)
	cfg.ConnConfig.Tracer = &acquireSignal{ch: acquiring}
	p, err := NewWithConfig(context.Background(), cfg, append(env.opts(), WithPoolName("billing"))...)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	receive(t, made, 1)
	name := semconv.DBClientConnectionPoolName("billing")
	ctx := context.Background()
	c1, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	<-acquiring
	<-acquiring
	// The pool is full: a caller with a short deadline times out.
	tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = p.Acquire(tctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("acquire from a full pool: %v", err)
	}
	<-acquiring
	// And one waits while we look.
	waiting := make(chan error, 1)
	go func() {
		c, err := p.Acquire(ctx)
		if err == nil {
			c.Release()
		}
		waiting <- err
	}()
	<-acquiring // the pool's hooks run first: the waiter is counted now
	m := env.Metrics(t)
	check := func(metricName string, want int64, attrs ...attribute.KeyValue) {
		t.Helper()
		if got, ok := point(m[metricName], attrs...); !ok || got != want {
			t.Errorf("%s%v = %d (present %v), want %d", metricName, attrs, got, ok, want)
		}
	}
	check("db.client.connection.pending_requests", 1, name)
	units := map[string]string{
		"db.client.connection.count":            "{connection}",
		"db.client.connection.max":              "{connection}",
		"db.client.connection.idle.max":         "{connection}",
		"db.client.connection.idle.min":         "{connection}",
		"db.client.connection.pending_requests": "{request}",
		"db.client.connection.timeouts":         "{timeout}",
		"db.client.connection.wait_time":        "s",
		"db.client.connection.create_time":      "s",
	}
	for n, u := range units {
		if got, ok := m[n]; !ok || got.Unit != u {
			t.Errorf("metric %s: present %v, unit %q, want %q", n, ok, got.Unit, u)
		}
	}
	used := semconv.DBClientConnectionStateUsed
	check("db.client.connection.count", 2, name, used)
	check("db.client.connection.count", 0, name, semconv.DBClientConnectionStateIdle)
	check("db.client.connection.max", 2, name)
	check("db.client.connection.idle.max", 2, name)
	check("db.client.connection.idle.min", 1, name)
	check("db.client.connection.timeouts", 1, name)
	check("db.client.connection.wait_time", 3, name) // c1, c2 and the timed-out one
	c1.Release()
	if err := <-waiting; err != nil {
		t.Fatal(err)
	}
	c2.Release()
	m = env.Metrics(t)
	check("db.client.connection.use_time", 3, name)
	check("db.client.connection.pending_requests", 0, name)
}

// acquireSignal is a caller's pool tracer that reports each acquire.
type acquireSignal struct{ ch chan struct{} }

func (a *acquireSignal) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}
func (a *acquireSignal) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (a *acquireSignal) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	a.ch <- struct{}{}
	return ctx
}
func (a *acquireSignal) TraceAcquireEnd(context.Context, *pgxpool.Pool, pgxpool.TraceAcquireEndData) {
}
