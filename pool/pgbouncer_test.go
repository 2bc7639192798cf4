package pool

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstagger/pgstagger/internal/testdb"
)

func startPgBouncer(t *testing.T, c *testdb.Cluster, opts testdb.PgBouncerOptions) *testdb.PgBouncer {
	t.Helper()
	b, err := testdb.StartPgBouncer(c, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func TestPgBouncerTransactionModeWithTheDocumentedExecModes(t *testing.T) {
	// One server connection behind PgBouncer: every transaction of every
	// client connection runs on it, in turn.
	b := startPgBouncer(t, db(t), testdb.PgBouncerOptions{PoolMode: "transaction", DefaultPoolSize: 1})
	for _, mode := range []string{"exec", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			p := newPool(t, b.ConnString("", "pool_max_conns=4", "default_query_exec_mode="+mode), fast...)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var wg sync.WaitGroup
			errs := make(chan error, 40)
			for i := range 40 {
				wg.Go(func() {
					var got int
					err := p.QueryRow(ctx, "select $1::int + 1", i).Scan(&got)
					if err == nil && got != i+1 {
						err = errors.New("wrong answer")
					}
					if err == nil {
						err = pgx.BeginFunc(ctx, p, func(tx pgx.Tx) error {
							_, err := tx.Exec(ctx, "select $1::text", "in a transaction")
							return err
						})
					}
					errs <- err
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Fatalf("through PgBouncer in transaction mode with %s: %v", mode, err)
				}
			}
			if s := p.Dialer().Stats(); s.OK < 2 || s.Permanent != 0 {
				t.Errorf("stats %+v: want several connections through the gate, none failing", s)
			}
		})
	}
}

func TestPgBouncerMaxClientConnIsRetriedLike53300(t *testing.T) {
	b := startPgBouncer(t, db(t), testdb.PgBouncerOptions{PoolMode: "transaction", MaxClientConn: 2})
	retriedUntilASlotFrees(t, full{url: b.ConnString("", "default_query_exec_mode=exec"), slots: 2, refusal: func(err error) string {
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "08P01" || !strings.Contains(pe.Message, "max_client_conn") {
			return "want PgBouncer's 08P01 max_client_conn refusal"
		}
		return ""
	}}, 3)
}
