package pool

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/pgstagger/pgstagger/internal/engine"
	"github.com/pgstagger/pgstagger/internal/oteltest"
	"github.com/pgstagger/pgstagger/internal/testdb"
	"github.com/pgstagger/pgstagger/jitter"
)

// holdOthers opens n connections to c from a plain pgxpool and keeps them
// for the test.
func holdOthers(t *testing.T, c *testdb.Cluster, n int) {
	t.Helper()
	other, err := pgxpool.New(context.Background(), c.ConnString("", fmt.Sprintf("pool_max_conns=%d", n)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(other.Close)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	conns := make([]*pgxpool.Conn, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { conns[i], errs[i] = other.Acquire(ctx) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		conns[i].Release()
	}
}

// An acquired connection reads how many connections the server holds,
// without opening a connection and unseen by the
// caller's tracer; the next read waits its interval; the gate sizes its
// recovery window from what it read.
func TestServerFactsAreReadOnAnAcquiredConnection(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	holdOthers(t, c, 5)
	cfg, err := pgxpool.ParseConfig(c.ConnString("", "pool_max_conns=1"))
	if err != nil {
		t.Fatal(err)
	}
	queries := &countingTracer{}
	cfg.ConnConfig.Tracer = queries
	env := oteltest.New(t)
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0), WithMeterProvider(env.MP))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	if _, err := p.Exec(ctx, "select 1"); err != nil {
		t.Fatal(err)
	}
	st := p.Dialer().Stats()
	m := env.Metrics(t)
	if g, ok := m["pgstagger.server.connections"].Data.(metricdata.Gauge[int64]); !ok || len(g.DataPoints) != 1 || g.DataPoints[0].Value != int64(st.ServerConns) {
		t.Errorf("pgstagger.server.connections = %+v, want one point of %d", m["pgstagger.server.connections"].Data, st.ServerConns)
	}
	if g, ok := m["pgstagger.recovery.window"].Data.(metricdata.Gauge[float64]); !ok || len(g.DataPoints) != 1 || g.DataPoints[0].Value != st.RecoveryWindow.Seconds() {
		t.Errorf("pgstagger.recovery.window = %+v, want one point of %v", m["pgstagger.recovery.window"].Data, st.RecoveryWindow.Seconds())
	}
	// 5 others and ours; an autovacuum worker may be connected too.
	if st.ServerConns < 6 || st.ServerConns > 8 {
		t.Errorf("the server held %d connections, want 6 (5 others and ours)", st.ServerConns)
	}
	if st.ServerPeakRate != 0 {
		t.Errorf("peak rate %v after one read, want 0", st.ServerPeakRate)
	}
	if st.Dials != 1 {
		t.Errorf("the pool dialed %d times, want 1: reading the facts must not open a connection", st.Dials)
	}
	if n := queries.queries.Load(); n != 1 {
		t.Errorf("the caller's tracer saw %d queries, want 1 (its own)", n)
	}
	if want := engine.FactsWindow(p.g.Facts(), st.Baseline); st.RecoveryWindow != want || want <= 0 {
		t.Errorf("recovery window %v, want the facts' %v", st.RecoveryWindow, want)
	}
	// Acquires within the first interval (at least 850ms) read nothing.
	for range 3 {
		if _, err := p.Exec(ctx, "select 1"); err != nil {
			t.Fatal(err)
		}
	}
	if at := p.Dialer().Stats().ServerFactsAt; !at.Equal(st.ServerFactsAt) {
		t.Errorf("facts read again %v after the first read", at.Sub(st.ServerFactsAt))
	}
}

// A pool filling MinConns reads the facts on its first new connection,
// before any Acquire, and, having more than one connection to make, reads
// the history too: the peak rate that bounds its pacer's baseline while it
// still has connects to make.
func TestServerFactsAreReadOnAFillingPoolsFirstConnection(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	holdOthers(t, c, 3)
	p := newPool(t, c.ConnString("", "pool_max_conns=4", "pool_min_conns=4"), WithStartupJitter(0))
	deadline := time.Now().Add(10 * time.Second)
	for p.Dialer().Stats().ServerFactsAt.IsZero() {
		if time.Now().After(deadline) {
			t.Fatal("no facts read within 10s of a pool filling MinConns with no Acquire")
		}
		time.Sleep(5 * time.Millisecond)
	}
	st := p.Dialer().Stats()
	if st.ServerPeakRate < 1 {
		t.Errorf("peak rate %v after the first read of a pool of 4, want the history's (at least 1)", st.ServerPeakRate)
	}
	if st.ServerConns < 4 {
		t.Errorf("the server held %d connections, want at least ours and the 3 others", st.ServerConns)
	}
	if n := p.Stat().AcquireCount(); n != 0 {
		t.Errorf("%d acquires: the read must not need one", n)
	}
}

// countingTracer counts the queries a connection runs.
type countingTracer struct{ queries atomic.Int32 }

func (c *countingTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.queries.Add(1)
	return ctx
}

func (c *countingTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// WithServerFacts(0) reads nothing.
func TestServerFactsOff(t *testing.T) {
	p := newPool(t, db(t).ConnString("", "pool_max_conns=1"), WithStartupJitter(0), WithServerFacts(0))
	if _, err := p.Exec(context.Background(), "select 1"); err != nil {
		t.Fatal(err)
	}
	if st := p.Dialer().Stats(); st.ServerConns != 0 || !st.ServerFactsAt.IsZero() {
		t.Errorf("facts read with WithServerFacts(0): %+v", st)
	}
	if _, err := New(context.Background(), db(t).ConnString(""), WithServerFacts(-time.Second)); err == nil {
		t.Error("WithServerFacts(-1s) accepted")
	}
}

// A configured fleet's pool of one connection reads no facts unless told
// to, whether the fleet comes from options or the connection string; a
// fleet's pool of several still reads them.
func TestAFleetsPoolOfOneReadsNoFactsUnlessTold(t *testing.T) {
	fleet := []Option{WithFleet(1, 1000), WithStartupJitter(0)}
	for _, tc := range []struct {
		name  string
		url   string
		opts  []Option
		reads bool
	}{
		{"fleet, pool of one", db(t).ConnString("", "pool_max_conns=1"), fleet, false},
		{"fleet from the connection string, pool of one", db(t).ConnString("", "pool_max_conns=1", "pgstagger_fleet_size=1", "pgstagger_fleet_budget=1000"), nil, false},
		{"fleet, pool of one, told", db(t).ConnString("", "pool_max_conns=1"), append(fleet, WithServerFacts(time.Minute)), true},
		{"fleet, pool of two", db(t).ConnString("", "pool_max_conns=2"), fleet, true},
		{"no fleet, pool of one", db(t).ConnString("", "pool_max_conns=1"), []Option{WithStartupJitter(0)}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPool(t, tc.url, tc.opts...)
			if _, err := p.Exec(context.Background(), "select 1"); err != nil {
				t.Fatal(err)
			}
			if read := !p.Dialer().Stats().ServerFactsAt.IsZero(); read != tc.reads {
				t.Errorf("facts read: %v, want %v", read, tc.reads)
			}
		})
	}
}

// After a restart the process learns of it from the session the server
// ended (57P01), not from a refused dial, and its reconnect waits for its
// place in the window the server's facts call for: a wall-clock cycle as
// long as that window, at the phase its newest connection's backend
// process ID gives.
func TestAShutdownSendsTheReconnectToTheProcesssPlace(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	cfg, err := pgxpool.ParseConfig(c.ConnString("", "pool_max_conns=1"))
	if err != nil {
		t.Fatal(err)
	}
	dials := recordDials(cfg)
	// The pacer off: its baseline would call for a window too short to see.
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0), WithResponseTarget(0))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := p.Exec(ctx, "select 1"); err != nil {
		t.Fatal(err)
	}
	first := p.Dialer().Stats()
	// 20 more connections before the next read, about a second later: a
	// growth of 20 a second, so a window of about 2s for 21.
	holdOthers(t, c, 20)
	for p.Dialer().Stats().ServerFactsAt.Equal(first.ServerFactsAt) {
		if _, err := p.Exec(ctx, "select 1"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	w := p.Dialer().RecoveryWindow()
	if w < time.Second {
		t.Fatalf("recovery window %v from %+v: too short to tell a place from a dial at once", w, p.g.Facts())
	}
	held, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pid := held.Conn().PgConn().PID() // the process's newest connection's backend
	held.Release()
	if err := c.Restart(); err != nil {
		t.Fatal(err)
	}
	before := len(dials())
	// The first use of the idle session reads the server's 57P01; the
	// caller retries on a new connection.
	for {
		_, err := p.Exec(ctx, "select 1")
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatal(err)
		}
	}
	st := p.Dialer().Stats()
	if st.Lost != 1 || st.Transient != 0 {
		t.Errorf("lost %d sessions, %d transient failures; want 1 and 0 (the server was up)", st.Lost, st.Transient)
	}
	after := dials()[before:]
	if len(after) != 1 {
		t.Fatalf("%d dials after the restart, want 1", len(after))
	}
	phase := jitter.Weyl(uint64(pid))
	late := (time.Duration(after[0].UnixNano())%w - time.Duration(phase*float64(w)) + w) % w
	t.Logf("window %v from %+v; the reconnect came %v after the place", w, p.g.Facts(), late)
	if late > 200*time.Millisecond {
		t.Errorf("the reconnect came %v after the process's place (phase %.3f of %v), want within 200ms", late, phase, w)
	}
	if p.Dialer().Stats().BackoffWait.Count == 0 {
		t.Error("the reconnect did not wait")
	}
}

// wrapDials makes cfg's connections wrap's wrappers of TCP connections, and
// counts them.
func wrapDials(cfg *pgxpool.Config, wrap func(net.Conn) net.Conn) *atomic.Int32 {
	var n atomic.Int32
	var nd net.Dialer
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := nd.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		n.Add(1)
		return wrap(conn), nil
	}
	return &n
}

// dropWrites is a connection whose writes, once dropped is set, are
// discarded as a hung server's would go unanswered.
type dropWrites struct {
	net.Conn
	dropped *atomic.Bool
}

func (c dropWrites) Write(b []byte) (int, error) {
	if c.dropped.Load() {
		return len(b), nil
	}
	return c.Conn.Write(b)
}

// A connection that stops answering during the facts read on it, in
// AfterConnect, fails before any caller's query ran: the pool retries the
// acquire on a new connection instead of failing the caller.
func TestAConnectionLostDuringTheFactsReadIsRetried(t *testing.T) {
	cfg, err := pgxpool.ParseConfig(db(t).ConnString("", "pool_max_conns=2"))
	if err != nil {
		t.Fatal(err)
	}
	var last atomic.Pointer[atomic.Bool]
	dials := wrapDials(cfg, func(conn net.Conn) net.Conn {
		dropped := new(atomic.Bool)
		last.Store(dropped)
		return dropWrites{conn, dropped}
	})
	var hung atomic.Bool
	cfg.AfterConnect = func(context.Context, *pgx.Conn) error {
		// The caller's AfterConnect runs before the facts read: hang the
		// first connection there.
		if hung.CompareAndSwap(false, true) {
			last.Load().Store(true)
		}
		return nil
	}
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := p.Acquire(ctx)
	if err != nil {
		t.Fatalf("acquire after the first connection hung in the facts read: %v", err)
	}
	c.Release()
	// pgconn also dials a CancelRequest for the timed-out read.
	if n, s := dials.Load(), p.Dialer().Stats(); int64(n)-s.CancelDials != 2 || s.Retries != 1 {
		t.Errorf("%d dials (%d cancels) and %d retries, want 2 connections and 1 retry: the hung one, then a new one", n, s.CancelDials, s.Retries)
	}
}

// delayWrites is a connection whose writes, once delay is set, each wait
// that long first, as on a server too saturated to read them sooner.
type delayWrites struct {
	net.Conn
	delay *atomic.Int64
}

func (c delayWrites) Write(b []byte) (int, error) {
	time.Sleep(time.Duration(c.delay.Load()))
	return c.Conn.Write(b)
}

// On a server whose connects take seconds, the facts read waits as long
// as a connect takes: a read given up after a second would close a
// connection the saturated server took seconds to fork, and the caller's
// retry would queue again.
func TestTheFactsReadWaitsAsLongAsConnectsTake(t *testing.T) {
	cfg, err := pgxpool.ParseConfig(db(t).ConnString("", "pool_max_conns=2"))
	if err != nil {
		t.Fatal(err)
	}
	var last atomic.Pointer[atomic.Int64]
	dials := wrapDials(cfg, func(conn net.Conn) net.Conn {
		time.Sleep(time.Second) // a connect of a second or more
		delay := new(atomic.Int64)
		last.Store(delay)
		return delayWrites{conn, delay}
	})
	cfg.AfterConnect = func(context.Context, *pgx.Conn) error {
		// The facts read, next, is answered 1.5s later.
		last.Load().Store(int64(1500 * time.Millisecond))
		return nil
	}
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Release()
	if n, s := dials.Load(), p.Dialer().Stats(); n != 1 || s.ServerFactsAt.IsZero() {
		t.Errorf("%d dials, facts read at %v: want one connection, kept, and the facts read on it", n, s.ServerFactsAt)
	}
}

// A process whose only handshakes met a storm (an accept queue that made
// them take a second) bounds its pacer's baseline by a facts query's round
// trip instead: the bound is a round trip and two forks, and a round trip
// taken from those handshakes would leave the baseline, and the spacing
// below one connect in flight that it sets, a second long.
func TestTheFactsReadsRoundTripBoundsTheBaseline(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	holdOthers(t, c, 20) // a rate for the history to show
	cfg, err := pgxpool.ParseConfig(c.ConnString("", "pool_max_conns=1"))
	if err != nil {
		t.Fatal(err)
	}
	const slowHandshake = time.Second
	var nd net.Dialer
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := nd.DialContext(ctx, network, addr)
		if err == nil {
			time.Sleep(slowHandshake) // as the handshake the gate times
		}
		return conn, err
	}
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for p.Dialer().Stats().ServerPeakRate == 0 { // the second read, with the history
		if time.Now().After(deadline) {
			t.Fatal("no history read within 10s")
		}
		if _, err := p.Exec(ctx, "select 1"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // the next Acquire runs a due read
	}
	if st := p.Dialer().Stats(); st.Baseline >= slowHandshake/2 {
		t.Errorf("pacer baseline %v after the facts (peak %v/s), want it bounded by a query's round trip and two forks, far below the %v handshake", st.Baseline, st.ServerPeakRate, slowHandshake)
	}
}

// slowFactsRead is a connection whose facts history query goes out after
// delay, and which records when it did.
type slowFactsRead struct {
	net.Conn
	delay time.Duration
	sent  *atomic.Int64 // unix nanoseconds
}

func (c slowFactsRead) Write(b []byte) (int, error) {
	if bytes.Contains(b, []byte("pg_stat_get_backend_start")) {
		time.Sleep(c.delay)
		defer c.sent.CompareAndSwap(0, time.Now().UnixNano())
	}
	return c.Conn.Write(b)
}

// A pool of several connections makes its second only once it has read
// the server's facts on its first: until then its pacer cannot tell a
// storm's queue from its baseline.
func TestAPoolsSecondConnectWaitsForTheFirstFactsRead(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	cfg, err := pgxpool.ParseConfig(c.ConnString("", "pool_max_conns=3", "pool_min_conns=3"))
	if err != nil {
		t.Fatal(err)
	}
	const delay = 300 * time.Millisecond
	var sent atomic.Int64
	var mu sync.Mutex
	var dials []time.Time
	wrapDials(cfg, func(conn net.Conn) net.Conn {
		mu.Lock()
		dials = append(dials, time.Now())
		mu.Unlock()
		return slowFactsRead{conn, delay, &sent}
	})
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	deadline := time.Now().Add(10 * time.Second)
	for p.Stat().IdleConns() < 3 { // TotalConns counts connections being made too
		if time.Now().After(deadline) {
			t.Fatal("the pool did not fill its 3 connections within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if sent.Load() == 0 || len(dials) < 2 {
		t.Fatalf("facts read sent at %d, %d dials: want a read and at least 2 dials", sent.Load(), len(dials))
	}
	if readAt := time.Unix(0, sent.Load()); dials[1].Before(readAt) {
		t.Errorf("second dial %v before the first facts read went out (the read was held %v): it must wait for it", readAt.Sub(dials[1]), delay)
	}
}

// The history query counts, on a real server, what the start times of the
// backends connected to a database show: the most that started within one
// calendar second and within one tenth of a second, as counted here from
// the same snapshot of the backends' status; on a server holding many,
// among every k-th backend only. The server's own processes, which all
// start with it, have no database.
func TestFactsHistoryQueryCountsTheConnectedBackendsStartTimes(t *testing.T) {
	c := ownCluster(t, testdb.Options{})
	// Two bursts 1.1s apart: they fall in different seconds.
	holdOthers(t, c, 3)
	time.Sleep(1100 * time.Millisecond)
	holdOthers(t, c, 4)
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, c.ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// The query samples one backend in held ÷ 1,000 from 2,000 held; here,
	// one in held ÷ 3, every second or third of the 8 or 9.
	sampled := strings.Replace(engine.FactsHistoryQuery, "held / 1000", "held / 3", 1)
	if sampled == engine.FactsHistoryQuery {
		t.Fatal("no \"held / 1000\" in the history query to sample with")
	}
	for _, query := range []string{engine.FactsHistoryQuery, sampled} {
		// One transaction: one snapshot of the backends' status.
		tx, err := conn.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var got [4]int
		if err := tx.QueryRow(ctx, query).Scan(&got[0], &got[1], &got[2], &got[3]); err != nil {
			t.Fatal(err)
		}
		rows, err := tx.Query(ctx, `select id, floor(extract(epoch from pg_stat_get_backend_start(id)) * 10)::bigint
			from pg_stat_get_backend_idset() as id where pg_stat_get_backend_dbid(id) <> 0 and pg_stat_get_backend_start(id) is not null`)
		if err != nil {
			t.Fatal(err)
		}
		backends, err := pgx.CollectRows(rows, pgx.RowToStructByPos[struct{ ID, Tenth int64 }])
		_ = tx.Rollback(ctx)
		if err != nil {
			t.Fatal(err)
		}
		k := 1
		if query == sampled {
			k = max(1, len(backends)/3)
		}
		want := [4]int{len(backends), k, 0, 0}
		for _, end := range backends {
			var second, tenth int
			for _, u := range backends {
				if u.ID%int64(k) != 0 || end.ID%int64(k) != 0 {
					continue
				}
				if u.Tenth/10 == end.Tenth/10 {
					second++
				}
				if u.Tenth == end.Tenth {
					tenth++
				}
			}
			want[2], want[3] = max(want[2], second), max(want[3], tenth)
		}
		if got != want {
			t.Errorf("history query (k %d) = %v, want %v (held, k, one second, one tenth) from the backends %v", k, got, want, backends)
		}
	}
}
