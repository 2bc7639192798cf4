// Package engine is pgstagger's connection-establishment gate: the startup
// delay, the token bucket, the connecting slots, the recovery after
// failures, per-host backoff, CancelRequest pacing, retries and telemetry.
// Packages dialer and pool are its public fronts; see dialer's
// documentation for what each part does and why.
//
// An establishment's life (establishment.go) reads top to bottom:
// [connectHook.TraceConnectStart] calls begin, which takes what the table
// on [establishment] lists and waits in admit; the dial and lookup
// functions (dial.go) refuse at once what admit refused; TraceConnectEnd
// calls end, which releases, learns from the outcome and reports.
package engine

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/multitracer"
	"golang.org/x/time/rate"
)

// Gate is the connection-establishment gate. Installed on a connection
// configuration, it makes every establishment wait for the startup delay,
// the recovery delay after failures and a connecting slot, and every TCP
// connection take a token from the bucket, shedding at once the waits that
// cannot fit the caller's deadline.
//
// A Gate is safe for concurrent use. Close it to end every wait.
type Gate struct {
	cfg *Config
	tel *telemetry

	// Set once by bind, when the Gate is first installed; read only after
	// bound is true (or from an establishment, which bind precedes).
	bindOnce   sync.Once
	bound      atomic.Bool
	plan       Plan
	params     map[string]string // the connection string's fleet parameters
	limiter    *rate.Limiter
	startupEnd time.Time // end of the startup delay
	forPool    bool      // installed on a pool's configuration
	bindErr    error     // why the gate's observed metrics could not be registered

	startupOver atomic.Bool // startupEnd has passed

	slots chan struct{} // connecting slots; a send takes one
	pacer *pacer        // how many establishments may be under way; nil: off

	inflight atomic.Int32 // establishments between begin and end

	// roundTrip is the quickest round trip seen, in nanoseconds (0: none
	// yet): a TCP handshake or a facts query (see LearnRoundTrip).
	roundTrip atomic.Int64

	// connectTime is a moving average of how long successful
	// establishments took once admitted, in nanoseconds (0: none yet).
	connectTime atomic.Int64

	closeCtx context.Context // done once Close is called, with cause ErrClosed
	closeFn  context.CancelCauseFunc

	// recovery is the state after a transient failure, nil while the
	// server is healthy. Read without a lock (the hot path asks whether
	// the gate may wait); replaced only with mu held.
	recovery atomic.Pointer[outage]

	mu     sync.Mutex      // serializes writers of recovery
	policy backoff.BackOff // guarded by mu: the shared backoff of recovery

	// lastFailure is when the latest outage began (unix nanoseconds; 0:
	// none yet), kept after it ends. Written with mu held.
	lastFailure atomic.Int64

	// facts is what the pool last read of the server (nil: none).
	facts atomic.Pointer[ServerFacts]

	// pid is the server's process ID of the newest connection
	// established (0: none yet): see [Gate.recoveryPhase].
	pid atomic.Uint32

	hosts *hostHealth // backed-off hosts of multi-host connection strings

	plainWarned atomic.Bool // the sslmode=prefer warning was logged

	stats Counters
}

// outage is the Gate's recovery state after a transient failure. It is
// never modified once published.
type outage struct {
	recoverUntil time.Time // no new establishment touches the server before this
	failedAt     time.Time // when the failure that set recoverUntil was recorded
}

// New returns a Gate made of cfg. It does no I/O.
func New(cfg *Config) (*Gate, error) {
	tel, err := newTelemetry(cfg)
	if err != nil {
		return nil, err
	}
	g := &Gate{
		cfg:    cfg,
		tel:    tel,
		slots:  make(chan struct{}, cfg.MaxConnecting),
		policy: cfg.NewBackOff(),
		hosts:  newHostHealth(cfg.NewBackOff),
	}
	if cfg.ResponseTarget > 0 {
		g.pacer = newPacer(cfg.ResponseTarget, InitialConnecting, cfg.MaxConnecting, cfg.Rand)
	}
	g.closeCtx, g.closeFn = context.WithCancelCause(context.Background())
	return g, nil
}

// Install makes g gate every connection made with cfg: it wraps cfg's
// DialFunc (or the default one), LookupFunc and OnPgError, and composes g's
// connectHook with cfg.Tracer through pgx's multitracer, the hook first. The first
// configuration g is installed on resolves its [Plan]: warm is how many
// connections the process opens at start, forPool whether cfg is a pool's.
func (g *Gate) Install(cfg *pgx.ConnConfig, warm int, forPool bool) error {
	if cfg == nil {
		return fmt.Errorf("%w: Install(nil)", ErrInvalidOption)
	}
	if Installed(cfg.Tracer) != nil {
		return fmt.Errorf("%w: a pgstagger Dialer is already installed on this configuration", ErrInvalidOption)
	}
	params := takeParams(cfg.RuntimeParams)
	merged, err := g.cfg.withParams(params)
	if err != nil {
		return err
	}
	g.bind(cfg, merged, params, warm, forPool)
	if g.bindErr != nil {
		return g.bindErr
	}
	if params != nil && !maps.Equal(params, g.params) {
		return fmt.Errorf("%w: the fleet parameters of this connection string (%s, %s, %s) differ from those of the configuration the Dialer was first installed on: one Dialer plans one fleet",
			ErrInvalidOption, ParamFleetSize, ParamFleetBudget, ParamFleetMember)
	}
	next := cfg.DialFunc
	if next == nil {
		var nd net.Dialer
		next = nd.DialContext
	}
	cfg.DialFunc = g.dialFunc(next, hostGroup(&cfg.Config))
	lookup := cfg.LookupFunc
	if lookup == nil {
		lookup = net.DefaultResolver.LookupHost
	}
	cfg.LookupFunc = g.lookupFunc(lookup)
	cfg.AfterNetConnect = afterNetConnect(cfg.AfterNetConnect)
	cfg.OnPgError = g.onPgError(cfg.OnPgError)
	hook := &connectHook{g: g}
	if cfg.Tracer == nil {
		cfg.Tracer = hook
	} else {
		// The hook goes first, the caller's tracer last: pgx's multitracer
		// hands every TraceConnectEnd the context the last TraceConnectStart
		// returned, and a tracer such as otelpgx ends the span it finds
		// there. Last, that span is its own; the hook finds its
		// establishment by a context value, wherever it stands.
		cfg.Tracer = multitracer.New(hook, cfg.Tracer)
	}
	return nil
}

// Installed returns the Gate whose connectHook is part of t, or nil.
func Installed(t pgx.QueryTracer) *Gate {
	switch t := t.(type) {
	case *connectHook:
		return t.g
	case *multitracer.Tracer:
		for _, q := range t.QueryTracers {
			if g := Installed(q); g != nil {
				return g
			}
		}
	}
	return nil
}

// bind resolves c, g's Config with the connection string's params, for the
// first configuration g is installed on and starts the startup delay.
func (g *Gate) bind(cfg *pgx.ConnConfig, c *Config, params map[string]string, warm int, forPool bool) {
	g.bindOnce.Do(func() {
		g.forPool = forPool
		g.params = params
		g.tel.bind(g.cfg.PoolName, &cfg.Config)
		g.plan = c.Plan(warm, DialsPerConnect(&cfg.Config), g.cfg.Rand())
		g.limiter = g.cfg.Limiter
		if g.limiter == nil {
			g.limiter = rate.NewLimiter(g.plan.Rate, g.plan.Burst)
			if g.tokenGrid() > 0 {
				// A fleet member's spare connect (see dialer.WithFleet)
				// accrues over its first refill: the fleet's start
				// keeps to its budget.
				g.limiter.AllowN(time.Now(), g.plan.Dials)
			}
		}
		g.startupEnd = time.Now().Add(g.plan.StartupDelay)
		if g.pacer != nil {
			g.bindErr = g.tel.observePacer(g.pacer)
		}
		g.bindErr = errors.Join(g.bindErr, g.tel.observeFacts(g))
		if g.plan.StartupWindow == 0 {
			g.startupOver.Store(true)
		}
		g.bound.Store(true)
	})
}

// Plan returns what g resolved once installed (the zero Plan before).
func (g *Gate) Plan() Plan {
	if !g.bound.Load() {
		return Plan{}
	}
	return g.plan
}

// PoolName is the db.client.connection.pool.name g reports ("" before it is
// installed).
func (g *Gate) PoolName() string {
	if !g.bound.Load() {
		return ""
	}
	return g.tel.poolName
}

// ConnectTime is the moving average of successful establishments' time
// once admitted (0: none yet).
func (g *Gate) ConnectTime() time.Duration { return time.Duration(g.connectTime.Load()) }

// Close ends every wait of g's establishments and retry loops with
// ErrClosed and cancels establishments in flight. Later establishments fail
// with ErrClosed. Close is idempotent.
func (g *Gate) Close() {
	g.closeFn(ErrClosed)
	if g.bound.Load() {
		g.tel.close()
	}
}

// PacerState reports the pacer's limit on establishments under way, its
// baseline, the quickest establishment seen (0 before the first), and
// how often the limit fell; all zero with the pacer off.
func (g *Gate) PacerState() (limit float64, baseline time.Duration, decreases int64) {
	if g.pacer == nil {
		return 0, 0, 0
	}
	st := g.pacer.state()
	return st.limit, st.baseline, st.decreases
}

// CallerContext returns ctx marked so that, when a pool establishes a
// connection for a call made with it, the gate bounds its waits by ctx's
// deadline and cancellation and sheds at once a wait that cannot fit
// (pgxpool establishes connections on a context of its own, which keeps the
// caller's values but not its deadline). While the gate imposes no wait it
// returns ctx itself, so the call costs a few atomic loads on the hot path.
func (g *Gate) CallerContext(ctx context.Context) context.Context {
	if !g.congested() || ctx.Done() == nil {
		return ctx
	}
	return withCaller(ctx, 0)
}

// congested reports whether a new establishment may have to wait.
func (g *Gate) congested() bool {
	if g.inflight.Load() > 0 {
		return true
	}
	if !g.startupOver.Load() && g.bound.Load() {
		if time.Now().Before(g.startupEnd) {
			return true
		}
		g.startupOver.Store(true)
	}
	return g.recovery.Load() != nil
}

// caller is what withCaller puts in a context for the gate.
type caller struct {
	ctx     context.Context
	attempt int // 0 outside a retry loop
}

type callerKey struct{}

func withCaller(ctx context.Context, attempt int) context.Context {
	return context.WithValue(ctx, callerKey{}, &caller{ctx: ctx, attempt: attempt})
}

func callerOf(ctx context.Context) *caller {
	c, _ := ctx.Value(callerKey{}).(*caller)
	return c
}

type warmUpKey struct{}

// WarmUpContext marks ctx, the context given to pgxpool.NewWithConfig, so
// that the establishments of the pool's initial MinConns/MinIdleConns fill
// are reported with reason warm-up, each in a trace of its own linked to
// ctx's span.
func WarmUpContext(ctx context.Context) context.Context {
	return context.WithValue(ctx, warmUpKey{}, true)
}

// reasonFor tells why ctx's establishment happens.
func (g *Gate) reasonFor(ctx context.Context, c *caller) string {
	switch {
	case c != nil && c.attempt > 1:
		return ReasonRetry
	case ctx.Value(warmUpKey{}) != nil:
		return ReasonWarmUp
	case !g.forPool:
		return ReasonConnect
	}
	// pgxpool makes connections for callers on a context of its own,
	// which has no deadline, and background ones (MinConns, MinIdleConns)
	// with a timeout each.
	if _, ok := ctx.Deadline(); ok && c == nil {
		return ReasonRefill
	}
	return ReasonAcquire
}
