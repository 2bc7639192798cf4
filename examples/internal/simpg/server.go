// Package simpg is a simulated PostgreSQL server for the stampede demo's
// -simulate mode. Its postmaster forks one backend at a time from a listen
// queue, each fork taking longer the more backends it holds; a full queue
// drops the SYN, and the client's kernel retransmits it after 1s, 2s, 4s,
// ..., and gives up after six, as Linux's does. Its backends answer a
// client's startup message at once, refusing it past max_connections (53300)
// or while the server starts (57P03) or else asking for its authentication,
// then start up beside the queue, speak enough of the wire protocol for pgx
// (the simple query protocol), and answer pgstagger's server facts queries
// from the server's state. A restart ends the sessions one at a time (57P01)
// while it answers new connections 57P03, then refuses connections, then
// answers 57P03 again. The queries and backend exits of the last second take
// their share of the machine's CPU: a postmaster working through a queue
// forks slower by that share, while a process woken to do a little work (the
// fork of a connection that found the postmaster waiting, a backend's
// start-up, a query) waits only while more run than there are cores. The
// numbers are a [Model]'s.
//
// It keeps time with the time package, so that in a testing/synctest bubble
// a fleet of any size runs against it on simulated time, through the real
// pgx, pgxpool and pgstagger code: its connections are in memory, and every
// wait is durably blocking.
package simpg

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgstagger/pgstagger/internal/engine"
)

// Server is a simulated PostgreSQL server.
type Server struct {
	m    Model
	addr net.Addr

	mu       sync.Mutex
	wake     sync.Cond         // the postmaster waits on it for a connection
	queue    []*pending        // guarded by mu: accepted, waiting for the postmaster
	state    state             // guarded by mu
	gen      int               // guarded by mu: restarts so far
	backends map[int]*pending  // guarded by mu: client backends by process ID
	starts   map[int64]int     // guarded by mu: client backends by the tenth of a second they started
	seconds  map[int64]int     // guarded by mu: the same by the second, for the history query
	pids     int               // guarded by mu: backends forked, for their pids
	cpu      [10]time.Duration // guarded by mu: the queries' CPU in each tenth of the last second
	cpuSlot  int64             // guarded by mu: the tenth of a second cpu's newest slot is
	closed   bool              // guarded by mu
	done     chan struct{}     // closed when the postmaster has stopped
}

type state int

const (
	up state = iota
	stopping
	down
	starting
)

// pending is a connection from its accept on.
type pending struct {
	conn    *end
	gen     int   // the server's life it belongs to
	pid     int   // as a backend: its process ID
	started int64 // as a backend: the tenth of a second it started (guarded by the server's mu)
}

// New starts a server doing what m says. Close stops it.
func New(m Model) (*Server, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	s := &Server{
		m:        m,
		addr:     &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 5432},
		backends: map[int]*pending{},
		starts:   map[int64]int{},
		seconds:  map[int64]int{},
		done:     make(chan struct{}),
	}
	s.wake.L = &s.mu
	go s.postmaster()
	return s, nil
}

// ConnString is a connection string for the server: its host is never
// resolved nor dialed, since the config's DialFunc and LookupFunc must be
// set to [Server.Dial] and [Server.Lookup], and it asks pgx for the simple
// query protocol, the only one the server speaks, and so for no statement
// caches (each a preallocated map: a fifth of a 10,000-worker simulation's
// CPU).
func (s *Server) ConnString() string {
	return "postgres://sim@simulated:5432/postgres?sslmode=disable&default_query_exec_mode=simple_protocol&statement_cache_capacity=0&description_cache_capacity=0"
}

// Lookup resolves every host to the server's address.
func (s *Server) Lookup(context.Context, string) ([]string, error) {
	return []string{s.addr.(*net.TCPAddr).IP.String()}, nil
}

// synRetries is Linux's net.ipv4.tcp_syn_retries, 6 by default: a SYN
// the server drops is sent again after 1s, 2s, 4s, ... six times, and the
// connect fails with ETIMEDOUT 127s after it began.
const synRetries = 6

// Dial connects to the server: refused while it is down; otherwise the
// connection waits in the listen queue for the postmaster. A full queue
// drops the SYN, and the dial waits for the kernel's retransmissions, then
// times out as Linux's does (synRetries).
func (s *Server) Dial(ctx context.Context, network, _ string) (net.Conn, error) {
	rto := time.Second
	for sent := 0; ; sent++ {
		s.mu.Lock()
		switch {
		case s.closed || s.state == down:
			s.mu.Unlock()
			return nil, &net.OpError{Op: "dial", Net: network, Addr: s.addr, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
		case len(s.queue) < s.m.Backlog:
			client, server := pipe(&net.TCPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 40000}, s.addr)
			s.queue = append(s.queue, &pending{conn: server.(*end), gen: s.gen})
			s.wake.Signal()
			s.mu.Unlock()
			return client, nil
		}
		s.mu.Unlock()
		t := time.NewTimer(rto)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, &net.OpError{Op: "dial", Net: network, Addr: s.addr, Err: ctx.Err()}
		case <-t.C:
		}
		if sent == synRetries {
			return nil, &net.OpError{Op: "dial", Net: network, Addr: s.addr, Err: os.NewSyscallError("connect", syscall.ETIMEDOUT)}
		}
		rto *= 2
	}
}

// postmaster forks a backend for each connection in the listen queue, one
// at a time, each fork taking the model's time for the backends held.
func (s *Server) postmaster() {
	defer close(s.done)
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		waited := false // a sleeper the scheduler runs at once, not a runner
		for len(s.queue) == 0 && !s.closed {
			s.wake.Wait()
			waited = true
		}
		if s.closed {
			return
		}
		p := s.queue[0]
		s.queue[0] = nil
		s.queue = s.queue[1:]
		took := s.stretched(s.m.ServiceTime(len(s.backends)), !waited)
		s.mu.Unlock()
		time.Sleep(took)
		s.mu.Lock()
		if p.gen != s.gen {
			// The server restarted during the fork: the listen
			// socket it came through is gone.
			_ = p.conn.reset()
			continue
		}
		s.pids++
		go s.backend(p, s.pids)
	}
}

// backend reads p's startup message, answers its authentication at once
// (as a server's scram-sha-256 request comes straight after the fork),
// starts up, then serves p's client until it leaves or the server
// restarts.
func (s *Server) backend(p *pending, pid int) {
	be := pgproto3.NewBackend(p.conn, p.conn)
	msg, err := be.ReceiveStartupMessage()
	for err == nil {
		if _, ok := msg.(*pgproto3.SSLRequest); !ok {
			break
		}
		if _, err = p.conn.Write([]byte{'N'}); err == nil {
			msg, err = be.ReceiveStartupMessage()
		}
	}
	if _, ok := msg.(*pgproto3.StartupMessage); err != nil || !ok {
		// A CancelRequest (which cancels nothing here), or a client
		// that left.
		_ = p.conn.Close()
		return
	}
	s.mu.Lock()
	var fatal *pgproto3.ErrorResponse
	started := time.Now().UnixMilli() / 100
	switch {
	case p.gen != s.gen:
		s.mu.Unlock()
		_ = p.conn.reset()
		return
	case s.state == starting:
		fatal = &pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P03", Message: "the database system is starting up"}
	case s.state == stopping:
		fatal = &pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P03", Message: "the database system is shutting down"}
	case len(s.backends) >= s.m.MaxConnections:
		fatal = &pgproto3.ErrorResponse{Severity: "FATAL", Code: "53300", Message: "sorry, too many clients already"}
	default:
		p.pid, p.started = pid, started
		s.backends[pid] = p
		s.starts[started]++
		s.seconds[started/10]++
	}
	s.mu.Unlock()
	if fatal != nil {
		be.Send(fatal)
		_ = be.Flush()
		_ = p.conn.Close()
		return
	}
	defer s.exit(p)

	be.Send(&pgproto3.AuthenticationOk{})
	if be.Flush() != nil {
		return
	}
	s.mu.Lock()
	startup := s.stretched(s.m.startup(), false)
	s.mu.Unlock()
	time.Sleep(startup)
	for _, kv := range [][2]string{{"server_version", "15.0 (simulated)"}, {"client_encoding", "UTF8"}, {"standard_conforming_strings", "on"}, {"DateStyle", "ISO, MDY"}} {
		be.Send(&pgproto3.ParameterStatus{Name: kv[0], Value: kv[1]})
	}
	be.Send(&pgproto3.BackendKeyData{ProcessID: uint32(pid), SecretKey: []byte{0, 0, 0, 7}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if be.Flush() != nil {
		return
	}
	// The session's Backend, and the 8 KiB buffer pgproto3 keeps with
	// it, come with the client's first message, not before: the idle
	// sessions of a simulated fleet (the stampede demo's lite client
	// sends none) would each hold one.
	be = nil
	failed := false // in an extended-protocol batch that failed: skip to Sync
	for {
		if be == nil {
			p.conn.wait()
			be = pgproto3.NewBackend(p.conn, p.conn)
		}
		msg, err := be.Receive()
		if err != nil {
			return
		}
		switch msg := msg.(type) {
		case *pgproto3.Query:
			s.mu.Lock()
			took := s.run(msg.String)
			s.mu.Unlock()
			time.Sleep(took)
			s.mu.Lock()
			vals := s.values(msg.String)
			s.mu.Unlock()
			answer(be, vals)
		case *pgproto3.Sync:
			failed = false
			be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		case *pgproto3.Terminate:
			return
		default:
			if !failed {
				failed = true
				be.Send(&pgproto3.ErrorResponse{Severity: "ERROR", Code: "0A000", Message: "simulated server: simple query protocol only (default_query_exec_mode=simple_protocol)"})
			}
			continue
		}
		if be.Flush() != nil {
			return
		}
	}
}

// ErrNoSession is Query's error when the backend has no session: it
// ended, and if a restart ended it, its 57P01 waits on its connection for
// its client to read.
var ErrNoSession = errors.New("simpg: no session with that process ID")

// Query runs sql on backend pid's session and returns its reply's one
// row, as the backend does for a simple query on the session's
// connection, taking the same time and CPU: for a client that does
// without the wire protocol for its queries (the stampede demo's lite
// client, whose 100,000 workers' queries would otherwise cost their
// goroutine switches and the protocol's encoding twice over). Its errors
// are ErrNoSession, with the connection to read instead, and ctx's, with the
// query abandoned: its client closes the connection, as pgconn does.
func (s *Server) Query(ctx context.Context, pid int, sql string) ([]int, error) {
	s.mu.Lock()
	p, ok := s.backends[pid]
	if !ok {
		s.mu.Unlock()
		return nil, ErrNoSession
	}
	took := s.run(sql)
	s.mu.Unlock()
	t := time.NewTimer(took)
	select {
	case <-ctx.Done():
		t.Stop()
		return nil, ctx.Err()
	case <-t.C:
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.backends[pid] != p {
		return nil, ErrNoSession // ended while it ran
	}
	return s.values(sql), nil
}

// run accounts for a query's CPU and returns how long it takes; s.mu is
// held.
func (s *Server) run(sql string) time.Duration {
	var extra time.Duration
	switch sql {
	case engine.FactsQuery:
		extra = time.Duration(s.m.FactsPerBackend) * time.Duration(len(s.backends))
	case engine.FactsHistoryQuery:
		// The count's scan of every backend, and the history's work on
		// the sample.
		n, k := len(s.backends), historySample(len(s.backends))
		extra = time.Duration(s.m.FactsPerBackend)*time.Duration(n) + time.Duration(s.m.HistoryPerBackend-s.m.FactsPerBackend)*time.Duration((n+k-1)/k)
	}
	s.spend(time.Duration(s.m.QueryCPU) + time.Duration(s.m.QueryCPUPerBackend)*time.Duration(len(s.backends)) + extra)
	return s.stretched(time.Duration(s.m.Query)+extra, false)
}

// spend counts d of CPU taken now; s.mu is held.
func (s *Server) spend(d time.Duration) {
	s.advance()
	s.cpu[s.cpuSlot%int64(len(s.cpu))] += d
}

// advance moves cpu's window to now; s.mu is held.
func (s *Server) advance() {
	now := time.Now().UnixNano() / int64(100*time.Millisecond)
	for ; s.cpuSlot < now; s.cpuSlot++ {
		if now-s.cpuSlot > int64(len(s.cpu)) {
			clear(s.cpu[:])
			s.cpuSlot = now
			break
		}
		s.cpu[(s.cpuSlot+1)%int64(len(s.cpu))] = 0
	}
}

// stretched is how long d of a process's CPU work takes on a machine
// whose queries and exits of the last second kept u of its cores busy;
// s.mu is held. The scheduler treats two kinds of process differently
// (Linux's CFS does):
//
//   - A runner, always runnable, gets its fair share and no more: the
//     postmaster working through a queue of connections. Its work takes
//     d / (1 − u/Cores), u/Cores at most 95%: the rate at which it forks
//     falls by the load's share of the machine, as the calibration
//     measures it ([Model].QueryCPU comes from that fall).
//   - A sleeper, woken to do a little work, runs at once on a free core
//     and shares one only while more processes run than there are
//     cores: the postmaster woken by a connection that found it
//     waiting, a backend starting up, a query. The load's processes are
//     short and independent, so the number running when it wakes is K,
//     Poisson with mean u, drawn for each wake, and d takes
//     d × max(1, (1+K)/Cores): on average d × E[max(1, (1+K)/Cores)],
//     with the tail an unlucky wake has.
//
// Measured on a 2-core machine with 400 workers querying every 100ms
// (about 1.2 of its cores), an unrelated client's connects took 1.0-1.5
// times their idle time; d / (1 − u/Cores) for every process made them
// 2.3-2.7 times, the sleeper's rule 1.4 times (BENCHMARKS.md).
func (s *Server) stretched(d time.Duration, runner bool) time.Duration {
	u := s.busy()
	if runner {
		return time.Duration(float64(d) / (1 - min(0.95, u/float64(s.m.Cores))))
	}
	return time.Duration(float64(d) * max(1, float64(1+poisson(u))/float64(s.m.Cores)))
}

// busy is how many cores the queries and exits of the last second kept
// busy; s.mu is held.
func (s *Server) busy() float64 {
	s.advance()
	var used time.Duration
	for _, c := range s.cpu {
		used += c
	}
	return used.Seconds()
}

// poisson draws from the Poisson distribution with mean u (Knuth's
// method; u here is a few cores at most).
func poisson(u float64) int {
	if u <= 0 {
		return 0
	}
	limit, p := math.Exp(-u), rand.Float64()
	k := 0
	for p > limit {
		p *= rand.Float64()
		k++
	}
	return k
}

// values is the one row a simple query returns: pgstagger's facts from the
// server's state, 1 to anything else; s.mu is held.
func (s *Server) values(sql string) []int {
	switch sql {
	case engine.FactsQuery:
		return []int{len(s.backends)}
	case engine.FactsHistoryQuery:
		most, tenth := 0, 0
		for _, n := range s.seconds {
			most = max(most, n)
		}
		for _, n := range s.starts {
			tenth = max(tenth, n)
		}
		// The sample's counts as expected, not drawn: every k-th backend
		// of those started in one second is a k-th of them.
		k := historySample(len(s.backends))
		return []int{len(s.backends), k, (most + k/2) / k, (tenth + k/2) / k}
	}
	return []int{1}
}

// historySample is engine.FactsHistoryQuery's k with held backends: every
// k-th one's start time counts.
func historySample(held int) int { return max(1, held/1000) }

// answer sends a simple query's reply of one row, vals.
func answer(be *pgproto3.Backend, vals []int) {
	var rd pgproto3.RowDescription
	var row pgproto3.DataRow
	for i, v := range vals {
		rd.Fields = append(rd.Fields, pgproto3.FieldDescription{Name: []byte("c" + strconv.Itoa(i)), DataTypeOID: 20, DataTypeSize: 8, TypeModifier: -1})
		row.Values = append(row.Values, []byte(strconv.Itoa(v)))
	}
	be.Send(&rd)
	be.Send(&row)
	be.Send(&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
}

// exit ends p's backend, unless a restart ended it already.
func (s *Server) exit(p *pending) {
	_ = p.conn.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.backends[p.pid] == p {
		delete(s.backends, p.pid)
		s.uncount(p.started)
		s.spend(time.Duration(s.m.Exit))
	}
}

func (s *Server) uncount(started int64) {
	if s.starts[started]--; s.starts[started] <= 0 {
		delete(s.starts, started)
	}
	if s.seconds[started/10]--; s.seconds[started/10] <= 0 {
		delete(s.seconds, started/10)
	}
}

// Restart stops the server as pg_ctl's fast mode does and starts it
// again, returning once it accepts connections. Every backend is told to
// exit at once, but they exit one at a time, each sending its client 57P01
// and taking the model's DownPerBackend, in no particular order (measured
// on a 2-core machine holding 358 idle connections: the sessions ended
// over 2.5s, evenly, and the postmaster exited 1.2s after the last), and
// meanwhile a new connection is forked and answered 57P03 ("the database
// system is shutting down"). Then the postmaster exits: connections in
// the listen queue are reset, and the server refuses connections for the
// model's Down, then answers 57P03 ("starting up") for its Starting.
func (s *Server) Restart() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("simpg: restart of a closed server")
	}
	s.state = stopping
	exiting := make([]*pending, 0, len(s.backends))
	for _, p := range s.backends {
		exiting = append(exiting, p)
	}
	s.mu.Unlock()
	for _, p := range exiting {
		time.Sleep(time.Duration(s.m.DownPerBackend))
		s.mu.Lock()
		if s.backends[p.pid] == p {
			s.terminate(p)
		}
		s.mu.Unlock()
	}
	s.mu.Lock()
	s.gen++
	s.state = down
	s.shutdown()
	s.mu.Unlock()
	time.Sleep(time.Duration(s.m.Down))
	s.setState(starting)
	time.Sleep(time.Duration(s.m.Starting))
	s.setState(up)
	return nil
}

// terminate ends backend p's session as a fast shutdown does: 57P01, and
// the connection closes; s.mu is held.
func (s *Server) terminate(p *pending) {
	msg, _ := (&pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"}).Encode(nil)
	_, _ = p.conn.Write(msg)
	_ = p.conn.Close()
	delete(s.backends, p.pid)
	s.uncount(p.started)
}

// shutdown resets the connections in the listen queue and ends every
// session left; s.mu is held.
func (s *Server) shutdown() {
	for _, p := range s.queue {
		_ = p.conn.reset()
	}
	s.queue = nil
	for _, p := range s.backends {
		s.terminate(p)
	}
	clear(s.starts)
	clear(s.seconds)
}

func (s *Server) setState(st state) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.state = st
}

// Backends is how many client backends the server holds.
func (s *Server) Backends() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.backends)
}

// Close stops the server and ends its connections.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	s.gen++
	s.shutdown()
	s.wake.Broadcast()
	s.mu.Unlock()
	<-s.done
}
