package main

import (
	"context"
	"strings"
	"testing"

	"github.com/exaring/otelpgx"
	"github.com/jackc/pgx/v5/pgxpool"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pgstagger/pgstagger/internal/testdb"
	"github.com/pgstagger/pgstagger/pool"
)

// otelpgx's query tracer, set as the configuration's tracer, works beside
// pgstagger's connect spans: a request's acquire, connect and query spans
// all land in the request's trace, under its span.
func TestOtelpgxQuerySpansAndConnectSpansShareTheCallersTrace(t *testing.T) {
	c, err := testdb.Start(testdb.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	ctx := context.Background()

	cfg, err := pgxpool.ParseConfig(c.ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	cfg.ConnConfig.Tracer = otelpgx.NewTracer(otelpgx.WithTracerProvider(tp))
	p, err := pool.NewWithConfig(ctx, cfg, pool.WithTracerProvider(tp), pool.WithStartupJitter(0))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	rctx, request := tp.Tracer("test").Start(ctx, "handle request")
	var n int
	err = p.QueryRow(rctx, "select 1").Scan(&n)
	request.End()
	if err != nil {
		t.Fatal(err)
	}

	spans := rec.Ended()
	byID := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		byID[s.SpanContext().SpanID().String()] = s
	}
	under := func(s sdktrace.ReadOnlySpan) bool {
		for p, ok := s, true; ok; p, ok = byID[p.Parent().SpanID().String()] {
			if p.Parent().SpanID() == request.SpanContext().SpanID() {
				return true
			}
		}
		return false
	}
	found := map[string]int{}
	for _, s := range spans {
		if s.SpanContext().SpanID() == request.SpanContext().SpanID() {
			continue
		}
		if s.SpanContext().TraceID() != request.SpanContext().TraceID() || !under(s) {
			t.Errorf("span %q is not under the request's span (parent %v)", s.Name(), s.Parent().SpanID())
			continue
		}
		found[s.Name()]++
	}
	for _, name := range []string{"pool.acquire", "pgstagger.connect", "pgstagger.lookup", "pgstagger.dial", "pgstagger.startup", "connect", "SELECT"} {
		if found[name] == 0 {
			t.Errorf("no %q span under the request's span; got %v", name, found)
		}
	}
	// pgstagger's phases are children of its connect span, whatever
	// otelpgx put in the context; otelpgx's connect span is one too, so
	// that each tracer ended its own span.
	for _, s := range spans {
		parent, ok := byID[s.Parent().SpanID().String()]
		if name := s.Name(); strings.HasPrefix(name, "pgstagger.") && name != "pgstagger.connect" || name == "connect" {
			if !ok || parent.Name() != "pgstagger.connect" {
				t.Errorf("span %q is not a child of pgstagger.connect", name)
			}
		}
	}
}
