package pool

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/testdb"
)

// ownCluster starts a cluster for one test, which may crash, freeze or fill
// it without disturbing the package's shared one.
func ownCluster(t testing.TB, opts testdb.Options) *testdb.Cluster {
	t.Helper()
	c, err := testdb.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// attempts is a pgx tracer that reports the end of each connect attempt,
// with its error, on a channel (pgx requires the query hooks too).
type attempts struct{ ended chan attempt }

type attempt struct {
	at  time.Time
	err error
}

func newAttempts() *attempts { return &attempts{ended: make(chan attempt, 1000)} }

func (a *attempts) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (a *attempts) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (a *attempts) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	return ctx
}

func (a *attempts) TraceConnectEnd(_ context.Context, data pgx.TraceConnectEndData) {
	a.ended <- attempt{time.Now(), data.Err}
}

// next waits for the next attempt to end.
func (a *attempts) next(t *testing.T) attempt {
	t.Helper()
	select {
	case at := <-a.ended:
		return at
	case <-time.After(30 * time.Second):
		t.Fatal("no connect attempt ended within 30s")
		return attempt{}
	}
}

// recordDials makes cfg's dials note when each began; the function it
// returns gives those so far.
func recordDials(cfg *pgxpool.Config) func() []time.Time {
	var (
		mu    sync.Mutex
		dials []time.Time
		nd    net.Dialer
	)
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		dials = append(dials, time.Now())
		mu.Unlock()
		return nd.DialContext(ctx, network, addr)
	}
	return func() []time.Time {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(dials)
	}
}

// sqlstate is err's SQLSTATE, or "".
func sqlstate(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// crash kills c's postmaster and starts it again in the background, with a
// recovery that answers 57P03 for several steps (see
// [testdb.Cluster.SlowRecovery]); the channel gets Start's result.
func crash(t *testing.T, c *testdb.Cluster, step time.Duration) <-chan error {
	t.Helper()
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := c.SlowRecovery(step); err != nil {
		t.Fatal(err)
	}
	started := make(chan error, 1)
	go func() { started <- c.Start() }()
	return started
}

func TestCrashRecoveryIsRetriedThrough57P03(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	cfg, err := pgxpool.ParseConfig(c.ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	seen := newAttempts()
	cfg.ConnConfig.Tracer = seen
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0),
		WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(50 * time.Millisecond) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)

	// Until the server is up again it refuses connections, then answers
	// 57P03 while it recovers.
	started := crash(t, c, 500*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := p.Exec(ctx, "select 1"); err != nil {
		t.Fatalf("Exec through the crash: %v", err)
	}
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	var starting, other int
	for len(seen.ended) > 0 {
		at := seen.next(t)
		switch {
		case at.err == nil:
		case sqlstate(at.err) == "57P03":
			starting++
		case dialer.Classify(at.err) != dialer.Transient:
			t.Errorf("attempt failed with %v, classified %v; want transient", at.err, dialer.Classify(at.err))
		default:
			other++
		}
	}
	if starting == 0 {
		t.Errorf("no attempt saw 57P03 (%d other transient failures); the test did not reach recovery", other)
	}
	st := p.Dialer().Stats()
	if st.OK != 1 || st.Permanent != 0 {
		t.Errorf("stats: %d OK, %d permanent; want 1, 0", st.OK, st.Permanent)
	}
}

// full is a server (or PgBouncer) at url whose every connection slot is
// held, for the exhaustion tests.
type full struct {
	url     string
	slots   int                    // connections to hold
	refusal func(err error) string // "" if err is the expected refusal, else what is wrong
}

// retriedUntilASlotFrees fills f's slots, starts an Exec on a pool of its
// own with a constant backoff, checks that at least failures attempts fail
// with f's refusal, as transient errors, each at least the backoff after
// the one before, then frees a slot and checks the Exec succeeds. It
// returns the pool and how many more attempts failed before the slot freed.
func retriedUntilASlotFrees(t *testing.T, f full, failures int) (p *Pool, more int) {
	t.Helper()
	ctx := context.Background()
	var holders []*pgx.Conn
	for range f.slots {
		h, err := pgx.Connect(ctx, f.url)
		if err != nil {
			t.Fatal(err)
		}
		holders = append(holders, h)
	}
	t.Cleanup(func() {
		for _, h := range holders {
			h.Close(ctx)
		}
	})

	const wait = 150 * time.Millisecond
	cfg, err := pgxpool.ParseConfig(f.url)
	if err != nil {
		t.Fatal(err)
	}
	seen := newAttempts()
	cfg.ConnConfig.Tracer = seen
	p, err = NewWithConfig(ctx, cfg, WithStartupJitter(0),
		WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(wait) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)

	done := make(chan error, 1)
	go func() {
		_, err := p.Exec(ctx, "select 1")
		done <- err
	}()
	var last time.Time
	for i := range failures {
		at := seen.next(t)
		if wrong := f.refusal(at.err); wrong != "" {
			t.Fatalf("attempt %d: err = %v: %s", i+1, at.err, wrong)
		}
		if c := dialer.Classify(at.err); c != dialer.Transient {
			t.Errorf("attempt %d: classified %v, want transient", i+1, c)
		}
		if i > 0 && at.at.Sub(last) < wait {
			t.Errorf("attempt %d failed %v after the one before, want at least the backoff's %v", i+1, at.at.Sub(last), wait)
		}
		last = at.at
	}
	holders[0].Close(ctx) // a slot frees
	if err := <-done; err != nil {
		t.Fatalf("Exec after a slot freed: %v", err)
	}
	for len(seen.ended) > 0 {
		if seen.next(t).err != nil {
			more++
		}
	}
	return p, more
}

func TestExhaustedServerIsRetriedWithBackoffUntilASlotFrees(t *testing.T) {
	c := ownCluster(t, testdb.Options{Settings: map[string]string{
		"max_connections": "3", "superuser_reserved_connections": "0",
	}})
	before := c.ConnectionsReceived() + 3 // the holders'
	const failures = 4
	p, more := retriedUntilASlotFrees(t, full{url: c.ConnString(""), slots: 3, refusal: func(err error) string {
		if code := sqlstate(err); code != "53300" {
			return "want SQLSTATE 53300"
		}
		return ""
	}}, failures)
	// Every attempt is one connection the server forked for, and no more:
	// the failures seen, those between the last one seen and the free slot,
	// and the success.
	got := c.WaitConnectionsReceived(before+failures+int64(more)+1, 5*time.Second) - before
	if want := int64(failures + more + 1); got != want {
		t.Errorf("server received %d connections, want %d (attempts)", got, want)
	}
	if st := p.Dialer().Stats(); st.Retries != int64(failures+more) {
		t.Errorf("stats: %d retries, want %d", st.Retries, failures+more)
	}
}

// checkPaced checks that dials, in order, kept to a bucket of r tokens per
// second and burst b: any k consecutive ones span at least (k-b)/r. The
// times are seen when each dial begins, after its token; a dial the
// scheduler delays can come closer to the next than their tokens were, so
// one token's worth of slack is allowed.
func checkPaced(t *testing.T, dials []time.Time, r float64, b int) {
	t.Helper()
	for i := range dials {
		for j := i + b + 1; j < len(dials); j++ {
			need := time.Duration(float64(j-i-b) / r * float64(time.Second))
			if got := dials[j].Sub(dials[i]); got < need {
				t.Errorf("dials %d..%d span %v, want at least %v at %v/s with burst %d (one token of slack)", i, j, got, need, r, b)
			}
		}
	}
}

// sockets counts this process's open sockets.
func sockets(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

// settled waits up to within for every goroutine but those ignore names to
// end, and for the process's sockets to be no more than before; it fails
// the test if they do not.
func settled(t *testing.T, ignore goleak.Option, before int, within time.Duration) {
	t.Helper()
	end := time.Now().Add(within)
	for {
		leaked := goleak.Find(ignore)
		open := sockets(t)
		if leaked == nil && open <= before {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("after %v: %d sockets open (%d before); goroutines: %v", within, open, before, leaked)
		}
		time.Sleep(20 * time.Millisecond) // polling: nothing signals a socket's close
	}
}

func TestFrozenPostmasterEndsConnectsAtTheirDeadlines(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	const n = 8
	p := newPool(t, c.ConnString("", "connect_timeout=1", "pool_max_conns=8"), fast...)
	// The pool's own goroutines are running: count what the freeze adds.
	ignore := goleak.IgnoreCurrent()
	socketsBefore := sockets(t)

	if err := c.Freeze(); err != nil {
		t.Fatal(err)
	}
	thawed := false
	t.Cleanup(func() {
		if !thawed {
			_ = c.Thaw()
		}
	})
	const deadline = 2500 * time.Millisecond
	var wg sync.WaitGroup
	errs := make([]error, n)
	took := make([]time.Duration, n)
	for i := range n {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			start := time.Now()
			_, errs[i] = p.Exec(ctx, "select 1")
			took[i] = time.Since(start)
		})
	}
	wg.Wait()
	for i := range n {
		if !errors.Is(errs[i], context.DeadlineExceeded) {
			t.Errorf("caller %d: err = %v, want context.DeadlineExceeded", i, errs[i])
		}
		if took[i] > deadline+time.Second {
			t.Errorf("caller %d returned after %v, %v past its deadline", i, took[i], took[i]-deadline)
		}
	}
	st := p.Dialer().Stats()
	if st.Transient == 0 {
		t.Errorf("no attempt ended at connect_timeout (stats %+v)", st)
	}
	// Nothing piles up. A connect pgxpool began for a caller runs on after
	// the caller gives up (its context has the caller's values but not its
	// deadline), until connect_timeout: at most one per caller, each gone
	// within connect_timeout.
	if got := sockets(t) - socketsBefore; got > n {
		t.Errorf("%d sockets still open as the callers returned, want at most one per caller (%d)", got, n)
	}
	settled(t, ignore, socketsBefore, time.Second+time.Second) // connect_timeout, and slack

	if err := c.Thaw(); err != nil {
		t.Fatal(err)
	}
	thawed = true
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := p.Exec(ctx, "select 1"); err != nil {
		t.Fatalf("Exec after the thaw: %v", err)
	}
}

func TestCloseDuringEveryWaitReturnsPromptlyAndReleasesEverything(t *testing.T) {
	refused := func(t *testing.T) string {
		// A port with no server: every connect is refused.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		url := strings.Replace(db(t).ConnString("", "pool_max_conns=8"), db(t).Addr(), l.Addr().String(), 1)
		l.Close()
		return url
	}
	frozen := func(t *testing.T) string {
		c := ownCluster(t, testdb.Options{})
		if err := c.Freeze(); err != nil {
			t.Fatal(err)
		}
		return c.ConnString("", "pool_max_conns=8")
	}
	drained := rate.NewLimiter(rate.Every(time.Hour), 1)
	drained.Allow()
	kinds := []struct {
		name string
		url  func(t *testing.T) string
		opts []Option
		in   int                                 // callers that get past the gate (into a connect) rather than wait in it
		wait func(dialer.Stats) dialer.WaitStats // the wait under test
	}{
		{"startup jitter", nil, []Option{WithStartupJitter(time.Hour)}, 0,
			func(s dialer.Stats) dialer.WaitStats { return s.JitterWait }},
		{"rate limit", nil, []Option{WithStartupJitter(0), WithLimiter(drained)}, 0,
			func(s dialer.Stats) dialer.WaitStats { return s.RateWait }},
		// One caller's connect hangs on the frozen server; the others wait
		// for its connecting slot.
		{"connecting slot", frozen, []Option{WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithMaxConnecting(1)}, 1,
			func(s dialer.Stats) dialer.WaitStats { return s.SlotWait }},
		{"backoff", refused, []Option{WithStartupJitter(0), WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(time.Hour) })}, 0,
			func(s dialer.Stats) dialer.WaitStats { return s.BackoffWait }},
	}
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			url := db(t).ConnString("", "pool_max_conns=8")
			if k.url != nil {
				url = k.url(t)
			}
			cfg, err := pgxpool.ParseConfig(url)
			if err != nil {
				t.Fatal(err)
			}
			ignore := goleak.IgnoreCurrent()
			socketsBefore := sockets(t)
			const n = 5
			p, err := NewWithConfig(context.Background(), cfg, k.opts...)
			if err != nil {
				t.Fatal(err)
			}
			errs := make(chan error, n)
			for range n {
				go func() {
					_, err := p.Exec(context.Background(), "select 1")
					errs <- err
				}()
			}
			// Every caller is in the gate: in the wait under test, or (k.in
			// of them) past it, connecting.
			waiting := func() int64 {
				s := p.Dialer().Stats()
				return s.JitterWait.Waiting + s.RateWait.Waiting + s.SlotWait.Waiting + s.PacerWait.Waiting + s.BackoffWait.Waiting
			}
			for waiting() < n-int64(k.in) {
				time.Sleep(time.Millisecond) // polling: the gate signals nothing on entering a wait
			}
			if k.wait(p.Dialer().Stats()).Waiting == 0 {
				t.Fatalf("no caller is in the %s wait: %+v", k.name, p.Dialer().Stats())
			}
			start := time.Now()
			p.Close()
			for range n {
				select {
				case err := <-errs:
					if !errors.Is(err, ErrClosed) {
						t.Errorf("err = %v, want ErrClosed", err)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("a caller is still waiting 5s after Close")
				}
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("callers returned %v after Close, want promptly", took)
			}
			settled(t, ignore, socketsBefore, time.Second)
		})
	}
}

func TestRestartUnderLoad(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	cfg, err := pgxpool.ParseConfig(c.ConnString("", "pool_max_conns=4"))
	if err != nil {
		t.Fatal(err)
	}
	type dial struct {
		at      time.Time
		refused bool // nothing listened: the server forked nothing
	}
	var (
		mu      sync.Mutex
		dials   []dial    // every TCP connection attempted, CancelRequests too
		watchAt time.Time // when non-zero, dials after it are sent on watched
		nd      net.Dialer
	)
	watched := make(chan struct{}, 1000)
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		now := time.Now()
		conn, err := nd.DialContext(ctx, network, addr)
		mu.Lock()
		dials = append(dials, dial{now, errors.Is(err, syscall.ECONNREFUSED)})
		if !watchAt.IsZero() && now.After(watchAt) {
			watched <- struct{}{}
		}
		mu.Unlock()
		return conn, err
	}
	const rateLimit, burst = 10, 2
	ignore := []goleak.Option{goleak.IgnoreCurrent(),
		// The restarted server's log reader and waiter belong to the cluster.
		goleak.IgnoreAnyFunction("github.com/pgstagger/pgstagger/internal/testdb.(*Cluster).Start.func1"),
		goleak.IgnoreAnyFunction("github.com/pgstagger/pgstagger/internal/testdb.(*Cluster).Start.func2"),
	}
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0), WithConnectRate(rateLimit, burst))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	const workers = 8
	load := startCalls(workers, func(ctx context.Context) error {
		_, err := p.Exec(ctx, "select 1")
		return err
	})
	for range workers * 10 { // every worker is querying
		if r := <-load.calls; r.err != nil {
			t.Fatalf("before the restart: %v", r.err)
		}
	}

	downAt := time.Now()
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	// The server is down: let the pool fail to connect a few times.
	mu.Lock()
	watchAt = time.Now()
	mu.Unlock()
	stopped := watchAt
	for range 4 {
		select {
		case <-watched:
		case <-time.After(20 * time.Second):
			t.Fatal("the pool did not try to reconnect while the server was down")
		}
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	upAt := time.Now()

	// Run on until every worker has succeeded again, several times.
	failed := load.checkRestart(t, workers*10, 4, downAt, stopped, upAt)

	// While the server was down and coming back, the dials it could fork for
	// never outran the bucket. Refused dials give their token back (nothing was
	// forked); the backoff paces them instead, far from a tight loop.
	mu.Lock()
	var since []time.Time
	refused := 0
	for _, d := range dials {
		switch {
		case !d.at.After(downAt):
		case d.refused:
			refused++
		default:
			since = append(since, d.at)
		}
	}
	mu.Unlock()
	checkPaced(t, since, rateLimit, burst)
	outage := upAt.Sub(stopped)
	if most := 2 * (burst + int(rateLimit*outage.Seconds()+1)); refused > most {
		t.Errorf("%d refused dials in the %v outage, want at most %d", refused, outage, most)
	}
	t.Logf("outage %v: %d dials refused, %d answered from the stop on; %d calls failed; stats %+v", outage, refused, len(since), len(failed), p.Dialer().Stats())

	p.Close()
	if err := goleak.Find(ignore...); err != nil {
		t.Errorf("goroutines left after Close: %v", err)
	}
}

func TestCancelStormStaysWithinTheBudgetAndQueriesStillCancel(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	ctx := context.Background()
	if err := c.Exec(ctx, "create table stalled (x int)"); err != nil {
		t.Fatal(err)
	}
	// The stall: a transaction holds the table, every query on it waits.
	holder, err := pgx.Connect(ctx, c.ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(ctx)
	tx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "lock table stalled in access exclusive mode"); err != nil {
		t.Fatal(err)
	}
	waiters := func() int {
		var n int
		if err := holder.QueryRow(ctx, `select count(*) from pg_stat_activity
			where wait_event_type = 'Lock' and query like '%from stalled%'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	const n, rateLimit, burst = 20, 10, 2
	cfg, err := pgxpool.ParseConfig(c.ConnString("", fmt.Sprintf("pool_max_conns=%d", n)))
	if err != nil {
		t.Fatal(err)
	}
	dials := recordDials(cfg)
	p, err := NewWithConfig(ctx, cfg, WithStartupJitter(0), WithConnectRate(rateLimit, burst))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Open the n connections first (at the bucket's pace), so that the storm
	// is the cancels alone.
	var conns []*pgxpool.Conn
	for range n {
		cn, err := p.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, cn)
	}
	for _, cn := range conns {
		cn.Release()
	}

	stormAt := time.Now()
	const deadline = 300 * time.Millisecond
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			qctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			start := time.Now()
			_, err := p.Exec(qctx, "select count(*) from stalled")
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("stalled query: err = %v, want context.DeadlineExceeded", err)
			}
			if took := time.Since(start); took > deadline+time.Second {
				t.Errorf("stalled query returned after %v, want at its %v deadline", took, deadline)
			}
		})
	}
	wg.Wait()

	// pgx cancels each timed-out query with a CancelRequest on a new
	// connection; every one is sent, at the bucket's pace, and every
	// waiting query ends while the lock is still held.
	end := time.Now().Add(15 * time.Second)
	for p.Dialer().Stats().CancelDials < n || waiters() > 0 {
		if time.Now().After(end) {
			t.Fatalf("15s after the storm: %d cancel dials, %d queries still waiting; stats %+v", p.Dialer().Stats().CancelDials, waiters(), p.Dialer().Stats())
		}
		time.Sleep(20 * time.Millisecond) // polling: the server signals nothing
	}
	var storm []time.Time
	for _, d := range dials() {
		if d.After(stormAt) {
			storm = append(storm, d)
		}
	}
	checkPaced(t, storm, rateLimit, burst)
	if s := p.Dialer().Stats(); s.CancelsShed != 0 {
		t.Errorf("%d cancels not sent; stats %+v", s.CancelsShed, s)
	}
	t.Logf("%d dials in the storm over %v; stats %+v", len(storm), storm[len(storm)-1].Sub(stormAt), p.Dialer().Stats())
}

// call is one call of a load's worker.
type call struct {
	start, end time.Time
	err        error
}

// callLoad is workers calling op in a loop, each call with a 20s deadline,
// until stopAfter.
type callLoad struct {
	calls chan call
	stop  chan struct{}
	wg    sync.WaitGroup
}

func startCalls(workers int, op func(context.Context) error) *callLoad {
	l := &callLoad{calls: make(chan call, 100000), stop: make(chan struct{})}
	for range workers {
		l.wg.Go(func() {
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				start := time.Now()
				err := op(ctx)
				cancel()
				l.calls <- call{start, time.Now(), err}
			}
		})
	}
	return l
}

// stopAfter runs the load until n calls begun after upAt have succeeded,
// stops it and returns every call that failed meanwhile.
func (l *callLoad) stopAfter(n int, upAt time.Time) (failed []call) {
	for ok := 0; ok < n; {
		r := <-l.calls
		switch {
		case r.err != nil:
			failed = append(failed, r)
		case r.start.After(upAt):
			ok++
		}
	}
	close(l.stop)
	l.wg.Wait()
	for len(l.calls) > 0 {
		if r := <-l.calls; r.err != nil {
			failed = append(failed, r)
		}
	}
	return failed
}

// checkRestart runs the load on until n calls begun after upAt have
// succeeded, then checks the calls that failed since the stop began at
// downAt (and returned at stopped): only calls begun before stopped, whose
// session the shutdown ended, at most one per connection of the pool
// (conns). A call begun once the server was down waited for it and
// succeeded: its deadline outlasted the outage.
func (l *callLoad) checkRestart(t *testing.T, n, conns int, downAt, stopped, upAt time.Time) (failed []call) {
	t.Helper()
	failed = l.stopAfter(n, upAt)
	for _, f := range failed {
		if f.start.After(stopped) || !endedByShutdown(f.err) {
			t.Errorf("call began %v after the stop began, ended %v after: %v", f.start.Sub(downAt), f.end.Sub(downAt), f.err)
		}
	}
	if len(failed) > conns {
		t.Errorf("%d calls failed, more than the pool's %d connections", len(failed), conns)
	}
	return failed
}

// endedByShutdown reports whether err is a call's whose session a server
// shutdown terminated: the backend's goodbye (57P01) or the closed socket,
// not a failure to connect.
func endedByShutdown(err error) bool {
	var pe *pgconn.PgError
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) || errors.Is(err, sql.ErrConnDone) {
		return false
	}
	return (errors.As(err, &pe) && pe.Code == "57P01") ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		strings.Contains(err.Error(), "conn closed")
}
