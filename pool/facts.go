package pool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstagger/pgstagger/internal/engine"
	"github.com/pgstagger/pgstagger/jitter"
)

// DefaultServerFactsEvery is how often, at most, a pool reads the server's
// facts ([WithServerFacts]) once it has run a while.
const DefaultServerFactsEvery = 30 * time.Second

// newServerFacts installs the server facts reader ([engine.FactsReader],
// which schedules the reads and tells the gate) on inner's AfterConnect
// and ShouldPing, composing with the caller's (or pgxpool's default, a
// ping after a second idle); it returns nil when every is 0. A read is
// due at once: the next connection the pool establishes (in AfterConnect)
// or the next Acquire that takes one (in ShouldPing) runs it, before the
// caller gets the connection. Both, because a pool filling MinConns may
// hand its first connection to an Acquire only once all of them are made:
// the read would come after the storm it is for. A pool of more than one
// connection is an early reader.
func newServerFacts(inner *pgxpool.Config, g *engine.Gate, every time.Duration, r jitter.Rand) *engine.FactsReader {
	if every <= 0 {
		return nil
	}
	f := engine.NewFactsReader(g, every, r, inner.MaxConns > 1)
	shouldPing := inner.ShouldPing
	if shouldPing == nil {
		shouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool { return p.IdleDuration > time.Second }
	}
	inner.ShouldPing = func(ctx context.Context, p pgxpool.ShouldPingParams) bool {
		if f.Due() {
			if err := readFacts(f, p.Conn.PgConn()); err != nil {
				return true // the connection failed: pgxpool's ping finds out
			}
		}
		return shouldPing(ctx, p)
	}
	afterConnect := inner.AfterConnect
	inner.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		if afterConnect != nil {
			if err := afterConnect(ctx, c); err != nil {
				return err
			}
		}
		if f.Due() {
			if err := readFacts(f, c.PgConn()); err != nil {
				// The new connection closed under the read: pgxpool
				// discards it. No caller's query ran on it, so it
				// is an establishment failure, and its class (a
				// timeout, a reset: transient) lets Pool's methods
				// retry.
				return &engine.SetupError{Err: fmt.Errorf("%w: %w", errFactsConn, err)}
			}
		}
		return nil
	}
	return f
}

// errFactsConn wraps why a new connection failed during the facts read.
var errFactsConn = errors.New("pgstagger: the connection failed during the server facts read")

// readFacts runs f's due read on c. It goes through pgconn, below pgx's
// query tracers and statement cache: the caller's tracer does not see it.
// It returns nil while c is still usable, and otherwise what closed it.
func readFacts(f *engine.FactsReader, c *pgconn.PgConn) (closedBy error) {
	err := f.Read(func(ctx context.Context, sql string) ([]int, error) {
		return intsOf(c.Exec(ctx, sql).ReadAll())
	})
	if c.IsClosed() {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// intsOf parses a one-row reply of integers.
func intsOf(rs []*pgconn.Result, err error) ([]int, error) {
	if err != nil {
		return nil, err
	}
	if len(rs) != 1 || len(rs[0].Rows) != 1 {
		return nil, engine.ErrFactsReply
	}
	vals := make([]int, len(rs[0].Rows[0]))
	for i, v := range rs[0].Rows[0] {
		if vals[i], err = strconv.Atoi(string(v)); err != nil {
			return nil, engine.ErrFactsReply
		}
	}
	return vals, nil
}
