package dialer

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync/atomic"
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

// Attributes pgstagger adds to spans, metrics and log lines beside the
// OpenTelemetry semantic conventions for database clients (no convention
// covers them).
const (
	// AttrAttempt is the attempt number of an establishment within its
	// retry loop, from 1.
	AttrAttempt = attribute.Key("pgstagger.attempt")
	// AttrReason is why a connection was established: one of the Reason
	// constants.
	AttrReason = attribute.Key("pgstagger.reason")
	// AttrOutcome is the [Class] of an attempt's result, as a string.
	AttrOutcome = attribute.Key("pgstagger.outcome")
	// AttrWait is the kind of wait of a wait span or the
	// pgstagger.connect.wait_time metric: startup_jitter, backoff,
	// max_connecting or rate_limit.
	AttrWait = attribute.Key("pgstagger.wait")
	// AttrPostmasterResponseTime is the time, in seconds, from the first
	// byte the client sent on a TCP connection (SSLRequest or
	// StartupMessage) to the first byte the server sent back: how long the
	// postmaster took to accept and fork a backend that answered.
	AttrPostmasterResponseTime = attribute.Key("pgstagger.postmaster.response_time")
	// AttrDials is how many TCP connections an establishment opened.
	AttrDials = attribute.Key("pgstagger.dials")
)

// Reasons for establishing a connection (the [AttrReason] attribute).
const (
	ReasonAcquire = "acquire" // a pool's caller needed a connection
	ReasonConnect = "connect" // a direct connect (Connect, or a config with the Dialer installed)
	ReasonWarmUp  = "warm-up" // a new pool filling MinConns/MinIdleConns
	ReasonRefill  = "refill"  // a pool's health check restoring MinConns/MinIdleConns
	ReasonRetry   = "retry"   // a retry loop's later attempt
)

// Span names.
const (
	spanConnect   = "pgstagger.connect"
	spanDial      = "pgstagger.dial"
	spanTLS       = "pgstagger.tls_handshake"
	spanStartup   = "pgstagger.startup"
	spanLookup    = "pgstagger.lookup"
	spanSetup     = "pgstagger.client_setup"
	spanWaitPrefx = "pgstagger.wait."
)

// waitKind is a kind of wait the gate imposes.
type waitKind int

const (
	waitJitter waitKind = iota
	waitBackoff
	waitSlot
	waitRate
	numWaitKinds
)

var waitNames = [numWaitKinds]string{"startup_jitter", "backoff", "max_connecting", "rate_limit"}

// DurationBuckets are the explicit histogram boundaries, in seconds, of
// pgstagger's duration metrics: fine below 10ms, where an idle connect
// lands, and reaching 60s, since postmaster stalls last seconds.
var DurationBuckets = []float64{
	0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
	1, 2.5, 5, 10, 15, 30, 60,
}

// telemetry is the Dialer's tracer, instruments and logger.
type telemetry struct {
	tracer       trace.Tracer
	createTime   dbconv.ClientConnectionCreateTime
	attempts     metric.Int64Counter
	waitTime     metric.Float64Histogram
	responseTime metric.Float64Histogram
	log          *slog.Logger // nil: no logging

	// Set by bind.
	poolName  string
	poolAttr  attribute.KeyValue
	poolSet   attribute.Set // {pool name}
	waitSets  [numWaitKinds]attribute.Set
	outcomes  map[Class]attribute.Set
	spanAttrs []attribute.KeyValue // server and database attributes of connect spans
}

func newTelemetry(cfg *config) (*telemetry, error) {
	t := &telemetry{tracer: cfg.tracerProvider.Tracer(ScopeName), log: cfg.logger}
	m := cfg.meterProvider.Meter(ScopeName)
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
	for k := range numWaitKinds {
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

// tracedConn is a TCP connection of an establishment. It records when the
// client first wrote and the server first answered, whether the first write
// was an SSLRequest and how the server answered it, whether the server
// dropped the connection before answering, and when the connection was
// closed; it adds nothing else to reads and writes.
type tracedConn struct {
	net.Conn
	firstWrite   atomic.Int64 // unix nanoseconds
	firstRead    atomic.Int64
	firstByte    atomic.Int32 // first byte the server sent, +1 (0: none yet)
	sslRequest   atomic.Bool
	unanswered   atomic.Bool  // reset or closed by the server before its first byte
	netConnected atomic.Int64 // when pgconn finished TLS (AfterNetConnect)
	closed       atomic.Int64
}

// sslRequestCode is the protocol's SSLRequest: length 8, code 80877103.
var sslRequestCode = [8]byte{0, 0, 0, 8, 4, 210, 22, 47}

func (c *tracedConn) Write(b []byte) (int, error) {
	if c.firstWrite.Load() == 0 && c.firstWrite.CompareAndSwap(0, time.Now().UnixNano()) {
		c.sslRequest.Store(len(b) >= 8 && [8]byte(b[:8]) == sslRequestCode)
	}
	return c.Conn.Write(b)
}

func (c *tracedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if c.firstRead.Load() == 0 {
		switch {
		case n > 0:
			if c.firstRead.CompareAndSwap(0, time.Now().UnixNano()) {
				c.firstByte.Store(int32(b[0]) + 1)
			}
		case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
			c.unanswered.Store(true)
		}
	}
	return n, err
}

func (c *tracedConn) Close() error {
	c.closed.CompareAndSwap(0, time.Now().UnixNano())
	return c.Conn.Close()
}

// dropped reports whether the server reset or closed the connection without
// sending a byte: nothing was forked for it.
func (c *tracedConn) dropped() bool {
	return c.unanswered.Load() && c.firstRead.Load() == 0
}

// responseTime is the postmaster's response time, or 0 if unknown.
func (c *tracedConn) responseTime() time.Duration {
	w, r := c.firstWrite.Load(), c.firstRead.Load()
	if w == 0 || r == 0 || r < w {
		return 0
	}
	return time.Duration(r - w)
}

// dialRecord is one TCP dial of an establishment. Its establishment's mu
// guards refunded once the dial is recorded.
type dialRecord struct {
	network, addr string
	start, end    time.Time
	err           error
	conn          *tracedConn // nil if the dial failed
	refund        func()      // gives the dial's token back
	refunded      bool
}

// giveBack returns r's token to the bucket, once.
func (r *dialRecord) giveBack(d *Dialer) {
	if r.refunded {
		return
	}
	r.refunded = true
	r.refund()
	d.stats.refunds.Add(1)
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
	_, dial := t.tracer.Start(ctx, spanDial, trace.WithSpanKind(trace.SpanKindClient),
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
		_, tls := t.tracer.Start(ctx, spanTLS, trace.WithTimestamp(phaseStart))
		if b := r.conn.firstByte.Load(); b == 'N'+1 {
			tls.SetAttributes(attribute.Bool("pgstagger.tls.refused", true))
			tls.SetStatus(codes.Error, "server refused TLS")
		}
		tls.End(trace.WithTimestamp(tlsEnd))
		phaseStart = tlsEnd
	}
	if nc := r.conn.netConnected.Load(); nc != 0 {
		_, su := t.tracer.Start(ctx, spanStartup, trace.WithTimestamp(phaseStart),
			trace.WithAttributes(AttrPostmasterResponseTime.Float64(rt.Seconds())))
		su.End(trace.WithTimestamp(stop))
	}
}

// emitWait records one wait: its metric, its span under ctx's span, and the
// Dialer's counters.
func (d *Dialer) emitWait(ctx context.Context, kind waitKind, start, end time.Time) {
	dur := end.Sub(start)
	d.stats.waits[kind].add(dur)
	t := d.tel
	if t.waitTime.Enabled(ctx) {
		t.waitTime.Record(ctx, dur.Seconds(), metric.WithAttributeSet(t.waitSets[kind]))
	}
	if trace.SpanFromContext(ctx).IsRecording() {
		_, s := t.tracer.Start(ctx, spanWaitPrefx+waitNames[kind], trace.WithTimestamp(start),
			trace.WithAttributes(AttrWait.String(waitNames[kind])))
		s.End(trace.WithTimestamp(end))
	}
}
