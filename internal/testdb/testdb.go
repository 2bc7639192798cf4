// Package testdb starts throwaway PostgreSQL clusters from the system's
// server binaries, for pgstagger's tests and examples.
//
// A [Cluster] is a real postmaster listening on a free TCP port on 127.0.0.1
// with a private socket directory, scram-sha-256 password authentication and,
// on request, TLS with certificates generated in Go. When the process runs as
// root the server runs as an unprivileged user (PostgreSQL refuses root).
//
// The postmaster is a direct child of the test binary and is started with a
// parent-death signal, so it shuts down even when the tests panic or are
// killed; [Cluster.Close] stops it and removes its files. [Shared] shares
// one cluster across a package's tests, started by the first test that
// needs it.
//
// [StartPgBouncer] puts Debian's PgBouncer in front of a cluster.
//
// Missing server binaries are an error that names the install command
// (apt-get install postgresql, apt-get install pgbouncer); they are never a
// silent skip.
package testdb

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// InstallHint is the command that installs the server binaries on Debian.
const InstallHint = "apt-get install -y postgresql"

// ErrNoServer is returned (wrapped) when no PostgreSQL server binaries are found.
var ErrNoServer = errors.New("testdb: PostgreSQL server binaries (initdb, postgres) not found; install them with: " + InstallHint)

// Options configure a new cluster. The zero value is a plain cluster with
// scram-sha-256 authentication and no TLS.
type Options struct {
	// Settings are server settings (GUCs) written to postgresql.conf, for
	// example {"max_connections": "20"}. They survive restarts.
	Settings map[string]string
	// TLS turns on ssl=on with a CA and a server certificate for 127.0.0.1
	// and localhost, generated in Go; see [Cluster.CAFile].
	TLS bool
	// Password is the superuser's password; a random one by default.
	Password string
	// Auth is the pg_hba.conf method for TCP and socket connections:
	// "scram-sha-256" (the default), "md5" or "trust". scram-sha-256 costs
	// the client thousands of hash iterations per connect; demos that
	// measure the postmaster itself can use a cheaper method.
	Auth string
	// Log, when set, receives the server's log output.
	Log func(line string)
}

// Cluster is one throwaway PostgreSQL cluster. Its methods are safe for
// concurrent use.
type Cluster struct {
	// Fixed after Start.
	bin      string // directory holding postgres and initdb
	dir      string // everything of this cluster lives under dir
	data     string // data directory
	sockDir  string
	port     int
	user     string // database superuser name
	password string
	caFile   string // PEM of the CA that signed the server certificate, if TLS
	cred     *syscall.Credential
	log      func(string)

	received atomic.Int64 // "connection received" log lines

	recvMu      sync.Mutex
	recvChanged chan struct{} // guarded by recvMu: closed and replaced on each count

	mu     sync.Mutex // guards the fields below
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	logBuf *ringLog
	closed bool
}

// Start creates a cluster with initdb, starts it and waits until it accepts
// connections.
func Start(opts Options) (c *Cluster, err error) {
	bin, err := FindBinDir()
	if err != nil {
		return nil, err
	}
	cred, owner, err := serverCredential()
	if err != nil {
		return nil, err
	}
	sweepStale()
	dir, err := os.MkdirTemp("", dirPrefix)
	if err != nil {
		return nil, fmt.Errorf("testdb: %w", err)
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
		}
	}()
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, fmt.Errorf("testdb: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, fmt.Errorf("testdb: %w", err)
	}
	c = &Cluster{
		bin:      bin,
		dir:      dir,
		data:     filepath.Join(dir, "data"),
		sockDir:  filepath.Join(dir, "sock"),
		user:     "postgres",
		password: opts.Password,
		cred:     cred,
		log:      opts.Log,
		logBuf:   &ringLog{max: 200},

		recvChanged: make(chan struct{}),
	}
	if c.password == "" {
		c.password = randomHex(12)
	}
	if err := os.Mkdir(c.sockDir, 0o700); err != nil {
		return nil, fmt.Errorf("testdb: %w", err)
	}
	pwfile := filepath.Join(dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(c.password+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("testdb: %w", err)
	}
	for _, p := range []string{dir, c.sockDir, pwfile} {
		if err := owner.chown(p); err != nil {
			return nil, err
		}
	}

	initdb := exec.Command(filepath.Join(bin, "initdb"),
		"-D", c.data, "-U", c.user, "--pwfile="+pwfile, "-A", "scram-sha-256",
		"-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("testdb: initdb: %w\n%s", err, out)
	}
	_ = os.Remove(pwfile)

	conf := map[string]string{
		"listen_addresses":        "'127.0.0.1'",
		"unix_socket_directories": quote(c.sockDir),
		"fsync":                   "off",
		"synchronous_commit":      "off",
		"full_page_writes":        "off",
		"password_encryption":     "'scram-sha-256'",
		"logging_collector":       "off",
		"log_min_messages":        "warning",
		// One "connection received" line per TCP connection the
		// postmaster forks for; see ConnectionsReceived.
		"log_connections": "on",
	}
	if opts.TLS {
		if err := c.writeCerts(owner); err != nil {
			return nil, err
		}
		conf["ssl"] = "on"
		conf["ssl_cert_file"] = quote(filepath.Join(c.data, "server.crt"))
		conf["ssl_key_file"] = quote(filepath.Join(c.data, "server.key"))
	}
	for k, v := range opts.Settings {
		conf[k] = quoteSetting(v)
	}
	auth := opts.Auth
	switch auth {
	case "":
		auth = "scram-sha-256"
	case "scram-sha-256", "md5", "trust":
	default:
		return nil, fmt.Errorf("testdb: Options.Auth %q: want scram-sha-256, md5 or trust", auth)
	}
	if auth == "md5" {
		conf["password_encryption"] = "'md5'"
	}
	if err := c.writeConf(conf, auth, owner); err != nil {
		return nil, err
	}

	for attempt := 0; ; attempt++ {
		c.port, err = freePort()
		if err != nil {
			return nil, err
		}
		err = c.Start()
		if err == nil {
			return c, nil
		}
		// Another process may have taken the port between freePort and
		// the server's bind; try a new one a few times.
		if attempt == 4 || !strings.Contains(err.Error(), "could not bind") {
			return nil, err
		}
	}
}

const (
	dirPrefix = "pgstagger-testdb-"
	ownerFile = "owner.pid" // pid of the process that created the cluster
)

// sweepStale removes the directories of clusters whose creating process and
// postmaster are both gone: what a test binary that panicked or was killed
// leaves behind (its postmaster died with it).
func sweepStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, d := range dirs {
		owner, err := readPid(filepath.Join(d, ownerFile))
		if err != nil || processAlive(owner) {
			continue
		}
		if pm, err := readPid(filepath.Join(d, "data", "postmaster.pid")); err == nil && processAlive(pm) {
			continue
		}
		_ = os.RemoveAll(d)
	}
}

func readPid(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	first, _, _ := strings.Cut(string(b), "\n")
	return strconv.Atoi(strings.TrimSpace(first))
}

// processAlive reports whether pid names a live, non-zombie process.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// versionedBinGlob is where Debian installs each major version's binaries.
var versionedBinGlob = "/usr/lib/postgresql/*/bin"

// FindBinDir returns the directory holding the server binaries: the one on
// PATH, else `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin.
func FindBinDir() (string, error) {
	var tried []string
	if p, err := exec.LookPath("postgres"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			p = real
		}
		if d := filepath.Dir(p); hasServer(d) {
			return d, nil
		}
		tried = append(tried, filepath.Dir(p))
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		d := strings.TrimSpace(string(out))
		if hasServer(d) {
			return d, nil
		}
		tried = append(tried, d)
	}
	dirs, _ := filepath.Glob(versionedBinGlob)
	sort.Slice(dirs, func(i, j int) bool { return pgMajor(dirs[i]) > pgMajor(dirs[j]) })
	for _, d := range dirs {
		if hasServer(d) {
			return d, nil
		}
		tried = append(tried, d)
	}
	if len(tried) == 0 {
		tried = append(tried, "PATH", "pg_config --bindir", "/usr/lib/postgresql/*/bin")
	}
	return "", fmt.Errorf("%w (looked in %s)", ErrNoServer, strings.Join(tried, ", "))
}

func hasServer(dir string) bool {
	for _, name := range []string{"postgres", "initdb"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.IsDir() {
			return false
		}
	}
	return true
}

func pgMajor(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

// Shared is one cluster a package's tests share, started by the first test
// that asks for it, so that tests that need no server (timing on a fake
// clock, classification, options) run where PostgreSQL is not installed.
// Close it from TestMain after the tests:
//
//	var shared = testdb.NewShared(testdb.Options{})
//
//	func db(tb testing.TB) *testdb.Cluster { return shared.Get(tb) }
//
//	func TestMain(m *testing.M) { shared.Main(m) }
type Shared struct {
	opts Options
	once sync.Once
	c    *Cluster // set once by once
	err  error    // ... or why it could not start
}

// NewShared returns a Shared that starts its cluster with opts.
func NewShared(opts Options) *Shared { return &Shared{opts: opts} }

// Get returns the shared cluster, starting it on first use. A cluster that
// cannot start (missing binaries included) fails tb with the reason, for
// every test that asks.
func (s *Shared) Get(tb testing.TB) *Cluster {
	tb.Helper()
	s.once.Do(func() { s.c, s.err = Start(s.opts) })
	if s.err != nil {
		tb.Fatal(s.err)
	}
	return s.c
}

// Main runs the package's tests, closes the cluster if one was started and
// exits with the tests' status.
func (s *Shared) Main(m *testing.M) {
	code := m.Run()
	s.once.Do(func() {}) // no cluster starts after this
	if s.c != nil {
		s.c.Close()
	}
	os.Exit(code)
}

// ConnString returns a URL for database dbname ("postgres" if empty) as the
// superuser, with sslmode=disable unless the cluster has TLS, in which case
// it is verify-full against [Cluster.CAFile]. Extra query parameters are
// appended as given ("pool_max_conns=4").
func (c *Cluster) ConnString(dbname string, params ...string) string {
	return c.ConnStringAs(c.user, c.password, dbname, params...)
}

// ConnStringAs is [Cluster.ConnString] for another user and password.
func (c *Cluster) ConnStringAs(userName, password, dbname string, params ...string) string {
	if dbname == "" {
		dbname = "postgres"
	}
	q := url.Values{}
	if c.caFile != "" {
		q.Set("sslmode", "verify-full")
		q.Set("sslrootcert", c.caFile)
	} else {
		q.Set("sslmode", "disable")
	}
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(userName, password),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(c.port)),
		Path:     "/" + dbname,
		RawQuery: q.Encode(),
	}
	s := u.String()
	for _, p := range params {
		s += "&" + p
	}
	return s
}

// Host is the address the server listens on: 127.0.0.1.
func (c *Cluster) Host() string { return "127.0.0.1" }

// Port is the server's TCP port.
func (c *Cluster) Port() int { return c.port }

// Addr is Host:Port.
func (c *Cluster) Addr() string { return net.JoinHostPort(c.Host(), strconv.Itoa(c.port)) }

// User is the superuser's name.
func (c *Cluster) User() string { return c.user }

// Password is the superuser's password.
func (c *Cluster) Password() string { return c.password }

// CAFile is the path of the PEM CA certificate that signed the server's
// certificate, or "" without TLS.
func (c *Cluster) CAFile() string { return c.caFile }

// Exec runs SQL statements as the superuser on database "postgres" over a
// fresh connection.
func (c *Cluster) Exec(ctx context.Context, sql string) error {
	conn, err := pgx.Connect(ctx, c.ConnString(""))
	if err != nil {
		return fmt.Errorf("testdb: connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, sql); err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	return nil
}

// PID is the postmaster's process id, or 0 when it is not running.
func (c *Cluster) PID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return 0
	}
	return c.cmd.Process.Pid
}

// Start starts a stopped cluster and waits until it accepts connections
// (after a [Cluster.Kill], that includes crash recovery).
func (c *Cluster) Start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("testdb: cluster is closed")
	}
	if c.cmd != nil {
		return errors.New("testdb: cluster is already running")
	}
	cmd := exec.Command(filepath.Join(c.bin, "postgres"), "-D", c.data, "-p", strconv.Itoa(c.port))
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: c.cred,
		// A postmaster outliving the test binary (panic, kill) gets an
		// immediate shutdown instead of running on.
		Pdeathsig: syscall.SIGQUIT,
		Setpgid:   true,
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	cmd.Stdout = nil
	// Pdeathsig is tied to the thread that forks: keep the fork on one
	// thread that the runtime will not retire while the process lives.
	runtime.LockOSThread()
	err = cmd.Start()
	runtime.UnlockOSThread()
	if err != nil {
		return fmt.Errorf("testdb: start postgres: %w", err)
	}
	exited := make(chan struct{})
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			if strings.Contains(line, "connection received: ") {
				c.recvMu.Lock()
				c.received.Add(1)
				close(c.recvChanged)
				c.recvChanged = make(chan struct{})
				c.recvMu.Unlock()
			}
			c.logBuf.add(line)
			if c.log != nil {
				c.log(line)
			}
		}
	}()
	go func() {
		<-logDone
		_ = cmd.Wait()
		close(exited)
	}()
	c.cmd, c.exited = cmd, exited

	if err := c.waitReady(exited, 60*time.Second); err != nil {
		_ = cmd.Process.Kill()
		<-exited
		c.cmd, c.exited = nil, nil
		return fmt.Errorf("%w\nserver log:\n%s", err, c.logBuf.String())
	}
	return nil
}

// waitReady polls postmaster.pid until the postmaster reports "ready", as
// pg_ctl does.
func (c *Cluster) waitReady(exited <-chan struct{}, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	pidFile := filepath.Join(c.data, "postmaster.pid")
	for {
		if b, err := os.ReadFile(pidFile); err == nil {
			lines := strings.Split(string(b), "\n")
			// Line 8 is the postmaster status (LOCK_FILE_LINE_PM_STATUS).
			if len(lines) >= 8 && strings.TrimSpace(lines[7]) == "ready" &&
				strings.TrimSpace(lines[0]) == strconv.Itoa(c.cmd.Process.Pid) {
				return nil
			}
		}
		select {
		case <-exited:
			return errors.New("testdb: postgres exited during startup")
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testdb: postgres not ready after %v", timeout)
		}
	}
}

// Stop shuts the server down (fast shutdown: sessions are terminated) and
// waits for the postmaster to exit. Stopping a stopped cluster does nothing.
func (c *Cluster) Stop() error { return c.stop(syscall.SIGINT) }

// Restart is Stop followed by Start.
func (c *Cluster) Restart() error {
	if err := c.Stop(); err != nil {
		return err
	}
	return c.Start()
}

// Kill sends SIGKILL to the postmaster and waits for it to exit, leaving the
// cluster to run crash recovery on the next [Cluster.Start]. Backends notice
// the postmaster's death and exit by themselves.
func (c *Cluster) Kill() error { return c.stop(syscall.SIGKILL) }

func (c *Cluster) stop(sig syscall.Signal) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return nil
	}
	// A frozen postmaster cannot act on a signal until it is thawed.
	_ = c.cmd.Process.Signal(syscall.SIGCONT)
	if err := c.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("testdb: signal postmaster: %w", err)
	}
	select {
	case <-c.exited:
	case <-time.After(60 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
	c.cmd, c.exited = nil, nil
	if sig == syscall.SIGKILL {
		// Wait for orphaned backends to let go of shared memory, so that
		// the next Start can run crash recovery at once.
		c.waitBackendsGone(10 * time.Second)
	}
	return nil
}

// waitBackendsGone waits until no process has the data directory as its
// working directory (backends chdir into it), reading /proc.
func (c *Cluster) waitBackendsGone(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		busy := false
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			if _, err := strconv.Atoi(e.Name()); err != nil {
				continue
			}
			if cwd, err := os.Readlink(filepath.Join("/proc", e.Name(), "cwd")); err == nil && cwd == c.data {
				busy = true
				break
			}
		}
		if !busy {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// SlowRecovery makes the next [Cluster.Start] of a stopped or killed cluster
// run archive recovery, each of whose restore_command calls sleeps step and
// then fails (there is no archive): until recovery ends the server answers
// every connection with SQLSTATE 57P03, "the database system is starting
// up". PostgreSQL 15 calls restore_command about four times, so the window
// lasts several steps; Start still waits until the server is ready. A crash
// replays too little WAL here to give a window of any length on its own.
func (c *Cluster) SlowRecovery(step time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd != nil {
		return errors.New("testdb: SlowRecovery needs a stopped cluster")
	}
	conf, err := os.OpenFile(filepath.Join(c.data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	line := fmt.Sprintf("restore_command = 'sleep %.3f; false'\n", step.Seconds())
	if _, err := conf.WriteString(line); err != nil {
		conf.Close()
		return fmt.Errorf("testdb: %w", err)
	}
	if err := conf.Close(); err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	// Owned by the server's user, as the rest of the data directory.
	signal := filepath.Join(c.data, "recovery.signal")
	if err := os.WriteFile(signal, nil, 0o600); err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	if c.cred != nil {
		if err := os.Chown(signal, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			return fmt.Errorf("testdb: %w", err)
		}
	}
	return nil
}

// Freeze stops the postmaster with SIGSTOP: it accepts no connection until
// [Cluster.Thaw]. Existing backends keep running.
func (c *Cluster) Freeze() error { return c.signal(syscall.SIGSTOP) }

// Thaw resumes a frozen postmaster with SIGCONT.
func (c *Cluster) Thaw() error { return c.signal(syscall.SIGCONT) }

func (c *Cluster) signal(sig syscall.Signal) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return errors.New("testdb: cluster is not running")
	}
	if err := c.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("testdb: signal postmaster: %w", err)
	}
	return nil
}

// Close stops the server and removes the cluster's files. It is safe to call
// more than once.
func (c *Cluster) Close() error {
	err := c.Stop()
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	if rmErr := os.RemoveAll(c.dir); rmErr != nil && err == nil {
		err = rmErr
	}
	return err
}

// ConnectionsReceived counts the TCP connections the server has accepted
// and forked a backend for since Start (CancelRequests included), read from
// its log. The count is exact once the server has logged the connection,
// which it does as the backend starts; see [Cluster.WaitConnectionsReceived].
func (c *Cluster) ConnectionsReceived() int64 { return c.received.Load() }

// WaitConnectionsReceived waits up to timeout for the count to reach n and
// returns the count.
func (c *Cluster) WaitConnectionsReceived(n int64, timeout time.Duration) int64 {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		c.recvMu.Lock()
		got, changed := c.received.Load(), c.recvChanged
		c.recvMu.Unlock()
		if got >= n {
			return got
		}
		select {
		case <-changed:
		case <-timer.C:
			return c.received.Load()
		}
	}
}

// Log returns the server's most recent log lines.
func (c *Cluster) Log() string { return c.logBuf.String() }

func (c *Cluster) writeConf(conf map[string]string, auth string, owner fileOwner) error {
	var b bytes.Buffer
	b.WriteString("\n# testdb\n")
	keys := make([]string, 0, len(conf))
	for k := range conf {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = %s\n", k, conf[k])
	}
	f, err := os.OpenFile(filepath.Join(c.data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	if _, err := f.Write(b.Bytes()); err != nil {
		f.Close()
		return fmt.Errorf("testdb: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	hba := "local all all " + auth + "\n" +
		"host all all 127.0.0.1/32 " + auth + "\n" +
		"host all all ::1/128 " + auth + "\n"
	p := filepath.Join(c.data, "pg_hba.conf")
	if err := os.WriteFile(p, []byte(hba), 0o600); err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	return owner.chown(p)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("testdb: find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// fileOwner changes ownership of files the server must own; a no-op when the
// process is not root.
type fileOwner struct{ uid, gid int }

func (o fileOwner) chown(path string) error {
	if o.uid < 0 {
		return nil
	}
	if err := os.Chown(path, o.uid, o.gid); err != nil {
		return fmt.Errorf("testdb: %w", err)
	}
	return nil
}

// serverCredential picks the user the server runs as: the current one, or,
// for root, the "postgres" user (created by Debian's postgresql package) or
// "nobody".
func serverCredential() (*syscall.Credential, fileOwner, error) {
	if os.Geteuid() != 0 {
		return nil, fileOwner{uid: -1}, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 != nil || err2 != nil {
			continue
		}
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true},
			fileOwner{uid: uid, gid: gid}, nil
	}
	return nil, fileOwner{}, errors.New("testdb: running as root and no unprivileged user (postgres or nobody) exists to run the server; create one or run as a normal user")
}

func quote(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// quoteSetting quotes a setting value unless it is a plain number or word.
func quoteSetting(v string) string {
	if v == "" {
		return "''"
	}
	for _, r := range v {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_') {
			return quote(v)
		}
	}
	return v
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// ringLog keeps the last max lines written to it.
type ringLog struct {
	mu    sync.Mutex
	max   int
	lines []string
}

func (r *ringLog) add(line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, line)
	if len(r.lines) > r.max {
		r.lines = r.lines[len(r.lines)-r.max:]
	}
}

func (r *ringLog) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.lines, "\n")
}
