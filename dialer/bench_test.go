package dialer

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"golang.org/x/time/rate"
)

// BenchmarkConnect establishes and closes one connection per iteration:
// plain pgx, through the gate with telemetry off (no-op providers), and
// through the gate with an SDK tracer exporting every span (to a discarding
// exporter, through the batch processor) and an SDK meter provider. The
// ratios between them, not the absolute times, are the result.
func BenchmarkConnect(b *testing.B) {
	ctx := context.Background()
	cfg, err := ParseConfig(db(b).ConnString(""))
	if err != nil {
		b.Fatal(err)
	}
	run := func(connect func() (*pgx.Conn, error)) func(*testing.B) {
		return func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				c, err := connect()
				if err != nil {
					b.Fatal(err)
				}
				c.Close(ctx)
			}
		}
	}
	b.Run("impl=pgx", run(func() (*pgx.Conn, error) { return pgx.ConnectConfig(ctx, cfg) }))

	off, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1),
		WithTracerProvider(noopTracerProvider()), WithMeterProvider(noopMeterProvider()))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("impl=pgstagger/telemetry=off", run(func() (*pgx.Conn, error) { return off.Connect(ctx, cfg) }))

	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	b.Cleanup(func() { _ = tp.Shutdown(ctx); _ = mp.Shutdown(ctx) })
	on, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithTracerProvider(tp), WithMeterProvider(mp))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("impl=pgstagger/telemetry=on", run(func() (*pgx.Conn, error) { return on.Connect(ctx, cfg) }))
}
