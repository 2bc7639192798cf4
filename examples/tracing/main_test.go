package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
)

// traceCollector is an OTLP/gRPC collector that implements the trace
// service only, as Jaeger does by default: a metrics export gets
// Unimplemented.
type traceCollector struct {
	collectortrace.UnimplementedTraceServiceServer

	mu    sync.Mutex
	spans []*tracepb.Span // guarded by mu
}

func (c *traceCollector) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.ResourceSpans {
		for _, ss := range rs.ScopeSpans {
			c.spans = append(c.spans, ss.Spans...)
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

func (c *traceCollector) received() []*tracepb.Span {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*tracepb.Span(nil), c.spans...)
}

// startCollector serves a traceCollector on a loopback port.
func startCollector(t *testing.T) (*traceCollector, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	c := &traceCollector{}
	collectortrace.RegisterTraceServiceServer(srv, c)
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	return c, l.Addr().String()
}

// readmeJaegerEnv returns the variables the README's Jaeger command sets,
// as it gives them.
func readmeJaegerEnv(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	// The command is the line (with its continuation) after the docker run
	// of Jaeger.
	_, after, ok := strings.Cut(string(b), "jaegertracing/jaeger")
	if !ok {
		t.Fatal("README.md has no Jaeger command")
	}
	cmd, _, ok := strings.Cut(after, "run ./tracing")
	if !ok {
		t.Fatal("README.md's Jaeger command does not run ./tracing")
	}
	env := map[string]string{}
	for _, f := range strings.Fields(strings.ReplaceAll(cmd, "\\\n", " ")) {
		if k, v, ok := strings.Cut(f, "="); ok && strings.HasPrefix(k, "OTEL_") {
			env[k] = v
		}
	}
	if len(env) == 0 {
		t.Fatalf("README.md's Jaeger command sets no OTEL_ variable: %q", cmd)
	}
	return env
}

func TestTheReadmesJaegerCommandDeliversConnectSpansToATracesOnlyCollector(t *testing.T) {
	col, addr := startCollector(t)
	env := readmeJaegerEnv(t)
	pointed := false
	for k, v := range env {
		if strings.Contains(v, "localhost:4317") {
			v, pointed = strings.ReplaceAll(v, "localhost:4317", addr), true
		}
		t.Setenv(k, v)
	}
	if !pointed {
		t.Fatalf("no variable of the README's command names Jaeger's localhost:4317: %v", env)
	}

	var stdout, stderr bytes.Buffer
	if err := run(context.Background(), []string{"-requests", "4"}, &stdout, &stderr); err != nil {
		t.Fatalf("run: %v\nstderr:\n%s", err, &stderr)
	}
	if !strings.Contains(stderr.String(), "metrics were not exported") || !strings.Contains(stderr.String(), "Unimplemented") {
		t.Errorf("the refused metrics export was not reported; stderr:\n%s", &stderr)
	}

	spans := col.received()
	byID := map[string]*tracepb.Span{}
	kids := map[string][]*tracepb.Span{}
	for _, s := range spans {
		byID[string(s.SpanId)] = s
	}
	for _, s := range spans {
		kids[string(s.ParentSpanId)] = append(kids[string(s.ParentSpanId)], s)
	}
	if want := "exported " + strconv.Itoa(len(spans)) + " spans"; !strings.Contains(stdout.String(), want) {
		t.Errorf("the collector received %d spans; the example's output does not say %q:\n%s", len(spans), want, &stdout)
	}
	var connects, underRequests int
	for _, s := range spans {
		if s.Name != "pgstagger.connect" || closedByPool(s) {
			// A connect still under way when the example closed its
			// pool ends there, before some of its phases.
			continue
		}
		connects++
		names := map[string]bool{}
		for _, k := range kids[string(s.SpanId)] {
			names[k.Name] = true
			if !bytes.Equal(k.TraceId, s.TraceId) {
				t.Errorf("child %s of a connect span is in another trace", k.Name)
			}
		}
		for _, n := range []string{"pgstagger.dial", "pgstagger.tls_handshake", "pgstagger.startup"} {
			if !names[n] {
				t.Errorf("a connect span arrived without its %s child; children: %v; status %v; attrs %v", n, names, s.Status, s.Attributes)
			}
		}
		if p, ok := byID[string(s.ParentSpanId)]; ok && strings.HasPrefix(p.Name, "request ") {
			underRequests++
		}
	}
	if connects == 0 || underRequests == 0 {
		t.Fatalf("the collector received %d connect spans, %d of them under a request's span; want some of each; got %d spans", connects, underRequests, len(spans))
	}
}

// closedByPool reports whether a connect span ended because its pool
// closed (error.type closed).
func closedByPool(s *tracepb.Span) bool {
	for _, kv := range s.Attributes {
		if kv.Key == string(semconv.ErrorTypeKey) && kv.Value.GetStringValue() == "closed" {
			return true
		}
	}
	return false
}

func TestExportersNoneExportsNothingAndSucceeds(t *testing.T) {
	col, addr := startCollector(t)
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"+addr)
	t.Setenv("OTEL_TRACES_EXPORTER", "none")
	t.Setenv("OTEL_METRICS_EXPORTER", "none")
	var stdout, stderr bytes.Buffer
	if err := run(context.Background(), []string{"-requests", "1"}, &stdout, &stderr); err != nil {
		t.Fatalf("run: %v\nstderr:\n%s", err, &stderr)
	}
	if n := len(col.received()); n != 0 {
		t.Errorf("OTEL_TRACES_EXPORTER=none: the collector received %d spans", n)
	}
	if !strings.Contains(stdout.String(), "pgstagger.connect") {
		t.Errorf("the span trees were not printed:\n%s", &stdout)
	}
	if strings.Contains(stdout.String(), "exported") {
		t.Errorf("OTEL_*_EXPORTER=none, but the example says it exported:\n%s", &stdout)
	}
}
