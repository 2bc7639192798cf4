package pool

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/multitracer"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/semconv/v1.43.0/dbconv"

	"github.com/pgstagger/pgstagger/internal/engine"
)

// poolMetrics reports the pool by the semantic conventions for database
// client connections. Counts come from pgxpool's statistics when metrics are
// collected; acquire-path measurements come from pgxpool's acquire and
// release tracer hooks, installed only when the instruments are enabled as
// the pool is created, so that a pool without metrics pays nothing per
// Acquire.
type poolMetrics struct {
	meter          metric.Meter
	name           string
	set            attribute.Set // {pool name}
	acquireMetrics bool          // the acquire-path hooks are installed

	waitTime dbconv.ClientConnectionWaitTime
	useTime  dbconv.ClientConnectionUseTime
	timeouts dbconv.ClientConnectionTimeouts

	count      dbconv.ClientConnectionCountObservable
	max        dbconv.ClientConnectionMaxObservable
	idleMax    dbconv.ClientConnectionIdleMaxObservable
	idleMin    dbconv.ClientConnectionIdleMinObservable
	pendingReq dbconv.ClientConnectionPendingRequestsObservable

	pending atomic.Int64 // acquires in progress
	reg     metric.Registration
}

// newPoolMetrics creates the pool's instruments. It returns the tracer to
// join to the configuration's, or nil when acquire-path metrics are off.
// [poolMetrics.observe] starts reporting counts once the pool exists.
func newPoolMetrics(mp metric.MeterProvider, name string) (*poolMetrics, pgx.QueryTracer, error) {
	m := engine.Meter(mp)
	buckets := metric.WithExplicitBucketBoundaries(engine.DurationBuckets...)
	pm := &poolMetrics{meter: m, name: name, set: attribute.NewSet(semconv.DBClientConnectionPoolName(name))}
	var errs []error
	add := func(err error) { errs = append(errs, err) }
	var err error
	pm.waitTime, err = dbconv.NewClientConnectionWaitTime(m, buckets)
	add(err)
	pm.useTime, err = dbconv.NewClientConnectionUseTime(m, buckets)
	add(err)
	pm.timeouts, err = dbconv.NewClientConnectionTimeouts(m)
	add(err)
	pm.count, err = dbconv.NewClientConnectionCountObservable(m)
	add(err)
	pm.max, err = dbconv.NewClientConnectionMaxObservable(m)
	add(err)
	pm.idleMax, err = dbconv.NewClientConnectionIdleMaxObservable(m)
	add(err)
	pm.idleMin, err = dbconv.NewClientConnectionIdleMinObservable(m)
	add(err)
	pm.pendingReq, err = dbconv.NewClientConnectionPendingRequestsObservable(m)
	add(err)
	if err := errors.Join(errs...); err != nil {
		return nil, nil, err
	}
	pm.acquireMetrics = pm.waitTime.Enabled(context.Background())
	if !pm.acquireMetrics {
		return pm, nil, nil
	}
	return pm, pm, nil
}

// observe registers the callback that reports p's connection counts.
func (pm *poolMetrics) observe(p *pgxpool.Pool, minIdle int32) error {
	nameAttr := semconv.DBClientConnectionPoolName(pm.name)
	idle := metric.WithAttributeSet(attribute.NewSet(nameAttr, pm.count.AttrClientConnectionState(dbconv.ClientConnectionStateIdle)))
	used := metric.WithAttributeSet(attribute.NewSet(nameAttr, pm.count.AttrClientConnectionState(dbconv.ClientConnectionStateUsed)))
	set := metric.WithAttributeSet(pm.set)
	var err error
	pm.reg, err = pm.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := p.Stat()
		o.ObserveInt64(pm.count.Inst(), int64(st.IdleConns()), idle)
		o.ObserveInt64(pm.count.Inst(), int64(st.AcquiredConns()), used)
		o.ObserveInt64(pm.max.Inst(), int64(st.MaxConns()), set)
		// pgxpool keeps idle connections up to MaxConns.
		o.ObserveInt64(pm.idleMax.Inst(), int64(st.MaxConns()), set)
		o.ObserveInt64(pm.idleMin.Inst(), int64(minIdle), set)
		if pm.acquireMetrics {
			o.ObserveInt64(pm.pendingReq.Inst(), pm.pending.Load(), set)
		}
		return nil
	}, pm.count.Inst(), pm.max.Inst(), pm.idleMax.Inst(), pm.idleMin.Inst(), pm.pendingReq.Inst())
	return err
}

// join adds t's pool hooks to cfg's tracer, ahead of it, so that an acquire
// is counted before any tracer of the caller's sees it.
func join(cfg *pgx.ConnConfig, t pgx.QueryTracer) {
	if t == nil {
		return
	}
	cfg.Tracer = multitracer.New(t, cfg.Tracer)
}

func (pm *poolMetrics) close() {
	if pm != nil && pm.reg != nil {
		_ = pm.reg.Unregister()
	}
}

type acquireStartKey struct{}

// connState is what the metrics keep per connection, in its CustomData.
type connState struct{ acquiredAt int64 }

const connStateKey = "pgstagger.metrics"

func (pm *poolMetrics) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	pm.pending.Add(1)
	return context.WithValue(ctx, acquireStartKey{}, time.Now().UnixNano())
}

func (pm *poolMetrics) TraceAcquireEnd(ctx context.Context, _ *pgxpool.Pool, data pgxpool.TraceAcquireEndData) {
	pm.pending.Add(-1)
	now := time.Now().UnixNano()
	if start, ok := ctx.Value(acquireStartKey{}).(int64); ok {
		pm.waitTime.RecordSet(ctx, time.Duration(now-start).Seconds(), pm.set)
	}
	if errors.Is(data.Err, context.DeadlineExceeded) {
		pm.timeouts.AddSet(ctx, 1, pm.set)
	}
	if data.Conn != nil {
		cd := data.Conn.PgConn().CustomData()
		s, ok := cd[connStateKey].(*connState)
		if !ok {
			s = &connState{}
			cd[connStateKey] = s
		}
		s.acquiredAt = now
	}
}

func (pm *poolMetrics) TraceRelease(_ *pgxpool.Pool, data pgxpool.TraceReleaseData) {
	if data.Conn == nil {
		return
	}
	if s, ok := data.Conn.PgConn().CustomData()[connStateKey].(*connState); ok && s.acquiredAt != 0 {
		pm.useTime.RecordSet(context.Background(), time.Duration(time.Now().UnixNano()-s.acquiredAt).Seconds(), pm.set)
		s.acquiredAt = 0
	}
}

// The pool hooks join pgx's tracer chain, which calls every tracer for
// queries; these do nothing.
func (pm *poolMetrics) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (pm *poolMetrics) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
