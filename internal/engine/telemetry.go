package engine

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/semconv/v1.43.0/dbconv"
	"go.opentelemetry.io/otel/trace"
)

// ScopeName is the instrumentation scope of pgstagger's spans and metrics.
const ScopeName = "github.com/pgstagger/pgstagger"

// Version is pgstagger's version, reported as the instrumentation scope's
// version on its tracer and meters.
const Version = "0.1.0-dev"

// Attribute keys and reasons; package dialer exports and documents each.
const (
	AttrAttempt                = attribute.Key("pgstagger.attempt")
	AttrReason                 = attribute.Key("pgstagger.reason")
	AttrOutcome                = attribute.Key("pgstagger.outcome")
	AttrWait                   = attribute.Key("pgstagger.wait")
	AttrPostmasterResponseTime = attribute.Key("pgstagger.postmaster.response_time")
	AttrDials                  = attribute.Key("pgstagger.dials")
	AttrConnectLimit           = attribute.Key("pgstagger.connect.limit")
	AttrPostmasterBaseline     = attribute.Key("pgstagger.postmaster.baseline")
	AttrTLSRefused             = attribute.Key("pgstagger.tls.refused")

	ReasonAcquire = "acquire"
	ReasonConnect = "connect"
	ReasonWarmUp  = "warm-up"
	ReasonRefill  = "refill"
	ReasonRetry   = "retry"
)

// Span names.
const (
	SpanConnect    = "pgstagger.connect"
	SpanDial       = "pgstagger.dial"
	SpanTLS        = "pgstagger.tls_handshake"
	SpanStartup    = "pgstagger.startup"
	SpanLookup     = "pgstagger.lookup"
	SpanSetup      = "pgstagger.client_setup"
	SpanWaitPrefix = "pgstagger.wait."
)

// WaitKind is a kind of wait the gate imposes.
type WaitKind int

const (
	WaitJitter WaitKind = iota
	WaitBackoff
	WaitSlot
	WaitRate
	WaitPacer
	NumWaitKinds
)

var waitNames = [NumWaitKinds]string{"startup_jitter", "backoff", "max_connecting", "rate_limit", "pacer"}

// DurationBuckets are the explicit histogram boundaries, in seconds, of
// pgstagger's duration metrics: fine below 10ms, where an idle connect
// lands, and reaching 60s, since postmaster stalls last seconds.
var DurationBuckets = []float64{
	0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
	1, 2.5, 5, 10, 15, 30, 60,
}

// telemetry is the Gate's tracer, instruments and logger.
type telemetry struct {
	tracer       trace.Tracer
	createTime   dbconv.ClientConnectionCreateTime
	attempts     metric.Int64Counter
	waitTime     metric.Float64Histogram
	responseTime metric.Float64Histogram
	limit        metric.Float64ObservableGauge
	baseline     metric.Float64ObservableGauge
	serverConns  metric.Int64ObservableGauge
	window       metric.Float64ObservableGauge
	meter        metric.Meter
	pacerReg     metric.Registration // set by observePacer; nil before
	factsReg     metric.Registration // set by observeFacts; nil before
	log          *slog.Logger        // nil: no logging

	// Set by bind.
	poolName  string
	poolAttr  attribute.KeyValue
	poolSet   attribute.Set // {pool name}
	waitSets  [NumWaitKinds]attribute.Set
	outcomes  map[Class]attribute.Set
	spanAttrs []attribute.KeyValue // server and database attributes of connect spans
}

// Meter is pgstagger's meter from mp.
func Meter(mp metric.MeterProvider) metric.Meter {
	return mp.Meter(ScopeName, metric.WithInstrumentationVersion(Version))
}

func newTelemetry(cfg *Config) (*telemetry, error) {
	t := &telemetry{tracer: cfg.TracerProvider.Tracer(ScopeName, trace.WithInstrumentationVersion(Version)), log: cfg.Logger}
	m := Meter(cfg.MeterProvider)
	buckets := metric.WithExplicitBucketBoundaries(DurationBuckets...)
	var err, e error
	t.createTime, e = dbconv.NewClientConnectionCreateTime(m, buckets)
	err = errors.Join(err, e)
	t.attempts, e = m.Int64Counter("pgstagger.connect.attempts", metric.WithUnit("{attempt}"),
		metric.WithDescription("Connection establishment attempts, by outcome (ok, transient, permanent, shed, closed)."))
	err = errors.Join(err, e)
	t.waitTime, e = m.Float64Histogram("pgstagger.connect.wait_time", metric.WithUnit("s"), buckets,
		metric.WithDescription("Time connection establishments waited in pgstagger's gate, by kind of wait."))
	err = errors.Join(err, e)
	t.limit, e = m.Float64ObservableGauge("pgstagger.connect.limit", metric.WithUnit("{connection}"),
		metric.WithDescription("Connects the pacer lets be under way at once, first dial to ready; below 1, the share of the time one is."))
	err = errors.Join(err, e)
	t.baseline, e = m.Float64ObservableGauge("pgstagger.postmaster.baseline", metric.WithUnit("s"),
		metric.WithDescription("The quickest establishment seen, first dial to ready: the pacer's idle baseline."))
	err = errors.Join(err, e)
	t.serverConns, e = m.Int64ObservableGauge("pgstagger.server.connections", metric.WithUnit("{connection}"),
		metric.WithDescription("Connections to a database the server held when the pool last counted them."))
	err = errors.Join(err, e)
	t.window, e = m.Float64ObservableGauge("pgstagger.recovery.window", metric.WithUnit("s"),
		metric.WithDescription("The period of the reconnect cycle after a failure: the startup window, or the window the server's facts call for."))
	err = errors.Join(err, e)
	t.meter = m
	t.responseTime, e = m.Float64Histogram("pgstagger.postmaster.response_time", metric.WithUnit("s"), buckets,
		metric.WithDescription("Time from the client's first byte on a new TCP connection to the server's first byte back."))
	err = errors.Join(err, e)
	if err != nil {
		return nil, err
	}
	return t, nil
}

// bind sets the attributes that depend on the configuration.
func (t *telemetry) bind(poolName string, cfg *pgconn.Config) {
	if poolName == "" {
		poolName = net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))) + "/" + cfg.Database
	}
	t.poolName = poolName
	t.poolAttr = semconv.DBClientConnectionPoolName(poolName)
	t.poolSet = attribute.NewSet(t.poolAttr)
	for k := range NumWaitKinds {
		t.waitSets[k] = attribute.NewSet(t.poolAttr, AttrWait.String(waitNames[k]))
	}
	t.outcomes = map[Class]attribute.Set{}
	for _, c := range []Class{OK, Transient, Permanent, Shed, Closed} {
		t.outcomes[c] = attribute.NewSet(t.poolAttr, AttrOutcome.String(c.String()))
	}
	t.spanAttrs = []attribute.KeyValue{
		semconv.DBSystemNamePostgreSQL,
		semconv.ServerAddress(cfg.Host),
		semconv.ServerPort(int(cfg.Port)),
		semconv.DBNamespace(cfg.Database),
		t.poolAttr,
	}
}

// observePacer reports p's limit and baseline with the pool attribute;
// call it once bind has run.
func (t *telemetry) observePacer(p *pacer) error {
	set := metric.WithAttributeSet(t.poolSet)
	var err error
	t.pacerReg, err = t.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := p.state()
		o.ObserveFloat64(t.limit, st.limit, set)
		if st.baseline > 0 {
			o.ObserveFloat64(t.baseline, st.baseline.Seconds(), set)
		}
		return nil
	}, t.limit, t.baseline)
	return err
}

// observeFacts reports g's recovery window and, once counted, the server's
// connections, with the pool attribute; call it once bind has run.
func (t *telemetry) observeFacts(g *Gate) error {
	set := metric.WithAttributeSet(t.poolSet)
	var err error
	t.factsReg, err = t.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveFloat64(t.window, g.RecoveryWindow().Seconds(), set)
		if f := g.facts.Load(); f != nil {
			o.ObserveInt64(t.serverConns, int64(f.Held), set)
		}
		return nil
	}, t.window, t.serverConns)
	return err
}

// close stops the observations.
func (t *telemetry) close() {
	for _, r := range []metric.Registration{t.pacerReg, t.factsReg} {
		if r != nil {
			_ = r.Unregister()
		}
	}
}

// errorAttrs describes a failed attempt by the error.type and
// db.response.status_code conventions.
func errorAttrs(err error) []attribute.KeyValue {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return []attribute.KeyValue{semconv.ErrorTypeKey.String(pgErr.Code), semconv.DBResponseStatusCode(pgErr.Code)}
	}
	return []attribute.KeyValue{semconv.ErrorTypeKey.String(errorType(err))}
}

// errorType names a failure that has no SQLSTATE.
func errorType(err error) string {
	switch Classify(err) {
	case Shed:
		return "shed"
	case Closed:
		return "closed"
	}
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno) && errno == syscall.ECONNREFUSED:
		return "connection_refused"
	case errors.As(err, &errno) && errno == syscall.ECONNRESET:
		return "connection_reset"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "unexpected_eof"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return semconv.ErrorTypeOther.Value.AsString()
}

func nanos(n int64) time.Time { return time.Unix(0, n) }

// emitDial adds the spans of one dial, its TLS handshake and its startup to
// the connect span, with the times recorded, and records the postmaster's
// response time. end is when the establishment ended.
func (t *telemetry) emitDial(ctx context.Context, r *dialRecord, end time.Time, recording bool) {
	var rt time.Duration
	if r.conn != nil {
		rt = r.conn.responseTime()
		if rt > 0 {
			t.responseTime.Record(ctx, rt.Seconds(), metric.WithAttributeSet(t.poolSet))
		}
	}
	if !recording {
		return
	}
	attrs := []attribute.KeyValue{semconv.NetworkTransportTCP}
	if host, port, err := net.SplitHostPort(r.addr); err == nil {
		p, _ := strconv.Atoi(port)
		attrs = append(attrs, semconv.NetworkPeerAddress(host), semconv.NetworkPeerPort(p))
	}
	if rt > 0 {
		attrs = append(attrs, AttrPostmasterResponseTime.Float64(rt.Seconds()))
	}
	_, dial := t.tracer.Start(ctx, SpanDial, trace.WithSpanKind(trace.SpanKindClient),
		trace.WithTimestamp(r.start), trace.WithAttributes(attrs...))
	if r.err != nil {
		dial.SetAttributes(errorAttrs(r.err)...)
		dial.SetStatus(codes.Error, r.err.Error())
	}
	dial.End(trace.WithTimestamp(r.end))
	if r.conn == nil {
		return
	}
	// The connection's life during the establishment ends when it was
	// closed (a failed attempt) or when the establishment ended.
	stop := end
	if cl := r.conn.closed.Load(); cl != 0 && nanos(cl).Before(stop) {
		stop = nanos(cl)
	}
	phaseStart := r.end
	if r.conn.sslRequest.Load() {
		tlsEnd := stop
		if nc := r.conn.netConnected.Load(); nc != 0 {
			tlsEnd = nanos(nc)
		}
		_, tls := t.tracer.Start(ctx, SpanTLS, trace.WithTimestamp(phaseStart))
		if r.conn.tlsRefused() {
			tls.SetAttributes(AttrTLSRefused.Bool(true))
			tls.SetStatus(codes.Error, "server refused TLS")
		}
		tls.End(trace.WithTimestamp(tlsEnd))
		phaseStart = tlsEnd
	}
	if nc := r.conn.netConnected.Load(); nc != 0 {
		_, su := t.tracer.Start(ctx, SpanStartup, trace.WithTimestamp(phaseStart),
			trace.WithAttributes(AttrPostmasterResponseTime.Float64(rt.Seconds())))
		su.End(trace.WithTimestamp(stop))
	}
}

// fellBackToPlain reports whether the server refused TLS on one of dials
// and pgx dialed again after it: sslmode=prefer (pgx's default, also when
// the connection string sets none) against a server without TLS, which
// forks a backend for each of the two.
func fellBackToPlain(dials []*dialRecord) bool {
	for i := 0; i+1 < len(dials); i++ {
		if c := dials[i].conn; c != nil && c.tlsRefused() {
			return true
		}
	}
	return false
}

// endWait records one wait that startWait began: its metric, its span
// under ctx's span, and the Gate's counters.
func (g *Gate) endWait(ctx context.Context, kind WaitKind, start, end time.Time) {
	dur := end.Sub(start)
	g.stats.Waits[kind].add(dur)
	t := g.tel
	if t.waitTime.Enabled(ctx) {
		t.waitTime.Record(ctx, dur.Seconds(), metric.WithAttributeSet(t.waitSets[kind]))
	}
	if trace.SpanFromContext(ctx).IsRecording() {
		_, s := t.tracer.Start(ctx, SpanWaitPrefix+waitNames[kind], trace.WithTimestamp(start),
			trace.WithAttributes(AttrWait.String(waitNames[kind])))
		s.End(trace.WithTimestamp(end))
	}
}

// startConnect starts e's connect span: a child of the caller's span, or,
// for a pool's background work, the root of a trace of its own linked to
// whatever span created the pool.
func (t *telemetry) startConnect(ctx context.Context, e *establishment) (context.Context, trace.Span) {
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindClient),
		trace.WithTimestamp(e.start),
		trace.WithAttributes(t.spanAttrs...),
		trace.WithAttributes(AttrAttempt.Int(e.attempt), AttrReason.String(e.reason)),
	}
	if e.reason == ReasonWarmUp || e.reason == ReasonRefill {
		opts = append(opts, trace.WithNewRoot())
		if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
			opts = append(opts, trace.WithLinks(trace.Link{SpanContext: sc}))
		}
	}
	return t.tracer.Start(ctx, SpanConnect, opts...)
}

// report emits e's spans, metrics and log line.
func (g *Gate) report(e *establishment, err error, class Class, now time.Time) {
	t := g.tel
	ctx := e.ctx
	e.mu.Lock()
	dials := e.dials
	e.mu.Unlock()
	recording := e.span.IsRecording()
	if ns := e.netStart.Load(); recording && ns != 0 && e.admitErr == nil {
		// pgx's own work before the network: building the connection's
		// type map, checking the configuration.
		_, s := t.tracer.Start(ctx, SpanSetup, trace.WithTimestamp(e.admitted))
		s.End(trace.WithTimestamp(nanos(ns)))
	}
	for _, r := range dials {
		t.emitDial(ctx, r, now, recording)
	}
	plain := fellBackToPlain(dials)
	if plain {
		g.stats.PlainAfterTLSRefused.Add(1)
		if recording {
			e.span.SetAttributes(AttrTLSRefused.Bool(true))
		}
		if t.log != nil && g.plainWarned.CompareAndSwap(false, true) {
			t.log.LogAttrs(ctx, slog.LevelWarn, "pgstagger: the server refused TLS and pgx dialed again in plain text "+
				"(sslmode=prefer, pgx's default): each connection costs the postmaster two forks; set sslmode=disable, "+
				"or require TLS on the server and sslmode=verify-full",
				slog.String(string(t.poolAttr.Key), t.poolName))
		}
	}
	t.attempts.Add(ctx, 1, metric.WithAttributeSet(t.outcomes[class]))
	if class == OK {
		t.createTime.RecordSet(ctx, now.Sub(e.start).Seconds(), t.poolSet)
	}
	if recording {
		e.span.SetAttributes(AttrDials.Int(len(dials)))
		if g.pacer != nil {
			st := g.pacer.state()
			e.span.SetAttributes(AttrConnectLimit.Float64(st.limit))
			if st.baseline > 0 {
				e.span.SetAttributes(AttrPostmasterBaseline.Float64(st.baseline.Seconds()))
			}
		}
		if c := e.current(); c != nil && c.responseTime() > 0 {
			e.span.SetAttributes(AttrPostmasterResponseTime.Float64(c.responseTime().Seconds()))
		}
		if err != nil {
			e.span.SetAttributes(errorAttrs(err)...)
			e.span.SetAttributes(AttrOutcome.String(class.String()))
			e.span.SetStatus(codes.Error, err.Error())
		}
	}
	e.span.End(trace.WithTimestamp(now))
	if t.log != nil && err != nil {
		level, msg := slog.LevelWarn, "pgstagger: connect failed"
		switch class {
		case Permanent:
			level = slog.LevelError
		case Shed:
			level, msg = slog.LevelInfo, "pgstagger: connect shed"
		case Closed:
			level, msg = slog.LevelInfo, "pgstagger: connect ended by Close"
		}
		t.log.LogAttrs(ctx, level, msg,
			slog.String(string(t.poolAttr.Key), t.poolName),
			slog.String(string(AttrReason), e.reason),
			slog.Int(string(AttrAttempt), e.attempt),
			slog.String(string(AttrOutcome), class.String()),
			slog.Any("error", err))
	}
}
