package dialer

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pgstagger/pgstagger/internal/testdb"
)

func startTLSCluster() (*testdb.Cluster, error) { return testdb.Start(testdb.Options{TLS: true}) }

func TestTLSVerifyFullWorksAndAWrongCAIsOneAttempt(t *testing.T) {
	c, err := startTLSCluster()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	t.Run("verify-full", func(t *testing.T) {
		d, err := New(WithStartupJitter(0))
		if err != nil {
			t.Fatal(err)
		}
		url := c.ConnString("")
		if !strings.Contains(url, "sslmode=verify-full") {
			t.Fatalf("TLS cluster's connection string %q does not verify the server", url)
		}
		cfg, err := ParseConfig(url)
		if err != nil {
			t.Fatal(err)
		}
		conn, err := d.Connect(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		tc, ok := conn.PgConn().Conn().(*tls.Conn)
		if !ok {
			t.Fatalf("connection is %T, want *tls.Conn", conn.PgConn().Conn())
		}
		if st := tc.ConnectionState(); !st.HandshakeComplete || len(st.VerifiedChains) == 0 {
			t.Errorf("TLS state: handshake complete %v, %d verified chains", st.HandshakeComplete, len(st.VerifiedChains))
		}
	})

	t.Run("wrong CA", func(t *testing.T) {
		wrongCA, err := c.ConnStringWrongCA(t.TempDir(), "")
		if err != nil {
			t.Fatal(err)
		}
		d, err := New(WithStartupJitter(0))
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := ParseConfig(wrongCA)
		if err != nil {
			t.Fatal(err)
		}
		before := c.ConnectionsReceived()
		_, err = d.Connect(context.Background(), cfg)
		if Classify(err) != Permanent {
			t.Fatalf("err = %v (%v), want a permanent failure", err, Classify(err))
		}
		if !strings.Contains(err.Error(), "certificate") {
			t.Errorf("error does not say the certificate failed: %v", err)
		}
		var g *GaveUpError
		if errors.As(err, &g) {
			t.Errorf("a wrong CA went through the retry loop: %v", err)
		}
		if s := d.Stats(); s.Establishments != 1 || s.Dials != 1 || s.Retries != 0 {
			t.Errorf("stats = %+v, want exactly one attempt and one dial", s)
		}
		if got := c.WaitConnectionsReceived(before+1, 5*time.Second) - before; got != 1 {
			t.Errorf("server saw %d connections, want 1", got)
		}
	})
}
