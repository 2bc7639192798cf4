package pool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/dialer"
	"github.com/pgstagger/pgstagger/internal/oteltest"
)

// fast turns off the waits that are not under test: the startup delay,
// the rate limit and the pacer.
var fast = []Option{WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithResponseTarget(0)}

func newPool(t *testing.T, connString string, opts ...Option) *Pool {
	t.Helper()
	p, err := New(context.Background(), connString, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func TestHasEveryPgxpoolMethod(t *testing.T) {
	want := reflect.TypeOf(&pgxpool.Pool{})
	got := reflect.TypeOf(&Pool{})
	for i := range want.NumMethod() {
		m := want.Method(i)
		g, ok := got.MethodByName(m.Name)
		if !ok {
			t.Errorf("Pool lacks %s", m.Name)
			continue
		}
		// Compare signatures without the receiver.
		if !sameSignature(m.Type, g.Type) {
			t.Errorf("Pool.%s is %v, pgxpool's is %v", m.Name, g.Type, m.Type)
		}
	}
	if _, ok := got.MethodByName("Unwrap"); !ok {
		t.Errorf("Pool lacks Unwrap")
	}
}

func sameSignature(a, b reflect.Type) bool {
	if a.NumIn() != b.NumIn() || a.NumOut() != b.NumOut() || a.IsVariadic() != b.IsVariadic() {
		return false
	}
	for i := 1; i < a.NumIn(); i++ {
		if a.In(i) != b.In(i) {
			return false
		}
	}
	for i := range a.NumOut() {
		if a.Out(i) != b.Out(i) {
			return false
		}
	}
	return true
}

func TestNewDoesNotBlockOrConnect(t *testing.T) {
	before := db(t).ConnectionsReceived()
	p, err := New(context.Background(), db(t).ConnString("", "pool_min_conns=4"), WithStartupJitter(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got := db(t).ConnectionsReceived() - before; got != 0 {
		t.Errorf("New made %d connections; warm-up must wait for the startup delay", got)
	}
	if s := p.Dialer().Stats(); s.Dials != 0 {
		t.Errorf("dials = %d right after New", s.Dials)
	}
}

func TestInvalidInputFailsInNew(t *testing.T) {
	cases := []struct {
		name string
		conn string
		opts []Option
		want []string
	}{
		{"bad rate", db(t).ConnString(""), []Option{WithConnectRate(0, 1)}, []string{"WithConnectRate", "0"}},
		{"bad fleet", db(t).ConnString(""), []Option{WithFleet(-1, 10)}, []string{"WithFleet", "-1"}},
		{"bad lifetime jitter", db(t).ConnString(""), []Option{WithLifetimeJitter(-time.Second)}, []string{"WithLifetimeJitter", "-1s"}},
		{"bad max connecting", db(t).ConnString(""), []Option{WithMaxConnecting(-2)}, []string{"WithMaxConnecting", "-2"}},
		{"bad pool setting", "postgres://u:hunter2pw@127.0.0.1/x?pool_max_conns=zero", nil, []string{"pool_max_conns"}},
		{"bad port", "postgres://u:hunter2pw@127.0.0.1:notaport/x", nil, []string{"connection string"}},
		{"min above max", db(t).ConnString("", "pool_min_conns=9", "pool_max_conns=4"), nil, []string{"MinConns 9", "MaxConns 4"}},
		{"bad fleet parameter", db(t).ConnString("", "pgstagger_fleet_size=many", "pgstagger_fleet_budget=5"), nil, []string{"pgstagger_fleet_size", "many"}},
		{"member beyond the fleet", db(t).ConnString("", "pgstagger_fleet_size=4", "pgstagger_fleet_budget=5"), []Option{WithFleetMember(4)}, []string{"WithFleetMember(4)", "fleet size (4)"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := New(context.Background(), c.conn, c.opts...)
			if err == nil {
				p.Close()
				t.Fatal("New succeeded")
			}
			if !errors.Is(err, dialer.ErrInvalidOption) {
				t.Errorf("err = %v, want ErrInvalidOption", err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "hunter2pw") || strings.Contains(err.Error(), db(t).Password()) {
				t.Errorf("error leaks the password: %v", err)
			}
		})
	}
	cfg, err := pgxpool.ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 0
	if _, err := NewWithConfig(context.Background(), cfg); !errors.Is(err, dialer.ErrInvalidOption) || !strings.Contains(err.Error(), "MaxConns 0") {
		t.Errorf("MaxConns 0: err = %v", err)
	}
}

func TestDropInMethods(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, db(t).ConnString("", "pool_max_conns=4"), fast...)
	if _, err := p.Exec(ctx, "create table if not exists items(id int primary key, name text)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = p.Exec(ctx, "drop table items") })
	n, err := p.CopyFrom(ctx, pgx.Identifier{"items"}, []string{"id", "name"},
		pgx.CopyFromRows([][]any{{1, "a"}, {2, "b"}, {3, "c"}}))
	if err != nil || n != 3 {
		t.Fatalf("CopyFrom = %d, %v", n, err)
	}
	var name string
	if err := p.QueryRow(ctx, "select name from items where id = $1", 2).Scan(&name); err != nil || name != "b" {
		t.Fatalf("QueryRow = %q, %v", name, err)
	}
	if err := p.QueryRow(ctx, "select name from items where id = 99").Scan(&name); !errors.Is(err, pgx.ErrNoRows) {
		t.Fatalf("QueryRow no rows: %v", err)
	}
	rows, err := p.Query(ctx, "select id from items order by id")
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil || len(ids) != 3 {
		t.Fatalf("Query = %v, %v", ids, err)
	}
	tx, err := p.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "insert into items values (4, 'd')"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	b := &pgx.Batch{}
	b.Queue("select count(*) from items")
	b.Queue("select 42")
	br := p.SendBatch(ctx, b)
	var count, answer int
	if err := br.QueryRow().Scan(&count); err != nil || count != 4 {
		t.Fatalf("batch count = %d, %v", count, err)
	}
	if err := br.QueryRow().Scan(&answer); err != nil || answer != 42 {
		t.Fatalf("batch answer = %d, %v", answer, err)
	}
	if err := br.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.AcquireFunc(ctx, func(c *pgxpool.Conn) error { return c.Ping(ctx) }); err != nil {
		t.Fatal(err)
	}
	// Everything above released its connection.
	if s := p.Stat(); s.AcquiredConns() != 0 {
		t.Errorf("%d connections still acquired", s.AcquiredConns())
	}
	idle := p.AcquireAllIdle(ctx)
	if len(idle) == 0 {
		t.Errorf("AcquireAllIdle returned nothing")
	}
	for _, c := range idle {
		c.Release()
	}
	p.Reset()
	if s := p.Stat(); s.TotalConns() != 0 {
		t.Errorf("after Reset: %d connections", s.TotalConns())
	}
	if got := p.Config().ConnString(); got != db(t).ConnString("", "pool_max_conns=4") {
		t.Errorf("Config().ConnString() = %q", got)
	}
	if tr := p.Config().ConnConfig.Tracer; tr != nil {
		t.Errorf("Config() shows tracer %T; it must be the caller's configuration, without the gate", tr)
	}
}

func TestBatchTransactionReleasesOnCommit(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, db(t).ConnString(""), fast...)
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{})
	b.Queue("select 1")
	br := p.SendBatch(ctx, b)
	tx := br.Tx()
	if tx == nil {
		t.Fatal("batch began no transaction")
	}
	if err := br.Close(); err != nil {
		t.Fatal(err)
	}
	if s := p.Stat(); s.AcquiredConns() != 1 {
		t.Errorf("after Close, before Commit: %d acquired, want the transaction's 1", s.AcquiredConns())
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if s := p.Stat(); s.AcquiredConns() != 0 {
		t.Errorf("after Commit: %d acquired, want 0", s.AcquiredConns())
	}
}

func TestUnwrapIsGatedToo(t *testing.T) {
	p := newPool(t, db(t).ConnString(""), fast...)
	sqlDB := stdlib.OpenDBFromPool(p.Unwrap())
	defer sqlDB.Close()
	if err := sqlDB.Ping(); err != nil {
		t.Fatal(err)
	}
	if s := p.Dialer().Stats(); s.Dials != 1 || s.OK != 1 {
		t.Errorf("gate stats = %+v, want the database/sql connection to pass the gate", s)
	}
}

func TestStartupJitterBoundsAcquireByItsDeadline(t *testing.T) {
	const window = 2 * time.Second
	before := db(t).ConnectionsReceived()
	start := time.Now()
	p := newPool(t, db(t).ConnString(""), WithStartupJitter(window),
		WithDialerOptions(dialer.WithRand(func() float64 { return 0.5 })))
	release := start.Add(window / 2)

	// A caller whose deadline comes before the release is answered at once.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := p.Acquire(ctx)
	if !errors.Is(err, dialer.ErrShed) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("acquire with a short deadline: %v, want shed", err)
	}
	if got := db(t).ConnectionsReceived() - before; got != 0 {
		t.Errorf("a shed acquire made %d server connections", got)
	}
	// One without a deadline waits for the release and gets a connection.
	c, err := p.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c.Release()
	if at := time.Now(); at.Before(release) {
		t.Errorf("acquired at +%v, before the release at +%v", at.Sub(start), window/2)
	}
	// Two jitter waits: the shed caller's connection was made too, in the
	// background (see TestShedCallersConnectionIsMadeInTheBackground).
	if s := p.Dialer().Stats(); s.Shed != 1 || s.JitterWait.Count != 2 {
		t.Errorf("stats = %+v, want one shed and two jitter waits", s)
	}
}

// The gate sheds a caller whose deadline its wait cannot fit, not the
// connection: as pgxpool makes a connection whose caller gave up, the pool
// makes it in the background, through the gate's wait, and keeps it idle.
func TestShedCallersConnectionIsMadeInTheBackground(t *testing.T) {
	const window = 2 * time.Second
	cfg, err := pgxpool.ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	made := make(chan time.Time, 4)
	cfg.AfterConnect = func(context.Context, *pgx.Conn) error { made <- time.Now(); return nil }
	start := time.Now()
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(window),
		WithDialerOptions(dialer.WithRand(func() float64 { return 0.5 })))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Two callers shed while the first one's connection is being made:
	// one background connection, not two.
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		_, err := p.Acquire(ctx)
		cancel()
		if !errors.Is(err, dialer.ErrShed) {
			t.Fatalf("acquire with a short deadline: %v, want shed", err)
		}
	}
	select {
	case at := <-made:
		if at.Before(start.Add(window / 2)) {
			t.Errorf("made at +%v, before the startup delay's end at +%v", at.Sub(start), window/2)
		}
	case <-time.After(3 * window):
		t.Fatal("no connection made after the shed acquires")
	}
	// The shed establishments and the background one; a second background
	// one would have begun its wait long before the first ended.
	if s := p.Dialer().Stats(); s.Shed != 2 || s.OK != 1 || s.Establishments != 3 {
		t.Errorf("stats = %+v, want two shed, three establishments and one connection", s)
	}
}

func TestWarmUpIsPacedThroughTheGate(t *testing.T) {
	const minConns, r = 6, 25.0
	cfg, err := pgxpool.ParseConfig(db(t).ConnString("", "pool_max_conns=8"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinConns = minConns
	var mu sync.Mutex
	var dials []time.Time
	done := make(chan struct{})
	var nd net.Dialer
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		dials = append(dials, time.Now())
		if len(dials) == minConns {
			close(done)
		}
		mu.Unlock()
		return nd.DialContext(ctx, network, addr)
	}
	start := time.Now()
	p, err := NewWithConfig(context.Background(), cfg, WithStartupJitter(0), WithConnectRate(r, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("warm-up made %d of %d connections", len(dials), minConns)
	}
	mu.Lock()
	defer mu.Unlock()
	// The bucket, made after start, holds one token and gains one every
	// 1/r: dial k cannot come before start + k/r (see the dialer's
	// TestBucketHoldsAgainstRealServer for why not measured from dial 0).
	for k := 1; k < len(dials); k++ {
		if gap := dials[k].Sub(start); gap < time.Duration(float64(k)/r*float64(time.Second))-100*time.Microsecond {
			t.Errorf("warm-up dial %d at +%v: faster than %v/s", k, gap, r)
		}
	}
	if p.Dialer().Plan().Warm != minConns {
		t.Errorf("plan warm = %d, want MinConns %d", p.Dialer().Plan().Warm, minConns)
	}
}

func TestConnectFailuresAreRetriedQueryErrorsAreNot(t *testing.T) {
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	refused := make(chan struct{})
	var once sync.Once
	var nd net.Dialer
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := nd.DialContext(ctx, network, addr)
		if err != nil {
			once.Do(func() { close(refused) })
		}
		return c, err
	}
	p, err := NewWithConfig(ctx, cfg, append(fast,
		WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(30 * time.Millisecond) }))...)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	// A query error is returned as it is.
	_, err = p.Exec(ctx, "select 1/0")
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "22012" {
		t.Fatalf("err = %v, want division by zero", err)
	}
	// So is a connection lost during a query, though 57P01 is transient
	// when it comes while connecting.
	before := p.Dialer().Stats()
	_, err = p.Exec(ctx, "select pg_terminate_backend(pg_backend_pid())")
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" {
		t.Fatalf("err = %v, want 57P01 from the terminated session", err)
	}
	if s := p.Dialer().Stats(); s.Retries != before.Retries || s.Establishments != before.Establishments {
		t.Errorf("a query error was retried: before %+v, after %+v", before, s)
	}

	// Connect failures while the server is down are retried until it is back.
	p.Reset()
	if err := db(t).Stop(); err != nil {
		t.Fatal(err)
	}
	restarted := make(chan error, 1)
	go func() {
		<-refused // the pool has failed to connect at least once
		restarted <- db(t).Start()
	}()
	var one int
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = p.QueryRow(qctx, "select 1").Scan(&one)
	if serr := <-restarted; serr != nil {
		t.Fatal(serr)
	}
	if err != nil || one != 1 {
		t.Fatalf("QueryRow across a restart: %d, %v", one, err)
	}
	if s := p.Dialer().Stats(); s.Retries == before.Retries || s.Transient == before.Transient {
		t.Errorf("no retry recorded across the restart: %+v", s)
	}
}

func TestAuthenticationFailureAndUnknownDatabaseAreOneAttempt(t *testing.T) {
	cases := []struct {
		name, url, sqlstate, says string
	}{
		{"wrong password", db(t).ConnStringAs(db(t).User(), "not-the-password-0x", ""), "28P01", "password authentication failed"},
		{"unknown database", db(t).ConnString("no_such_db_0x"), "3D000", `database "no_such_db_0x" does not exist`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := newPool(t, c.url, fast...)
			before := db(t).ConnectionsReceived()
			err := p.Ping(context.Background())
			if dialer.Classify(err) != dialer.Permanent {
				t.Fatalf("err = %v (%v), want a permanent failure", err, dialer.Classify(err))
			}
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || pe.Code != c.sqlstate || !strings.Contains(err.Error(), c.says) {
				t.Errorf("err = %v, want SQLSTATE %s saying %q", err, c.sqlstate, c.says)
			}
			if s := p.Dialer().Stats(); s.Establishments != 1 || s.Retries != 0 {
				t.Errorf("stats = %+v, want exactly one attempt", s)
			}
			if got := db(t).WaitConnectionsReceived(before+1, 5*time.Second) - before; got != 1 {
				t.Errorf("server saw %d connections, want 1", got)
			}
			if pw := "not-the-password-0x"; strings.Contains(err.Error(), pw) || strings.Contains(err.Error(), db(t).Password()) {
				t.Errorf("error leaks a password: %v", err)
			}
		})
	}
}

func TestUserHooksAndTracerKeepWorking(t *testing.T) {
	cfg, err := pgxpool.ParseConfig(db(t).ConnString("", "pool_max_conns=1"))
	if err != nil {
		t.Fatal(err)
	}
	var calls sync.Map
	count := func(name string) {
		n, _ := calls.LoadOrStore(name, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
	}
	got := func(name string) int32 {
		n, ok := calls.Load(name)
		if !ok {
			return 0
		}
		return n.(*atomic.Int32).Load()
	}
	var nd net.Dialer
	ht := &oteltest.HookTracer{}
	cfg.ConnConfig.Tracer = ht
	cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		count("DialFunc")
		return nd.DialContext(ctx, network, addr)
	}
	cfg.ConnConfig.LookupFunc = func(ctx context.Context, host string) ([]string, error) {
		count("LookupFunc")
		return []string{host}, nil
	}
	cfg.BeforeConnect = func(context.Context, *pgx.ConnConfig) error { count("BeforeConnect"); return nil }
	cfg.AfterConnect = func(context.Context, *pgx.Conn) error { count("AfterConnect"); return nil }
	cfg.PrepareConn = func(context.Context, *pgx.Conn) (bool, error) { count("PrepareConn"); return true, nil }
	released := make(chan struct{}, 1)
	cfg.AfterRelease = func(*pgx.Conn) bool { count("AfterRelease"); released <- struct{}{}; return true }
	cfg.BeforeClose = func(*pgx.Conn) { count("BeforeClose") }
	cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { count("ShouldPing"); return false }
	onPgError := cfg.ConnConfig.OnPgError
	cfg.ConnConfig.OnPgError = func(c *pgconn.PgConn, e *pgconn.PgError) bool { count("OnPgError"); return onPgError(c, e) }

	p, err := NewWithConfig(context.Background(), cfg, fast...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Exec(context.Background(), "select 1"); err != nil {
		t.Fatal(err)
	}
	<-released // pgxpool calls AfterRelease in a goroutine
	if _, err := p.Exec(context.Background(), "select 1/0"); err == nil {
		t.Fatal("division by zero succeeded")
	}
	<-released
	p.Close()
	want := map[string]int32{"DialFunc": 1, "LookupFunc": 1, "BeforeConnect": 1, "AfterConnect": 1, "BeforeClose": 1,
		"PrepareConn": 2, "AfterRelease": 2, "ShouldPing": 2, "OnPgError": 1}
	for h, w := range want {
		if n := got(h); n != w {
			t.Errorf("%s called %d times, want %d", h, n, w)
		}
	}
	if ht.Connects.Load() != 1 || ht.Queries.Load() != 2 || ht.Acquires.Load() != 2 {
		t.Errorf("user tracer: %d connects, %d queries, %d acquires; want 1, 2 (the caller's, not the facts read) and 2",
			ht.Connects.Load(), ht.Queries.Load(), ht.Acquires.Load())
	}
	if s := p.Dialer().Stats(); s.Dials != 1 {
		t.Errorf("gate dials = %d, want 1", s.Dials)
	}
}

func TestDeprecatedBeforeAcquireStillWorks(t *testing.T) {
	cfg, err := pgxpool.ParseConfig(db(t).ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	var called atomic.Int32
	//lint:ignore SA1019 testing that the deprecated hook keeps working
	cfg.BeforeAcquire = func(context.Context, *pgx.Conn) bool { called.Add(1); return true }
	p, err := NewWithConfig(context.Background(), cfg, fast...)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	if called.Load() != 1 {
		t.Errorf("BeforeAcquire called %d times, want 1", called.Load())
	}
}

// An operator sets the fleet in DATABASE_URL; the server never sees the
// parameters (it would refuse a connection that set them).
func TestFleetFromTheConnectionString(t *testing.T) {
	ctx := context.Background()
	p, err := New(ctx, db(t).ConnString("", "pgstagger_fleet_size=3", "pgstagger_fleet_budget=300", "pgstagger_fleet_member=2", "pool_max_conns=2"),
		WithResponseTarget(0))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	plan := p.Dialer().Plan()
	if plan.FleetSize != 3 || plan.FleetBudget != 300 || plan.FleetMember != 2 || plan.StartupWindow != 10*time.Millisecond {
		t.Errorf("plan = %+v, want fleet 3 at 300/s, member 2, window 10ms", plan)
	}
	if got := p.Config().ConnConfig.RuntimeParams; got["pgstagger_fleet_size"] != "3" {
		t.Errorf("Config().ConnConfig.RuntimeParams = %v, want the caller's configuration as given", got)
	}
}

func TestNewWithConfigRefusesAConfigNotMadeByParseConfig(t *testing.T) {
	ctx := context.Background()
	parsed, err := pgx.ParseConfig("postgres://u:secret@127.0.0.1/x")
	if err != nil {
		t.Fatal(err)
	}
	replaced, err := pgxpool.ParseConfig("postgres://u:secret@127.0.0.1/x")
	if err != nil {
		t.Fatal(err)
	}
	replaced.ConnConfig = &pgx.ConnConfig{Config: parsed.Config}
	for name, cfg := range map[string]*pgxpool.Config{
		"zero":                                 {},
		"a parsed ConnConfig in a literal":     {ConnConfig: parsed, MaxConns: 4},
		"a parsed config with a literal inner": replaced,
	} {
		p, err := NewWithConfig(ctx, cfg)
		if p != nil {
			p.Close()
		}
		if !errors.Is(err, dialer.ErrInvalidOption) || !strings.Contains(fmt.Sprint(err), "not made by pgxpool.ParseConfig") {
			t.Errorf("%s: err = %v; want ErrInvalidOption saying it was not made by pgxpool.ParseConfig", name, err)
		}
		if strings.Contains(fmt.Sprint(err), "secret") {
			t.Errorf("%s: the error shows the password: %v", name, err)
		}
	}
	if _, err := NewWithConfig(ctx, nil); !errors.Is(err, dialer.ErrInvalidOption) || !strings.Contains(err.Error(), "nil *pgxpool.Config") {
		t.Errorf("nil config: err = %v", err)
	}
}
