package testdb

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// PgBouncerInstallHint is the command that installs PgBouncer on Debian.
const PgBouncerInstallHint = "apt-get install -y pgbouncer"

// ErrNoPgBouncer is returned (wrapped) when the pgbouncer binary is not found.
var ErrNoPgBouncer = errors.New("testdb: pgbouncer not found; install it with: " + PgBouncerInstallHint)

// pgbouncerSbin is where Debian's package installs pgbouncer; a variable for
// tests.
var pgbouncerSbin = "/usr/sbin/pgbouncer"

// PgBouncerOptions configure [StartPgBouncer]. Zero values take PgBouncer's
// defaults, except PoolMode.
type PgBouncerOptions struct {
	PoolMode        string // session, transaction (the default) or statement
	MaxClientConn   int    // max_client_conn
	DefaultPoolSize int    // default_pool_size: server connections per database and user
}

// PgBouncer is a PgBouncer process in front of a [Cluster], listening on a
// free port on 127.0.0.1 and authenticating clients with scram-sha-256 as
// the cluster's superuser. Its methods are safe for concurrent use.
type PgBouncer struct {
	c      *Cluster
	dir    string
	port   int
	cmd    *exec.Cmd
	exited chan struct{}
	logBuf *ringLog
}

// StartPgBouncer starts PgBouncer in front of c and waits until it accepts
// connections. Like the server, it runs as an unprivileged user when the
// process is root, and dies with the test binary.
func StartPgBouncer(c *Cluster, opts PgBouncerOptions) (*PgBouncer, error) {
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		// Debian installs it in /usr/sbin, which a normal user's PATH lacks.
		if _, statErr := os.Stat(pgbouncerSbin); statErr != nil {
			return nil, fmt.Errorf("%w (looked in PATH and %s)", ErrNoPgBouncer, pgbouncerSbin)
		}
		bin = pgbouncerSbin
	}
	cred, owner, err := serverCredential()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(c.dir, "pgbouncer-") // removed with the cluster
	if err != nil {
		return nil, fmt.Errorf("testdb: %w", err)
	}
	if err := owner.chown(dir); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	mode := opts.PoolMode
	if mode == "" {
		mode = "transaction"
	}
	ini := []string{
		"[databases]",
		fmt.Sprintf("* = host=127.0.0.1 port=%d", c.port),
		"[pgbouncer]",
		"listen_addr = 127.0.0.1",
		fmt.Sprintf("listen_port = %d", port),
		"unix_socket_dir =",
		"auth_type = scram-sha-256",
		"auth_file = " + filepath.Join(dir, "userlist.txt"),
		"pool_mode = " + mode,
		"logfile =",
		"pidfile =",
		"log_connections = 1",
		"log_disconnections = 1",
	}
	if opts.MaxClientConn > 0 {
		ini = append(ini, fmt.Sprintf("max_client_conn = %d", opts.MaxClientConn))
	}
	if opts.DefaultPoolSize > 0 {
		ini = append(ini, fmt.Sprintf("default_pool_size = %d", opts.DefaultPoolSize))
	}
	files := map[string]string{
		"pgbouncer.ini": strings.Join(ini, "\n") + "\n",
		// A plain password: PgBouncer checks the client's SCRAM exchange
		// against it and logs in to the server with it.
		"userlist.txt": fmt.Sprintf("%q %q\n", c.user, c.password),
	}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			return nil, fmt.Errorf("testdb: %w", err)
		}
		if err := owner.chown(p); err != nil {
			return nil, err
		}
	}

	cmd := exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL, Setpgid: true}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, fmt.Errorf("testdb: %w", err)
	}
	runtime.LockOSThread() // Pdeathsig is tied to the forking thread: see Cluster.Start
	err = cmd.Start()
	runtime.UnlockOSThread()
	if err != nil {
		return nil, fmt.Errorf("testdb: start pgbouncer: %w", err)
	}
	b := &PgBouncer{c: c, dir: dir, port: port, cmd: cmd, exited: make(chan struct{}), logBuf: &ringLog{max: 200}}
	// Ready once it logs "process up", after binding its port. (A probe
	// connection would take one of a small max_client_conn until PgBouncer
	// noticed it closed.)
	up := make(chan struct{})
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		sc := bufio.NewScanner(stderr)
		seen := false
		for sc.Scan() {
			b.logBuf.add(sc.Text())
			if !seen && strings.Contains(sc.Text(), "process up") {
				seen = true
				close(up)
			}
		}
	}()
	go func() {
		<-logDone
		_ = cmd.Wait()
		close(b.exited)
	}()
	select {
	case <-up:
		return b, nil
	case <-b.exited:
		return nil, fmt.Errorf("testdb: pgbouncer exited during startup\n%s", b.logBuf.String())
	case <-time.After(10 * time.Second):
		b.Close()
		return nil, fmt.Errorf("testdb: pgbouncer not up after 10s\n%s", b.logBuf.String())
	}
}

// Addr is PgBouncer's host:port.
func (b *PgBouncer) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(b.port)) }

// ConnString is [Cluster.ConnString] through PgBouncer, in plain text
// (PgBouncer is not given a certificate, whether or not the cluster has one).
func (b *PgBouncer) ConnString(dbname string, params ...string) string {
	s := b.c.ConnString(dbname, params...)
	u, err := url.Parse(s)
	if err != nil {
		return s // ConnString builds a valid URL
	}
	u.Host = b.Addr()
	q := u.Query()
	q.Set("sslmode", "disable")
	q.Del("sslrootcert")
	u.RawQuery = q.Encode()
	return u.String()
}

// Log returns PgBouncer's most recent log lines.
func (b *PgBouncer) Log() string { return b.logBuf.String() }

// Close stops PgBouncer and waits for it to exit. It is safe to call more
// than once.
func (b *PgBouncer) Close() error {
	select {
	case <-b.exited:
		return nil
	default:
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM) // immediate shutdown (SIGINT waits for clients)
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
	return nil
}
