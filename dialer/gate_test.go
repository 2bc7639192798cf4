package dialer

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/pgstagger/pgstagger/internal/oteltest"
	"github.com/pgstagger/pgstagger/internal/testdb"
	"golang.org/x/time/rate"
)

// These tests run against the package's real PostgreSQL cluster and observe
// the server's side through its count of accepted connections.

func TestBucketHoldsAgainstRealServer(t *testing.T) {
	const n = 12
	r := 30.0
	var mu sync.Mutex
	var dials []time.Time
	cfg, err := ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	var nd net.Dialer
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		dials = append(dials, time.Now())
		mu.Unlock()
		return nd.DialContext(ctx, network, addr)
	}
	d, err := New(WithStartupJitter(0), WithConnectRate(rate.Limit(r), 1), WithMaxConnecting(n))
	if err != nil {
		t.Fatal(err)
	}
	before := db(t).ConnectionsReceived()
	var wg sync.WaitGroup
	start := time.Now()
	conns := make(chan *pgx.Conn, n)
	for range n {
		wg.Go(func() {
			c, err := d.Connect(context.Background(), cfg)
			if err != nil {
				t.Error(err)
				return
			}
			conns <- c
		})
	}
	wg.Wait()
	close(conns)
	for c := range conns {
		c.Close(context.Background())
	}
	if got := db(t).WaitConnectionsReceived(before+n, 5*time.Second) - before; got != n {
		t.Errorf("server accepted %d connections, want %d", got, n)
	}
	slices.SortFunc(dials, func(a, b time.Time) int { return a.Compare(b) })
	// The bucket holds at most one token at start and gains one every 1/r:
	// the k-th dial cannot come before k/r after start. (Not after the first
	// dial: what pgconn does between the token and its dial took 0.1–3.5 ms
	// on one machine, more on a process's first connect, and that would
	// make a late first dial the reference.) The margin only absorbs the
	// bucket's floating-point arithmetic.
	for k := 1; k < len(dials); k++ {
		min := time.Duration(float64(k) / r * float64(time.Second))
		if got := dials[k].Sub(start); got < min-100*time.Microsecond {
			t.Errorf("dial %d at +%v, before the bucket allows (+%v)", k, got, min)
		}
	}
	if total, want := dials[len(dials)-1].Sub(start), time.Duration(float64(n-1)/r*float64(time.Second)); total > 4*want {
		t.Errorf("%d connects took %v, want about %v", n, total, want)
	}
}

func TestPreferDialsTwiceAndBothAreCounted(t *testing.T) {
	d, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig(strings.Replace(db(t).ConnString(""), "sslmode=disable", "sslmode=prefer", 1))
	if err != nil {
		t.Fatal(err)
	}
	before := db(t).ConnectionsReceived()
	const n = 3
	for range n {
		c, err := d.Connect(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.Close(context.Background())
	}
	server := db(t).WaitConnectionsReceived(before+2*n, 5*time.Second) - before
	if s := d.Stats(); s.Dials != 2*n || server != 2*n {
		t.Errorf("gate counted %d dials and the server %d connections for %d connects, want %d each", s.Dials, server, n, 2*n)
	}
	if p := d.Plan(); p.Dials != 2 {
		t.Errorf("plan dials per connect = %d, want 2 for sslmode=prefer", p.Dials)
	}
}

func TestStartupJitterSpreadsFirstConnects(t *testing.T) {
	const window = 400 * time.Millisecond
	draws := []float64{0.8, 0.1, 0.55, 0.3}
	type result struct {
		draw float64
		at   time.Duration
	}
	results := make(chan result, len(draws))
	var wg sync.WaitGroup
	for _, r := range draws {
		d, err := New(WithStartupJitter(window), WithRand(func() float64 { return r }))
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := ParseConfig(db(t).ConnString(""))
		if err != nil {
			t.Fatal(err)
		}
		var first atomic.Int64
		var nd net.Dialer
		cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			first.CompareAndSwap(0, time.Now().UnixNano())
			return nd.DialContext(ctx, network, addr)
		}
		start := time.Now()
		if err := d.Install(cfg); err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			c, err := pgx.ConnectConfig(context.Background(), cfg)
			if err != nil {
				t.Error(err)
				return
			}
			c.Close(context.Background())
			results <- result{r, time.Unix(0, first.Load()).Sub(start)}
		})
	}
	wg.Wait()
	close(results)
	var got []result
	for r := range results {
		if min := time.Duration(r.draw * float64(window)); r.at < min {
			t.Errorf("draw %.2f: first dial at +%v, before its release at +%v", r.draw, r.at, min)
		}
		got = append(got, r)
	}
	slices.SortFunc(got, func(a, b result) int { return int(a.at - b.at) })
	for i := 1; i < len(got); i++ {
		if got[i].draw < got[i-1].draw {
			t.Errorf("first connects not in release order: %+v", got)
		}
	}
}

func TestMaxConnectingCapsEstablishmentsInFlight(t *testing.T) {
	const limit, callers = 3, 12
	var active, peak atomic.Int32
	cfg, err := ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	var nd net.Dialer
	// An establishment is in flight from its dial to the end of startup.
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		n := active.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		return nd.DialContext(ctx, network, addr)
	}
	cfg.AfterConnect = func(context.Context, *pgconn.PgConn) error {
		// Hold the slot a moment so that, uncapped, callers would overlap.
		time.Sleep(20 * time.Millisecond)
		active.Add(-1)
		return nil
	}
	d, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithMaxConnecting(limit))
	if err != nil {
		t.Fatal(err)
	}
	connectAll(t, callers, func() (*pgx.Conn, error) { return d.Connect(context.Background(), cfg) })
	if p := peak.Load(); p != limit {
		t.Errorf("peak establishments in flight = %d, want exactly %d (capped, and reached)", p, limit)
	}
	if s := d.Stats(); s.SlotWait.Count == 0 {
		t.Errorf("no caller waited for a slot: %+v", s)
	}
}

func TestTransientFailuresAreRetriedUntilTheServerIsBack(t *testing.T) {
	if err := db(t).Stop(); err != nil {
		t.Fatal(err)
	}
	restarted := make(chan error, 1)
	var once sync.Once
	cfg, err := ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	var nd net.Dialer
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := nd.DialContext(ctx, network, addr)
		if err != nil {
			// The first refused dial brings the server back.
			once.Do(func() { go func() { restarted <- db(t).Start() }() })
		}
		return c, err
	}
	d, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1),
		WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(50 * time.Millisecond) }))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.Connect(ctx, cfg)
	if serr := <-restarted; serr != nil {
		t.Fatal(serr)
	}
	if err != nil {
		t.Fatalf("connect across the restart: %v", err)
	}
	c.Close(context.Background())
	s := d.Stats()
	if s.Transient < 1 || s.OK != 1 || s.Establishments != s.Transient+1 || s.Retries != s.Transient {
		t.Errorf("stats = %+v, want transient failures each followed by a retry, then one success", s)
	}
}

func TestRetryGivesUpAtTheCallersDeadline(t *testing.T) {
	// A port with no server refuses every connect.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, port, _ := net.SplitHostPort(addr)
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = Connect(ctx, "postgres://u:pw@127.0.0.1:"+port+"/x?sslmode=disable", WithStartupJitter(0))
	var g *GaveUpError
	if !errors.As(err, &g) || g.Attempts < 2 || !errors.Is(err, context.DeadlineExceeded) || Classify(g.Err) != Transient {
		t.Fatalf("err = %v, want GaveUpError after several transient attempts, matching DeadlineExceeded", err)
	}
	if elapsed := time.Since(start); elapsed > 600*time.Millisecond+200*time.Millisecond {
		t.Errorf("returned %v after start, long past the 600ms deadline", elapsed)
	}
}

func TestPermanentFailuresAreNotRetried(t *testing.T) {
	ensureRole(t, "app", "right-pw", "")
	cases := []struct {
		name, url, sqlstate string
	}{
		{"wrong password", db(t).ConnStringAs("app", "wr0ng-pw-xyz", ""), "28P01"},
		{"unknown role", db(t).ConnStringAs("nobody_here", "wr0ng-pw-xyz", ""), "28P01"},
		{"unknown database", db(t).ConnStringAs("app", "right-pw", "no_such_db"), "3D000"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, err := New(WithStartupJitter(0))
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := ParseConfig(c.url)
			if err != nil {
				t.Fatal(err)
			}
			before := db(t).ConnectionsReceived()
			_, err = d.Connect(context.Background(), cfg)
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != c.sqlstate || Classify(err) != Permanent {
				t.Fatalf("err = %v, want permanent SQLSTATE %s", err, c.sqlstate)
			}
			var g *GaveUpError
			if errors.As(err, &g) {
				t.Errorf("a permanent failure went through the retry loop: %v", err)
			}
			if s := d.Stats(); s.Establishments != 1 || s.Dials != 1 {
				t.Errorf("stats = %+v, want exactly one attempt and one dial", s)
			}
			if got := db(t).WaitConnectionsReceived(before+1, 5*time.Second) - before; got != 1 {
				t.Errorf("server saw %d connections, want 1", got)
			}
			if strings.Contains(err.Error(), "wr0ng-pw-xyz") || strings.Contains(err.Error(), "right-pw") {
				t.Errorf("error leaks a password: %v", err)
			}
		})
	}
}

func TestUserHooksKeepWorking(t *testing.T) {
	cfg, err := ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	ut := &oteltest.HookTracer{}
	var dialled, looked atomic.Int32
	var nd net.Dialer
	cfg.Tracer = ut
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dialled.Add(1)
		return nd.DialContext(ctx, network, addr)
	}
	cfg.LookupFunc = func(ctx context.Context, host string) ([]string, error) {
		looked.Add(1)
		return []string{host}, nil
	}
	d, err := New(WithStartupJitter(0))
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.Connect(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if _, err := c.Exec(context.Background(), "select 1"); err != nil {
		t.Fatal(err)
	}
	if dialled.Load() != 1 || looked.Load() != 1 || ut.Connects.Load() != 1 || ut.Queries.Load() != 1 {
		t.Errorf("user hooks: dial %d, lookup %d, connect trace %d, query trace %d; want 1 each",
			dialled.Load(), looked.Load(), ut.Connects.Load(), ut.Queries.Load())
	}
	if s := d.Stats(); s.Dials != 1 || s.OK != 1 {
		t.Errorf("gate stats = %+v, want the connect to pass the gate", s)
	}
	if cfg.Tracer != ut {
		t.Errorf("Connect modified the caller's config")
	}
}

func TestCancelRequestWaitsForItsTokenThenCancels(t *testing.T) {
	const every = 600 * time.Millisecond
	lim := rate.NewLimiter(rate.Every(every), 1)
	d, err := New(WithStartupJitter(0), WithLimiter(lim))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	// Cancel queries with a CancelRequest on a new connection (pgx's
	// default closes the socket instead), with a socket deadline long
	// after it as the fallback.
	cfg.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: pc, DeadlineDelay: 20 * time.Second}
	}
	c, err := d.Connect(context.Background(), cfg) // takes the only token
	if err != nil {
		t.Fatal(err)
	}
	connected := time.Now()
	defer c.Close(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = c.Exec(ctx, "select pg_sleep(30)")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("err = %v, want the query cancelled by the server (57014)", err)
	}
	// The cancel waited for the next token; without it only the 20s socket
	// deadline would have ended the query.
	if elapsed := time.Since(connected); elapsed < every-50*time.Millisecond || elapsed > 10*time.Second {
		t.Errorf("query cancelled %v after the connect took the token, want after the next one (%v)", elapsed, every)
	}
	if s := d.Stats(); s.CancelDials != 1 || s.RateWait.Count != 1 || s.CancelsShed != 0 {
		t.Errorf("stats %+v: want one cancel dial after one rate wait", s)
	}
}

func TestSuccessfulConnectsSetTheShedMargin(t *testing.T) {
	d, err := New(WithStartupJitter(0))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c, err := d.Connect(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	c.Close(context.Background())
	// The margin fits sheds by is twice this average.
	if got := d.g.ConnectTime(); got <= 0 || got > took {
		t.Errorf("average connect time %v after one connect that took %v", got, took)
	}
}

func TestMultiHostDeadHostIsBackedOffNotHammered(t *testing.T) {
	refusing := func(t *testing.T) string {
		// A port with no server.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}
	silent := func(t *testing.T) string {
		// A frozen postmaster: the kernel accepts, nothing answers.
		c, err := testdb.Start(testdb.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		if err := c.Freeze(); err != nil {
			t.Fatal(err)
		}
		return c.Addr()
	}
	for name, deadHost := range map[string]func(*testing.T) string{"refusing": refusing, "silent": silent} {
		t.Run(name, func(t *testing.T) {
			// The dead host is listed first: pgconn tries it on every
			// connect, each for up to connect_timeout.
			dead := deadHost(t)
			url := strings.Replace(db(t).ConnString("", "connect_timeout=1"), db(t).Addr(), dead+","+db(t).Addr(), 1) +
				"&target_session_attrs=read-write"
			cfg, err := ParseConfig(url)
			if err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			dials := map[string]int{}
			var nd net.Dialer
			cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
				mu.Lock()
				dials[addr]++
				mu.Unlock()
				return nd.DialContext(ctx, network, addr)
			}
			d, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1),
				WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(time.Hour) }))
			if err != nil {
				t.Fatal(err)
			}
			const n = 10
			start := time.Now()
			for range n {
				c, err := d.Connect(context.Background(), cfg)
				if err != nil {
					t.Fatal(err)
				}
				if got := c.PgConn().Conn().RemoteAddr().String(); got != db(t).Addr() {
					t.Errorf("connected to %s, want the live host %s", got, db(t).Addr())
				}
				c.Close(context.Background())
			}
			// A silent host costs its connect_timeout once, not n times.
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("%d connects took %v", n, took)
			}
			mu.Lock()
			defer mu.Unlock()
			if dials[dead] != 1 || dials[db(t).Addr()] != n {
				t.Errorf("dials = %v, want the dead host once (then backed off for the hour) and the live one %d times", dials, n)
			}
			if s := d.Stats(); s.HostsSkipped != n-1 || s.OK != n || s.Retries != 0 {
				t.Errorf("stats: %d hosts skipped, %d OK, %d retries; want %d, %d, 0", s.HostsSkipped, s.OK, s.Retries, n-1, n)
			}
		})
	}
}

// connectAll runs connect n times at once, closing each connection it
// makes, and returns when all have.
func connectAll(t *testing.T, n int, connect func() (*pgx.Conn, error)) {
	t.Helper()
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			c, err := connect()
			if err != nil {
				t.Error(err)
				return
			}
			c.Close(context.Background())
		})
	}
	wg.Wait()
}
