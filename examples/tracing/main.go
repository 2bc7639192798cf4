// Command tracing shows every connection a pgstagger pool makes as an
// OpenTelemetry trace. It starts a throwaway PostgreSQL cluster (or uses
// -url), builds a pool that warms up two connections in the background and
// serves a burst of requests, and prints the span trees it recorded. With
// OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set,
// it also exports the spans and the metrics over OTLP/gRPC, configured by
// the standard OTEL_EXPORTER_OTLP_* variables, to Jaeger or any collector.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/testdb"
	"github.com/pgstagger/pgstagger/pool"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "tracing:", err)
		os.Exit(1)
	}
}

func run() error {
	url := flag.String("url", "", "PostgreSQL connection string; empty starts a throwaway local cluster")
	requests := flag.Int("requests", 4, "concurrent requests in the burst")
	flag.Parse()
	ctx := context.Background()

	if *url == "" {
		c, err := testdb.Start(testdb.Options{})
		if err != nil {
			return err
		}
		defer c.Close()
		// pgx's default sslmode=prefer, against a server without TLS:
		// every connect dials twice, which the trace shows.
		*url = strings.Replace(c.ConnString(""), "sslmode=disable", "sslmode=prefer", 1)
	}

	res := resource.NewSchemaless(semconv.ServiceName("pgstagger-tracing-example"))
	printer := &treePrinter{}
	tpOpts := []sdktrace.TracerProviderOption{sdktrace.WithResource(res), sdktrace.WithSyncer(printer)}
	mpOpts := []sdkmetric.Option{sdkmetric.WithResource(res)}
	if otlpConfigured() {
		texp, err := otlptracegrpc.New(ctx) // reads OTEL_EXPORTER_OTLP_*
		if err != nil {
			return err
		}
		mexp, err := otlpmetricgrpc.New(ctx)
		if err != nil {
			return err
		}
		tpOpts = append(tpOpts, sdktrace.WithBatcher(texp))
		mpOpts = append(mpOpts, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(mexp)))
		fmt.Println("exporting over OTLP/gRPC as configured by OTEL_EXPORTER_OTLP_*")
	}
	tp := sdktrace.NewTracerProvider(tpOpts...)
	mp := sdkmetric.NewMeterProvider(mpOpts...)

	cfg, err := pgxpool.ParseConfig(*url)
	if err != nil {
		return err
	}
	cfg.MinConns, cfg.MaxConns = 2, 8
	p, err := pool.NewWithConfig(ctx, cfg,
		pool.WithTracerProvider(tp), pool.WithMeterProvider(mp),
		pool.WithPoolName("example"),
		pool.WithStartupJitter(300*time.Millisecond),
		pool.WithConnectRate(rate.Limit(20), 2),
	)
	if err != nil {
		return err
	}

	// A burst of requests, each in a span of its own: those that find no
	// idle connection make one, as a child of their span.
	tracer := tp.Tracer("example")
	var wg sync.WaitGroup
	for i := range *requests {
		wg.Go(func() {
			rctx, span := tracer.Start(ctx, fmt.Sprintf("request %d", i+1))
			defer span.End()
			var n int
			if err := p.QueryRow(rctx, "select 1 from pg_sleep(0.05)").Scan(&n); err != nil {
				fmt.Fprintln(os.Stderr, "query:", err)
			}
		})
	}
	wg.Wait()
	// Flush metrics while the pool is open, so its connection counts are
	// in the last export, then close the pool and flush its spans.
	if err := mp.Shutdown(ctx); err != nil {
		return err
	}
	p.Close()
	if err := tp.Shutdown(ctx); err != nil {
		return err
	}
	printer.print(os.Stdout)
	return nil
}

func otlpConfigured() bool {
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// treePrinter keeps every span and prints them as trees.
type treePrinter struct {
	mu    sync.Mutex
	spans []sdktrace.ReadOnlySpan
}

func (t *treePrinter) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.spans = append(t.spans, spans...)
	return nil
}

func (t *treePrinter) Shutdown(context.Context) error { return nil }

func (t *treePrinter) print(w io.Writer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	kids := map[string][]sdktrace.ReadOnlySpan{}
	var roots []sdktrace.ReadOnlySpan
	known := map[string]bool{}
	for _, s := range t.spans {
		known[s.SpanContext().SpanID().String()] = true
	}
	for _, s := range t.spans {
		if p := s.Parent(); p.IsValid() && known[p.SpanID().String()] {
			kids[p.SpanID().String()] = append(kids[p.SpanID().String()], s)
		} else {
			roots = append(roots, s)
		}
	}
	byStart := func(ss []sdktrace.ReadOnlySpan) {
		sort.Slice(ss, func(i, j int) bool { return ss[i].StartTime().Before(ss[j].StartTime()) })
	}
	byStart(roots)
	var walk func(s sdktrace.ReadOnlySpan, prefix, branch string)
	walk = func(s sdktrace.ReadOnlySpan, prefix, branch string) {
		fmt.Fprintf(w, "%s%s%s %s%s\n", prefix, branch, s.Name(), dur(s.EndTime().Sub(s.StartTime())), describe(s))
		cs := kids[s.SpanContext().SpanID().String()]
		byStart(cs)
		next := prefix
		switch branch {
		case "├─ ":
			next += "│  "
		case "└─ ":
			next += "   "
		}
		for i, c := range cs {
			b := "├─ "
			if i == len(cs)-1 {
				b = "└─ "
			}
			walk(c, next, b)
		}
	}
	for _, r := range roots {
		fmt.Fprintln(w)
		walk(r, "", "")
	}
}

func dur(d time.Duration) string {
	return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
}

// describe picks the attributes worth reading in a tree.
func describe(s sdktrace.ReadOnlySpan) string {
	show := map[attribute.Key]bool{
		dialer.AttrReason: true, dialer.AttrAttempt: true, dialer.AttrDials: true,
		dialer.AttrPostmasterResponseTime: true, semconv.NetworkPeerPortKey: true,
		semconv.ErrorTypeKey: true, "pgstagger.tls.refused": true,
	}
	var parts []string
	for _, a := range s.Attributes() {
		if !show[a.Key] {
			continue
		}
		v := a.Value.String()
		if a.Key == dialer.AttrPostmasterResponseTime {
			v = dur(time.Duration(a.Value.AsFloat64() * float64(time.Second)))
		}
		parts = append(parts, string(a.Key)+"="+v)
	}
	if !s.Parent().IsValid() && len(s.Links()) > 0 {
		parts = append(parts, "linked")
	}
	if len(parts) == 0 {
		return ""
	}
	sort.Strings(parts)
	return "  [" + strings.Join(parts, " ") + "]"
}
