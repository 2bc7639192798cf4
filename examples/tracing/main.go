// Command tracing shows every connection a pgstagger pool makes as an
// OpenTelemetry trace. It starts a throwaway PostgreSQL cluster (or uses
// -url), builds a pool that warms up two connections in the background and
// serves a burst of requests, and prints the span trees it recorded. It
// also exports the spans and the metrics as the OpenTelemetry environment
// says (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER, OTEL_EXPORTER_OTLP_*),
// to Jaeger or any collector; see fromEnvironment.
package main

import (
	"cmp"
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
	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel/attribute"
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
	if err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "tracing:", err)
		os.Exit(1)
	}
}

// run is the example; it returns an error, so that the exit code is 1, when
// the pool failed or spans were to be exported and were not. A signal that
// failed to export but the spans (a collector that takes traces only, as
// Jaeger does by default, refuses metrics) is reported on stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("tracing", flag.ContinueOnError)
	flags.SetOutput(stderr)
	url := flags.String("url", "", "PostgreSQL connection string; empty starts a throwaway local cluster")
	requests := flags.Int("requests", 4, "concurrent requests in the burst")
	if err := flags.Parse(args); err != nil {
		return err
	}

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
	spans, reader, err := fromEnvironment(ctx)
	if err != nil {
		return err
	}
	if spans != nil {
		tpOpts = append(tpOpts, sdktrace.WithBatcher(spans))
		fmt.Fprintln(stdout, "exporting spans as OTEL_TRACES_EXPORTER and OTEL_EXPORTER_OTLP_* say")
	}
	if reader != nil {
		mpOpts = append(mpOpts, sdkmetric.WithReader(reader))
		fmt.Fprintln(stdout, "exporting metrics as OTEL_METRICS_EXPORTER and OTEL_EXPORTER_OTLP_* say")
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
				fmt.Fprintln(stderr, "query:", err)
			}
		})
	}
	wg.Wait()
	// Flush metrics while the pool is open, so its connection counts are
	// in the last export; a failure is reported and changes nothing for
	// the spans. Then close the pool and flush its spans.
	if err := mp.Shutdown(ctx); err != nil {
		fmt.Fprintln(stderr, "tracing: metrics were not exported:", err)
	}
	p.Close()
	if err := tp.Shutdown(ctx); err != nil {
		return err
	}
	printer.print(stdout)
	if spans != nil {
		n, err := spans.result()
		if err != nil {
			return fmt.Errorf("spans were not exported: %w", err)
		}
		fmt.Fprintf(stdout, "\nexported %d spans\n", n)
	}
	return nil
}

// fromEnvironment builds the span exporter and the metric reader the
// OpenTelemetry environment asks for, with autoexport: OTEL_TRACES_EXPORTER
// and OTEL_METRICS_EXPORTER (otlp, console, none), OTEL_EXPORTER_OTLP_PROTOCOL
// (http/protobuf by default, or grpc), OTEL_EXPORTER_OTLP_ENDPOINT and the
// other OTEL_EXPORTER_OTLP_* variables. One departure from the
// specification's default: a signal whose exporter variable is unset is
// exported over OTLP only if an OTLP endpoint is set for it, so that the
// example run bare prints its trees and nothing else. nil: not exported.
func fromEnvironment(ctx context.Context) (*delivery, sdkmetric.Reader, error) {
	var spans *delivery
	if wanted("TRACES") {
		exp, err := autoexport.NewSpanExporter(ctx)
		if err != nil {
			return nil, nil, err
		}
		if !autoexport.IsNoneSpanExporter(exp) {
			spans = &delivery{SpanExporter: exp}
		}
	}
	var reader sdkmetric.Reader
	if wanted("METRICS") {
		r, err := autoexport.NewMetricReader(ctx)
		if err != nil {
			return nil, nil, err
		}
		if !autoexport.IsNoneMetricReader(r) {
			reader = r
		}
	}
	return spans, reader, nil
}

// wanted reports whether a signal (TRACES, METRICS) is to be exported: its
// OTEL_<signal>_EXPORTER is set, or an OTLP endpoint for it is.
func wanted(signal string) bool {
	return os.Getenv("OTEL_"+signal+"_EXPORTER") != "" ||
		os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" ||
		os.Getenv("OTEL_EXPORTER_OTLP_"+signal+"_ENDPOINT") != ""
}

// delivery is a span exporter that counts the spans it delivered and keeps
// the first error, since the batch span processor hands export errors to
// otel.Handle and returns none.
type delivery struct {
	sdktrace.SpanExporter

	mu  sync.Mutex
	n   int   // guarded by mu: spans delivered
	err error // guarded by mu: the first export error
}

func (d *delivery) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	err := d.SpanExporter.ExportSpans(ctx, spans)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		d.err = cmp.Or(d.err, err)
		return err
	}
	d.n += len(spans)
	return nil
}

// result is how many spans were delivered, or the first export error.
func (d *delivery) result() (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n, d.err
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
		semconv.ErrorTypeKey: true, dialer.AttrTLSRefused: true,
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
