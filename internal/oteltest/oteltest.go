// Package oteltest gives pgstagger's tests OpenTelemetry SDK providers that
// record everything, and a pgx tracer that counts the hooks pgx calls.
package oteltest

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// Env is an SDK tracer provider recording every span and a meter provider
// read by hand. Both are shut down when the test ends.
type Env struct {
	Spans  *tracetest.SpanRecorder
	TP     *sdktrace.TracerProvider
	Reader *sdkmetric.ManualReader
	MP     *sdkmetric.MeterProvider
}

// New returns an Env for t.
func New(t testing.TB) *Env {
	t.Helper()
	e := &Env{Spans: tracetest.NewSpanRecorder(), Reader: sdkmetric.NewManualReader()}
	e.TP = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(e.Spans))
	e.MP = sdkmetric.NewMeterProvider(sdkmetric.WithReader(e.Reader))
	t.Cleanup(func() {
		_ = e.TP.Shutdown(context.Background())
		_ = e.MP.Shutdown(context.Background())
	})
	return e
}

// Metrics collects every metric recorded so far, by name.
func (e *Env) Metrics(t testing.TB) map[string]metricdata.Metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := e.Reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]metricdata.Metrics{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

// Point finds the data point of m, an int64 sum or a float64 histogram,
// whose attributes match, and returns its value (a histogram's count) and
// its bucket bounds (nil for a sum).
func Point(m metricdata.Metrics, match func(attribute.Set) bool) (value int64, bounds []float64, ok bool) {
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		for _, dp := range d.DataPoints {
			if match(dp.Attributes) {
				return dp.Value, nil, true
			}
		}
	case metricdata.Histogram[float64]:
		for _, dp := range d.DataPoints {
			if match(dp.Attributes) {
				return int64(dp.Count), dp.Bounds, true
			}
		}
	}
	return 0, nil, false
}

// HookTracer counts the connect, query and pool-acquire hooks pgx calls on
// it, for checking that a user's tracer keeps working beside pgstagger's.
// It is safe for concurrent use.
type HookTracer struct {
	Connects, Queries, Acquires atomic.Int32
}

func (h *HookTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	h.Queries.Add(1)
	return ctx
}

func (h *HookTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (h *HookTracer) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	h.Connects.Add(1)
	return ctx
}

func (h *HookTracer) TraceConnectEnd(context.Context, pgx.TraceConnectEndData) {}

func (h *HookTracer) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	h.Acquires.Add(1)
	return ctx
}

func (h *HookTracer) TraceAcquireEnd(context.Context, *pgxpool.Pool, pgxpool.TraceAcquireEndData) {}
