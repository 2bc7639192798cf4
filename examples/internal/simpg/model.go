package simpg

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Model is what the simulated server does, in numbers a calibration
// measures ([Calibrate]) or a user sets.
type Model struct {
	// Capacity is the postmaster's connects per second at saturation
	// while it holds Backends client backends, by backends ascending.
	// Between two points the time per connect is interpolated linearly
	// (the time per fork grows with the backends held: the quadratic total
	// reported on PostgreSQL's hackers list); beyond the last point it
	// stays at the last point's, which flatters a server holding more.
	Capacity []Point `json:"capacity"`
	// IdleConnect is a connect's time on the idle server, dial to ready.
	// What the postmaster's time per connect at 0 backends leaves of it is
	// the backend's start-up, which runs beside the postmaster's queue.
	IdleConnect Duration `json:"idle_connect"`
	// MaxConnections is the server's max_connections: a backend beyond it
	// answers 53300 (after its fork, as PostgreSQL's do).
	MaxConnections int `json:"max_connections"`
	// Backlog is the listen queue: a dial finding it full waits for the
	// kernel's SYN retransmissions (1s, 2s, 4s, ...), as on Linux.
	// PostgreSQL asks for 2 × max_connections; Linux caps it at
	// net.core.somaxconn (4096).
	Backlog int `json:"backlog"`
	// A restart ends its backends' sessions one at a time, DownPerBackend
	// apart (a server holding many takes longer to stop), answering new
	// connections 57P03 ("the database system is shutting down") after a
	// fork meanwhile; then it refuses connections for Down, then answers
	// 57P03 ("the database system is starting up") for Starting, each
	// after a fork. See [Server.Restart].
	Down           Duration `json:"down"`
	DownPerBackend Duration `json:"down_per_backend"`
	Starting       Duration `json:"starting"`
	// Query is how long a backend takes to answer a query ("select 1") on
	// the idle server. QueryCPU and QueryCPUPerBackend are how much of the
	// machine's CPU a query takes, a fixed part and a part per backend the
	// server holds (a snapshot scans them all), the client's included
	// where the client shares the machine, and Exit how much a backend's
	// exit takes. What the queries and exits of the last second took is
	// their share of Cores, which the postmaster working through a queue
	// does not have: its forks stretch by 1 / (1 − share). A process
	// woken to do a little work (a lone connection's fork, a backend's
	// start-up, a query) stretches less: see [Server].
	Query              Duration `json:"query"`
	QueryCPU           Duration `json:"query_cpu"`
	QueryCPUPerBackend Duration `json:"query_cpu_per_backend"`
	Exit               Duration `json:"exit"`
	Cores              int      `json:"cores"`
	// FactsPerBackend and HistoryPerBackend are what pgstagger's facts
	// queries (engine.FactsQuery, engine.FactsHistoryQuery) take beyond a
	// query, per backend the server holds, in time and CPU alike.
	FactsPerBackend   Duration `json:"facts_per_backend"`
	HistoryPerBackend Duration `json:"history_per_backend"`
}

// Point is the postmaster's capacity at a number of backends held.
type Point struct {
	Backends  int     `json:"backends"`
	PerSecond float64 `json:"per_second"`
}

// Duration is a time.Duration written as "4.6ms" in JSON.
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	*d = Duration(v)
	return err
}

// Default is a 2-core development machine's PostgreSQL 15 on loopback,
// measured in connect-control's notes and the demo's runs: 294–320
// connects/s at 0–500 backends, 239/s at 1,000, 197/s at 1,500 (clients
// connecting and closing, so that Exit is in them); an idle connect of
// 4.6ms; a restart of about a second, 3.2s holding 1,500 connections,
// their sessions ending over its first 2.4s.
var Default = Model{
	Capacity:       []Point{{0, 307}, {500, 307}, {1000, 239}, {1500, 197}},
	IdleConnect:    Duration(4600 * time.Microsecond),
	MaxConnections: 1600,
	Backlog:        3200,
	Down:           Duration(800 * time.Millisecond),
	DownPerBackend: Duration(1600 * time.Microsecond),
	Starting:       Duration(200 * time.Millisecond),
	// pgstagger's documentation of its facts queries: 0.2ms and 1.4ms
	// holding 1,500 connections.
	Query:              Duration(50 * time.Microsecond),
	QueryCPUPerBackend: Duration(20 * time.Nanosecond),
	Cores:              2,
	FactsPerBackend:    Duration(100 * time.Nanosecond),
	HistoryPerBackend:  Duration(900 * time.Nanosecond),
}

// Validate reports what is wrong with m.
func (m Model) Validate() error {
	if len(m.Capacity) == 0 {
		return errors.New("simpg: no capacity points")
	}
	for i, p := range m.Capacity {
		if p.PerSecond <= 0 || p.Backends < 0 || (i > 0 && p.Backends <= m.Capacity[i-1].Backends) {
			return fmt.Errorf("simpg: capacity point %d (%d backends, %g/s): want a positive rate and backends ascending", i, p.Backends, p.PerSecond)
		}
	}
	if m.IdleConnect <= 0 || m.MaxConnections < 1 || m.Backlog < 1 || m.Cores < 1 ||
		min(m.Down, m.DownPerBackend, m.Starting, m.Query, m.QueryCPU, m.QueryCPUPerBackend, m.Exit, m.FactsPerBackend, m.HistoryPerBackend) < 0 {
		return fmt.Errorf("simpg: model %+v: want a positive idle connect, max connections, backlog and cores, and no negative time", m)
	}
	return nil
}

// ServiceTime is the postmaster's time per connect while it holds backends.
func (m Model) ServiceTime(backends int) time.Duration {
	ps := m.Capacity
	per := func(p Point) float64 { return 1 / p.PerSecond }
	i := slices.IndexFunc(ps, func(p Point) bool { return p.Backends > backends })
	var s float64
	switch i {
	case 0:
		s = per(ps[0])
	case -1:
		s = per(ps[len(ps)-1])
	default:
		a, b := ps[i-1], ps[i]
		f := float64(backends-a.Backends) / float64(b.Backends-a.Backends)
		s = per(a) + f*(per(b)-per(a))
	}
	return time.Duration(s * float64(time.Second))
}

// startup is the backend's start-up beside the postmaster's queue.
func (m Model) startup() time.Duration {
	return max(0, time.Duration(m.IdleConnect)-m.ServiceTime(0))
}

// Scaled is m with every capacity multiplied so that the capacity at the
// first point is perSecond, the shape kept, and the machine's CPU costs
// with it (see faster).
func (m Model) Scaled(perSecond float64) Model {
	f := perSecond / m.Capacity[0].PerSecond
	m.Capacity = slices.Clone(m.Capacity)
	for i := range m.Capacity {
		m.Capacity[i].PerSecond *= f
	}
	return m.faster(f)
}

// faster is m on a machine f times as fast: its queries, exits and facts
// queries take 1/f of the CPU, and its shutdown 1/f of the time per backend
// ended. A postmaster forking f times as fast is not alone on a 2-core
// machine: a server saturating at 1,400 connects a second, against a
// 2-core machine's 300, has the cores to match, and its other costs taken
// at the 2-core machine's would have the fleet's queries, and pgstagger's
// facts reads (each a scan of every backend), saturate a server that
// would not be (measured: a 10,000-worker start at 1,400/s, every worker
// ready 14.7 s after the start with no options and the costs unscaled,
// 11.8 s scaled, where pgxpool took 11.2 s; configured with WithFleet, a
// bystander's connect p99 109× idle unscaled, 6× scaled).
func (m Model) faster(f float64) Model {
	scale := func(d *Duration) { *d = Duration(float64(*d) / f) }
	for _, d := range []*Duration{&m.Query, &m.QueryCPU, &m.QueryCPUPerBackend, &m.Exit, &m.FactsPerBackend, &m.HistoryPerBackend, &m.DownPerBackend} {
		scale(d)
	}
	return m
}

// ParseCapacity parses "1400" (the capacity at 0 backends, m's shape
// scaled to it) or "0:1400,1500:900" (points) into m's capacity, with m's
// CPU costs scaled by how much faster the postmaster forks at 0 backends
// (see faster).
func (m Model) ParseCapacity(s string) (Model, error) {
	if !strings.Contains(s, ":") {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil || v <= 0 {
			return m, fmt.Errorf("capacity %q: want connects per second, or backends:rate points", s)
		}
		return m.Scaled(v), nil
	}
	var ps []Point
	for _, f := range strings.Split(s, ",") {
		b, r, _ := strings.Cut(f, ":")
		n, err1 := strconv.Atoi(strings.TrimSpace(b))
		v, err2 := strconv.ParseFloat(strings.TrimSpace(r), 64)
		if err1 != nil || err2 != nil {
			return m, fmt.Errorf("capacity point %q: want backends:rate", f)
		}
		ps = append(ps, Point{n, v})
	}
	old := m.ServiceTime(0)
	m.Capacity = ps
	if err := m.Validate(); err != nil {
		return m, err
	}
	return m.faster(float64(old) / float64(m.ServiceTime(0))), nil
}

// Load reads a model written by Save.
func Load(path string) (Model, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Model{}, err
	}
	var m Model
	if err := json.Unmarshal(b, &m); err != nil {
		return Model{}, fmt.Errorf("%s: %w", path, err)
	}
	return m, m.Validate()
}

// Save writes m to path as JSON.
func (m Model) Save(path string) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
