package pool

import (
	"context"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// poolRow releases its connection when scanned. Rows are recycled through
// rowPool, as pgxpool recycles its own, so QueryRow allocates nothing extra;
// as with pgx, a row must not be used after Scan.
type poolRow struct {
	c *pgxpool.Conn
	r pgx.Row
}

var rowPool = sync.Pool{New: func() any { return new(poolRow) }}

func (r *poolRow) Scan(dest ...any) error {
	c, row := r.c, r.r
	r.c, r.r = nil, nil
	rowPool.Put(r)
	if c == nil {
		return pgx.ErrNoRows // scanned twice: mirror pgx's answer for a spent row
	}
	panicked := true
	defer func() {
		if panicked {
			c.Release()
		}
	}()
	err := row.Scan(dest...)
	panicked = false
	c.Release()
	return err
}

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

type errRows struct{ err error }

func (errRows) Close()                                       {}
func (r errRows) Err() error                                 { return r.err }
func (errRows) CommandTag() pgconn.CommandTag                { return pgconn.CommandTag{} }
func (errRows) FieldDescriptions() []pgconn.FieldDescription { return nil }
func (errRows) Next() bool                                   { return false }
func (r errRows) Scan(...any) error                          { return r.err }
func (r errRows) Values() ([]any, error)                     { return nil, r.err }
func (errRows) RawValues() [][]byte                          { return nil }
func (errRows) Conn() *pgx.Conn                              { return nil }
func (errRows) TypeMap() *pgtype.Map                         { return nil }

// batchResults releases its connection on Close, or hands it to the
// transaction the batch began.
type batchResults struct {
	br pgx.BatchResults
	c  *pgxpool.Conn
	tx *tx // owns the connection instead when the batch began a transaction
}

func (b *batchResults) Exec() (pgconn.CommandTag, error) { return b.br.Exec() }
func (b *batchResults) Query() (pgx.Rows, error)         { return b.br.Query() }
func (b *batchResults) QueryRow() pgx.Row                { return b.br.QueryRow() }

func (b *batchResults) Close() error {
	err := b.br.Close()
	if b.c != nil {
		b.c.Release()
		b.c = nil
	}
	return err
}

func (b *batchResults) Tx() pgx.Tx {
	if b.tx == nil {
		return nil
	}
	return b.tx
}

// tx releases its connection when the transaction ends.
type tx struct {
	pgx.Tx
	c *pgxpool.Conn
}

func (t *tx) Commit(ctx context.Context) error {
	err := t.Tx.Commit(ctx)
	t.release()
	return err
}

func (t *tx) Rollback(ctx context.Context) error {
	err := t.Tx.Rollback(ctx)
	t.release()
	return err
}

func (t *tx) release() {
	if t.c != nil {
		t.c.Release()
		t.c = nil
	}
}
