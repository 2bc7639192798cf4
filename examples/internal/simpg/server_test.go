package simpg

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstagger/pgstagger/internal/engine"
)

// These tests run the simulated server in a synctest bubble, as the demo
// does, and reach it through pgconn, as the fleet does.

func testModel() Model {
	return Model{
		Capacity:       []Point{{0, 100}, {100, 50}},
		IdleConnect:    Duration(15 * time.Millisecond), // 10ms fork + 5ms start-up
		MaxConnections: 1000,
		Backlog:        1000,
		Down:           Duration(time.Second),
		Starting:       Duration(time.Second),
		Cores:          2,
	}
}

func start(t *testing.T, m Model) *Server {
	t.Helper()
	s, err := New(m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func connect(ctx context.Context, t *testing.T, s *Server) (*pgconn.PgConn, error) {
	t.Helper()
	cfg, err := pgconn.ParseConfig(s.ConnString())
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc, cfg.LookupFunc = s.Dial, s.Lookup
	return pgconn.ConnectConfig(ctx, cfg)
}

func TestAnIdleConnectTakesTheModelsTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := start(t, testModel())
		begin := time.Now()
		c, err := connect(t.Context(), t, s)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		if got := time.Since(begin); got != 15*time.Millisecond {
			t.Errorf("idle connect took %v, want the model's 15ms", got)
		}
		if _, err := c.Exec(t.Context(), "select 1").ReadAll(); err != nil {
			t.Errorf("query: %v", err)
		}
	})
}

// saturate connects and closes from 8 clients for d and returns the
// connects per second.
func saturate(t *testing.T, s *Server, d time.Duration) float64 {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	defer cancel()
	var n atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for {
				c, err := connect(ctx, t, s)
				if err != nil {
					return
				}
				n.Add(1)
				c.Close(context.Background())
			}
		})
	}
	wg.Wait()
	return float64(n.Load()) / d.Seconds()
}

func TestCapacityFallsWithTheBackendsHeld(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := start(t, testModel())
		// The clients leave at once, so the server holds at most 8.
		if got := saturate(t, s, 10*time.Second); got < 90 || got > 100 {
			t.Errorf("capacity holding no backends %.1f/s, want about 100", got)
		}
		var held []*pgconn.PgConn
		for range 100 {
			c, err := connect(t.Context(), t, s)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, c)
		}
		if got := saturate(t, s, 10*time.Second); got < 45 || got > 50 {
			t.Errorf("capacity holding 100 backends %.1f/s, want about 50", got)
		}
		for _, c := range held {
			c.Close(context.Background())
		}
	})
}

func TestRestartEndsSessionsRefusesThenAnswersStartingUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := start(t, testModel())
		held, err := connect(t.Context(), t, s)
		if err != nil {
			t.Fatal(err)
		}
		restarted := make(chan error)
		go func() { restarted <- s.Restart() }()
		synctest.Wait()

		var pe *pgconn.PgError
		if _, err := held.Exec(t.Context(), "select 1").ReadAll(); !errors.As(err, &pe) || pe.Code != "57P01" {
			t.Errorf("query on a session the restart ended: %v, want 57P01", err)
		}
		time.Sleep(500 * time.Millisecond)
		if _, err := connect(t.Context(), t, s); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("connect while down: %v, want connection refused", err)
		}
		time.Sleep(time.Second) // 1.5s: starting
		if _, err := connect(t.Context(), t, s); !errors.As(err, &pe) || pe.Code != "57P03" {
			t.Errorf("connect while starting: %v, want 57P03", err)
		}
		if err := <-restarted; err != nil {
			t.Fatal(err)
		}
		c, err := connect(t.Context(), t, s)
		if err != nil {
			t.Fatalf("connect after the restart: %v", err)
		}
		c.Close(context.Background())
	})
}

// A fast shutdown ends its backends one at a time: the sessions end
// DownPerBackend apart, a new connection meanwhile is answered 57P03 (the
// system is shutting down), and the server refuses connections only once
// the last has ended.
func TestRestartEndsSessionsOneAtATime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := testModel()
		m.DownPerBackend = Duration(100 * time.Millisecond)
		s := start(t, m)
		var held []*pgconn.PgConn
		for range 4 {
			c, err := connect(t.Context(), t, s)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, c)
		}
		begin := time.Now()
		restarted := make(chan error)
		go func() { restarted <- s.Restart() }()
		ended := make(chan time.Duration, len(held))
		for _, c := range held {
			go func() {
				var pe *pgconn.PgError
				if err := c.WaitForNotification(context.Background()); !errors.As(err, &pe) || pe.Code != "57P01" {
					t.Errorf("session ended with %v, want 57P01", err)
				}
				ended <- time.Since(begin)
			}()
		}
		time.Sleep(150 * time.Millisecond)
		var pe *pgconn.PgError
		if _, err := connect(t.Context(), t, s); !errors.As(err, &pe) || pe.Code != "57P03" || pe.Message != "the database system is shutting down" {
			t.Errorf("connect while the backends exit: %v, want 57P03, shutting down", err)
		}
		var ends []time.Duration
		for range held {
			ends = append(ends, <-ended)
		}
		slices.Sort(ends)
		for i, d := range ends {
			if want := time.Duration(i+1) * 100 * time.Millisecond; d != want {
				t.Errorf("sessions ended at %v, want 100ms apart from the restart", ends)
				break
			}
		}
		if _, err := connect(t.Context(), t, s); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("connect once every session ended: %v, want connection refused", err)
		}
		if err := <-restarted; err != nil {
			t.Fatal(err)
		}
		if got, want := time.Since(begin), 400*time.Millisecond+time.Duration(m.Down+m.Starting); got != want {
			t.Errorf("restart took %v, want %v", got, want)
		}
	})
}

func TestTooManyClientsAfterTheFork(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := testModel()
		m.MaxConnections = 2
		s := start(t, m)
		for range 2 {
			c, err := connect(t.Context(), t, s)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close(context.Background())
		}
		begin := time.Now()
		var pe *pgconn.PgError
		if _, err := connect(t.Context(), t, s); !errors.As(err, &pe) || pe.Code != "53300" {
			t.Errorf("third connect: %v, want 53300", err)
		}
		// The fork holding 2 backends takes 10.2ms; the backend refuses
		// from the startup packet, before the 5ms of start-up, as
		// PostgreSQL's does.
		if got := time.Since(begin); got != 10200*time.Microsecond {
			t.Errorf("53300 came after %v, want after the fork (10.2ms)", got)
		}
	})
}

func TestAFullBacklogDropsTheSYN(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := testModel()
		m.Backlog = 1
		s := start(t, m)
		first, err := s.Dial(t.Context(), "tcp", "")
		if err != nil {
			t.Fatal(err)
		}
		defer first.Close()
		// The postmaster takes the first from the queue at once: fill it.
		synctest.Wait()
		second, err := s.Dial(t.Context(), "tcp", "")
		if err != nil {
			t.Fatal(err)
		}
		defer second.Close()
		begin := time.Now()
		third, err := s.Dial(t.Context(), "tcp", "")
		if err != nil {
			t.Fatal(err)
		}
		defer third.Close()
		// The fork of the first ends at 10ms and the postmaster takes the
		// second: the third's SYN, retransmitted at 1s, finds room.
		if got := time.Since(begin); got != time.Second {
			t.Errorf("dial into a full backlog took %v, want the first retransmission's 1s", got)
		}
	})
}

// A SYN dropped at every retransmission times out, as Linux's does after
// its six (tcp_syn_retries): 127s after the connect began.
func TestASYNDroppedSixTimesTimesOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := testModel()
		m.Backlog = 1
		m.Capacity = []Point{{0, 0.001}} // a fork of 1,000s
		s := start(t, m)
		for range 2 { // one forking, one in the queue
			c, err := s.Dial(t.Context(), "tcp", "")
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			synctest.Wait()
		}
		begin := time.Now()
		_, err := s.Dial(t.Context(), "tcp", "")
		if !errors.Is(err, syscall.ETIMEDOUT) {
			t.Errorf("dial into a backlog full for good: %v, want ETIMEDOUT", err)
		}
		if got := time.Since(begin); got != 127*time.Second {
			t.Errorf("it timed out after %v, want 127s (1+2+4+8+16+32+64)", got)
		}
	})
}

func TestFactsQueriesAnswerFromTheServersState(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := start(t, testModel())
		var conns []*pgconn.PgConn
		var c *pgconn.PgConn
		for _, wait := range []time.Duration{0, 0, 0, 200 * time.Millisecond, 2 * time.Second} {
			// Three in the first tenth of a second (15ms each), a fourth
			// in the same second, a fifth two seconds later.
			time.Sleep(wait)
			var err error
			if c, err = connect(t.Context(), t, s); err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
		ints := func(sql string) []string {
			rs, err := c.Exec(t.Context(), sql).ReadAll()
			if err != nil {
				t.Fatal(err)
			}
			var out []string
			for _, v := range rs[0].Rows[0] {
				out = append(out, string(v))
			}
			return out
		}
		if got := ints(engine.FactsQuery); len(got) != 1 || got[0] != "5" {
			t.Errorf("facts = %v, want [5]", got)
		}
		if got := ints(engine.FactsHistoryQuery); len(got) != 4 || got[0] != "5" || got[1] != "1" || got[2] != "4" || got[3] != "3" {
			t.Errorf("facts with history = %v, want [5 1 4 3]: all five counted, four started within one second, three within a tenth", got)
		}
		// The first three leave: their starts no longer count.
		for _, c := range conns[:3] {
			c.Close(context.Background())
		}
		synctest.Wait()
		if got := ints(engine.FactsHistoryQuery); len(got) != 4 || got[0] != "2" || got[1] != "1" || got[2] != "1" || got[3] != "1" {
			t.Errorf("facts with history after three left = %v, want [2 1 1 1]", got)
		}
		for _, c := range conns[3:] {
			c.Close(context.Background())
		}
		synctest.Wait()
		if n := s.Backends(); n != 0 {
			t.Errorf("%d backends after every client left, want 0", n)
		}
	})
}

func TestQueriesTakeTheirShareOfTheCPU(t *testing.T) {
	for _, perBackend := range []bool{true, false} {
		t.Run(fmt.Sprintf("per backend %v", perBackend), func(t *testing.T) { testQueriesShare(t, perBackend) })
	}
}

// testQueriesShare has 5ms of CPU a query come from QueryCPUPerBackend
// (one backend held) or from QueryCPU, 100 queries a second on one core:
// half of it.
func testQueriesShare(t *testing.T, perBackend bool) {
	synctest.Test(t, func(t *testing.T) {
		m := testModel()
		m.Cores = 1
		if perBackend {
			m.QueryCPUPerBackend = Duration(5 * time.Millisecond) // one backend held: 5ms a query
		} else {
			m.QueryCPU = Duration(5 * time.Millisecond)
		}
		s := start(t, m)
		busy, err := connect(t.Context(), t, s)
		if err != nil {
			t.Fatal(err)
		}
		defer busy.Close(context.Background())
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			defer close(done)
			for tick := time.NewTicker(10 * time.Millisecond); ctx.Err() == nil; <-tick.C {
				_, _ = busy.Exec(ctx, "select 1").ReadAll()
			}
		}()
		defer func() { cancel(); <-done }()
		time.Sleep(2 * time.Second)

		// A lone connect wakes the postmaster and then a backend: each
		// runs beside a Poisson number of queries with mean ½ on the one
		// core, drawn for each wake: 1.5 times as long as alone on
		// average, alone when neither found a query running (e^-1 of
		// the time), and at least twice as long when the fork found two
		// or more (9%).
		alone := (10100 + 5000) * time.Microsecond // 10.1ms of fork (1 backend held), 5ms of start-up
		const n = 1000
		var sum, quickest, slowest time.Duration
		for i := range n {
			begin := time.Now()
			c, err := connect(t.Context(), t, s)
			if err != nil {
				t.Fatal(err)
			}
			took := time.Since(begin)
			c.Close(context.Background())
			sum += took
			if i == 0 || took < quickest {
				quickest = took
			}
			slowest = max(slowest, took)
			// Apart, so that the second backend (its queries' CPU, with
			// QueryCPUPerBackend) is held for a fortieth of the time.
			time.Sleep(time.Second)
		}
		if mean, want := sum/n, 3*alone/2; mean < want-2*time.Millisecond || mean > want+2*time.Millisecond {
			t.Errorf("lone connects beside half a core of queries took %v on average, want about %v", mean, want)
		}
		if quickest > alone+time.Millisecond || slowest < 2*alone {
			t.Errorf("lone connects took %v to %v, want from %v (alone) to over %v", quickest, slowest, alone, 2*alone)
		}

		if perBackend {
			return // below, the backends held, and so the queries' CPU, vary
		}
		// A postmaster working through a queue gets its fair half of the
		// core: it forks half as fast, where a sleeper's 1.5 would leave
		// it 61-66/s. The clients close at once: the server holds 1-9
		// backends, a fork 10.1-10.9ms alone, 92-99/s.
		if got := saturate(t, s, 10*time.Second); got < 44 || got > 56 {
			t.Errorf("capacity beside half a core of queries %.1f/s, want about half the 92-99/s alone", got)
		}
	})
}

func TestACapacityScalesTheMachinesCosts(t *testing.T) {
	for _, c := range []struct {
		capacity string
		f        float64 // how much faster than Default at 0 backends
	}{{"1228", 4}, {"0:614,1500:400", 2}} {
		base := Default
		base.QueryCPU = Duration(80 * time.Microsecond)
		m, err := base.ParseCapacity(c.capacity)
		if err != nil {
			t.Fatalf("%s: %v", c.capacity, err)
		}
		for _, d := range []struct {
			name      string
			got, want Duration
		}{
			{"query", m.Query, base.Query},
			{"query CPU", m.QueryCPU, base.QueryCPU},
			{"query CPU per backend", m.QueryCPUPerBackend, base.QueryCPUPerBackend},
			{"exit", m.Exit, base.Exit},
			{"facts per backend", m.FactsPerBackend, base.FactsPerBackend},
			{"history per backend", m.HistoryPerBackend, base.HistoryPerBackend},
			{"down per backend", m.DownPerBackend, base.DownPerBackend},
		} {
			if want := Duration(float64(d.want) / c.f); d.got != want {
				t.Errorf("-capacity %s: %s %v, want %v (%g times as fast)", c.capacity, d.name, time.Duration(d.got), time.Duration(want), c.f)
			}
		}
		if m.Down != base.Down || m.IdleConnect != base.IdleConnect || m.Cores != base.Cores {
			t.Errorf("-capacity %s: down %v, idle connect %v, cores %d changed", c.capacity, time.Duration(m.Down), time.Duration(m.IdleConnect), m.Cores)
		}
	}
}

// TestWakesDrawTheirShareOfTheCPU checks the draw a woken process's
// stretch takes, max(1, (1+K)/cores) with K from poisson(u), against its
// expectation.
func TestWakesDrawTheirShareOfTheCPU(t *testing.T) {
	for _, cores := range []int{1, 2} {
		for _, u := range []float64{0.5, 1.2, 3} {
			const n = 200_000
			var sum float64
			for range n {
				sum += max(1, float64(1+poisson(u))/float64(cores))
			}
			if got, want := sum/n, sharedSlowdown(u, cores); math.Abs(got-want) > 0.01*want {
				t.Errorf("%d cores, %.1f busy: wakes stretched %.3f× on average, want %.3f×", cores, u, got, want)
			}
		}
	}
}

// sharedSlowdown is E[max(1, (1+K)/cores)] for K Poisson with mean u: how
// much slower, on average, a process runs beside K others on cores cores,
// each process at most one core.
func sharedSlowdown(u float64, cores int) float64 {
	if u <= 0 {
		return 1
	}
	c := float64(cores)
	p := math.Exp(-u) // P(K = 0)
	var sum, mass float64
	for k := 0; mass < 1-1e-12 && k < 10*cores+int(10*u)+50; k++ {
		sum += p * max(1, (1+float64(k))/c)
		mass += p
		p *= u / float64(k+1)
	}
	return sum + (1-mass)*max(1, (1+u)/c)
}

// Query answers on a session without the wire protocol what the backend
// answers through it, in the same time; a session a restart ended is gone,
// and its connection carries the 57P01; a query whose context
// ends returns its error.
func TestQueryAnswersAsTheProtocolDoes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := testModel()
		m.Query = Duration(5 * time.Millisecond)
		s := start(t, m)
		c, err := connect(t.Context(), t, s)
		if err != nil {
			t.Fatal(err)
		}
		pid := int(c.PID())
		for _, sql := range []string{"select 1", engine.FactsQuery, engine.FactsHistoryQuery} {
			begin := time.Now()
			rs, err := c.Exec(t.Context(), sql).ReadAll()
			if err != nil {
				t.Fatal(err)
			}
			overWire := time.Since(begin)
			var want []int
			for _, v := range rs[0].Rows[0] {
				n, err := strconv.Atoi(string(v))
				if err != nil {
					t.Fatal(err)
				}
				want = append(want, n)
			}
			begin = time.Now()
			got, err := s.Query(t.Context(), pid, sql)
			if err != nil || !slices.Equal(got, want) {
				t.Errorf("Query(%q) = %v, %v; want %v, as over the wire", sql, got, err, want)
			}
			if took := time.Since(begin); took != overWire {
				t.Errorf("Query(%q) took %v, want %v, as over the wire", sql, took, overWire)
			}
		}
		if _, err := s.Query(t.Context(), pid+1, "select 1"); !errors.Is(err, ErrNoSession) {
			t.Errorf("Query on no session: %v, want ErrNoSession", err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), time.Millisecond)
		defer cancel()
		if _, err := s.Query(ctx, pid, "select 1"); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Query past its deadline: %v, want context.DeadlineExceeded", err)
		}

		restarted := make(chan error)
		go func() { restarted <- s.Restart() }()
		synctest.Wait()
		if _, err := s.Query(t.Context(), pid, "select 1"); !errors.Is(err, ErrNoSession) {
			t.Errorf("Query on a session the restart ended: %v, want ErrNoSession", err)
		}
		var pe *pgconn.PgError
		if _, err := c.Exec(t.Context(), "select 1").ReadAll(); !errors.As(err, &pe) || pe.Code != "57P01" {
			t.Errorf("query on the ended session's connection: %v, want 57P01", err)
		}
		if err := <-restarted; err != nil {
			t.Fatal(err)
		}
	})
}
