package testdb

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func connect(t *testing.T, ctx context.Context, connString string) (*pgx.Conn, error) {
	t.Helper()
	conn, err := pgx.Connect(ctx, connString)
	if err == nil {
		t.Cleanup(func() { conn.Close(context.Background()) })
	}
	return conn, err
}

func TestClusterLifecycle(t *testing.T) {
	c, err := Start(Options{Settings: map[string]string{"max_connections": "17", "application_name": "testdb check"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()

	conn, err := connect(t, ctx, c.ConnString(""))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	var maxConns, method string
	if err := conn.QueryRow(ctx, "show max_connections").Scan(&maxConns); err != nil {
		t.Fatal(err)
	}
	if maxConns != "17" {
		t.Errorf("max_connections = %s, want 17 from Options.Settings", maxConns)
	}
	if err := conn.QueryRow(ctx, "select auth_method from pg_hba_file_rules where type = 'host' limit 1").Scan(&method); err != nil {
		t.Fatal(err)
	}
	if method != "scram-sha-256" {
		t.Errorf("auth method = %s, want scram-sha-256", method)
	}
	if os.Geteuid() == 0 {
		// The server process must not run as root: check the owner of
		// the postmaster process.
		fi, err := os.Stat(filepath.Join("/proc", strconv.Itoa(c.PID())))
		if err != nil {
			t.Fatal(err)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; uid == 0 {
			t.Errorf("postmaster runs as root")
		}
	}

	_, err = connect(t, ctx, c.ConnStringAs(c.User(), "wrong", ""))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28P01" {
		t.Errorf("wrong password: err = %v, want SQLSTATE 28P01", err)
	}

	// Restart keeps settings and terminates sessions.
	if err := c.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := conn.Ping(ctx); err == nil {
		t.Errorf("session survived a restart")
	}
	conn2, err := connect(t, ctx, c.ConnString(""))
	if err != nil {
		t.Fatalf("connect after restart: %v", err)
	}
	if err := conn2.QueryRow(ctx, "show max_connections").Scan(&maxConns); err != nil || maxConns != "17" {
		t.Errorf("after restart: max_connections = %q, %v", maxConns, err)
	}

	// Freeze: a connect cannot complete; Thaw: it can.
	if err := c.Freeze(); err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = connect(t, fctx, c.ConnString(""))
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("connect to frozen postmaster: err = %v, want deadline exceeded", err)
	}
	if err := c.Thaw(); err != nil {
		t.Fatal(err)
	}
	if _, err := connect(t, ctx, c.ConnString("")); err != nil {
		t.Errorf("connect after thaw: %v", err)
	}

	// Kill, then Start runs crash recovery.
	if err := c.Exec(ctx, "set synchronous_commit = on; create table t(x int); insert into t values (42)"); err != nil {
		t.Fatal(err)
	}
	pid := c.PID()
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Errorf("postmaster %d still alive after Kill", pid)
	}
	if _, err := connect(t, ctx, c.ConnString("")); err == nil {
		t.Errorf("connect succeeded while the server is down")
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(c.Log(), "not properly shut down") {
		t.Errorf("no crash recovery in server log:\n%s", c.Log())
	}
	conn3, err := connect(t, ctx, c.ConnString(""))
	if err != nil {
		t.Fatal(err)
	}
	var x int
	if err := conn3.QueryRow(ctx, "select x from t").Scan(&x); err != nil || x != 42 {
		t.Errorf("after recovery: x = %d, %v", x, err)
	}

	dir := c.dir
	pid = c.PID()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Errorf("postmaster %d still alive after Close", pid)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("cluster directory %s left behind (%v)", dir, err)
	}
}

func TestTLSVerifyFull(t *testing.T) {
	c, err := Start(Options{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	conn, err := connect(t, ctx, c.ConnString(""))
	if err != nil {
		t.Fatalf("verify-full connect: %v", err)
	}
	var ssl bool
	if err := conn.QueryRow(ctx, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").Scan(&ssl); err != nil || !ssl {
		t.Errorf("connection not encrypted: ssl=%v err=%v", ssl, err)
	}

	// A CA that did not sign the server's certificate is rejected.
	otherCA, _, _, err := GenerateCerts(time.Now(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	wrong := filepath.Join(t.TempDir(), "other-ca.crt")
	if err := os.WriteFile(wrong, otherCA, 0o644); err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(c.ConnString(""), "sslrootcert="+urlEscape(c.CAFile()), "sslrootcert="+urlEscape(wrong), 1)
	if bad == c.ConnString("") {
		t.Fatalf("could not swap sslrootcert in %s", c.ConnString(""))
	}
	if _, err := connect(t, ctx, bad); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("wrong CA: err = %v, want a certificate verification error", err)
	}
}

func urlEscape(s string) string { return strings.ReplaceAll(s, "/", "%2F") }

func TestMissingBinariesNameTheInstallCommand(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	old := versionedBinGlob
	versionedBinGlob = filepath.Join(t.TempDir(), "*", "bin")
	defer func() { versionedBinGlob = old }()

	_, err := Start(Options{})
	if !errors.Is(err, ErrNoServer) {
		t.Fatalf("Start without binaries: err = %v, want ErrNoServer", err)
	}
	if !strings.Contains(err.Error(), "apt-get install -y postgresql") {
		t.Errorf("error %q does not name the install command", err)
	}
}

func TestMissingPgBouncerNamesTheInstallCommand(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	old := pgbouncerSbin
	pgbouncerSbin = filepath.Join(t.TempDir(), "pgbouncer")
	defer func() { pgbouncerSbin = old }()

	_, err := StartPgBouncer(&Cluster{}, PgBouncerOptions{})
	if !errors.Is(err, ErrNoPgBouncer) {
		t.Fatalf("StartPgBouncer without the binary: err = %v, want ErrNoPgBouncer", err)
	}
	if !strings.Contains(err.Error(), "apt-get install -y pgbouncer") {
		t.Errorf("error %q does not name the install command", err)
	}
}

// TestServerDiesWithPanickingTests runs a child test binary that starts a
// cluster and panics; the postmaster must not outlive it.
func TestServerDiesWithPanickingTests(t *testing.T) {
	if os.Getenv("TESTDB_PANIC_CHILD") != "" {
		c, err := Start(Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(os.Getenv("TESTDB_PANIC_CHILD"), []byte(strconv.Itoa(c.PID())+"\n"+c.dir), 0o644); err != nil {
			t.Fatal(err)
		}
		panic("test panics with a running cluster")
	}
	pidFile := filepath.Join(t.TempDir(), "pid")
	cmd := exec.Command(os.Args[0], "-test.run=^TestServerDiesWithPanickingTests$")
	cmd.Env = append(os.Environ(), "TESTDB_PANIC_CHILD="+pidFile)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "test panics with a running cluster") {
		t.Fatalf("child did not panic: %v\n%s", err, out)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatalf("child wrote no pid: %v\n%s", err, out)
	}
	pidText, dir, _ := strings.Cut(string(b), "\n")
	pid, _ := strconv.Atoi(pidText)
	deadline := time.Now().Add(30 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("postmaster %d outlived the panicking test binary", pid)
		}
		// Polling /proc: a process we did not start offers nothing to wait on.
		time.Sleep(20 * time.Millisecond)
	}
	// The dead cluster's files are swept by the next Start.
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("child cluster dir %s: %v", dir, err)
	}
	c, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("stale cluster dir %s not swept (%v)", dir, err)
	}
}

func alive(pid int) bool { return processAlive(pid) }
