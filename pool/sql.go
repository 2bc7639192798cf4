package pool

import (
	"context"
	"database/sql"
	"database/sql/driver"

	"github.com/jackc/pgx/v5/stdlib"
)

// OpenDB returns a *sql.DB whose connections come from p, as
// stdlib.OpenDBFromPool(p.Unwrap(), opts...) does, with Pool's retries: a
// connection that database/sql asks for is acquired under the caller's
// context, and a transient failure to establish it (a server restarting or
// full, 57P03, 53300, a refused dial) is retried with p's backoff until that
// context ends, as Pool's own methods do. Only the acquisition is retried,
// never a statement: database/sql sends nothing before it has the
// connection. New connections pass p's gate either way.
//
// As with stdlib.OpenDBFromPool, the *sql.DB keeps no idle connections of
// its own (p holds them), and closing it does not close p. Use it where
// database/sql is required: GORM's and ent's PostgreSQL drivers, sqlx, sqlc
// in database/sql mode.
func OpenDB(p *Pool, opts ...stdlib.OptionOpenDB) *sql.DB {
	db := sql.OpenDB(connector{p: p, inner: stdlib.GetPoolConnector(p.p, opts...)})
	db.SetMaxIdleConns(0)
	return db
}

// connector is stdlib's pool connector with Pool's retry loop around it.
type connector struct {
	p     *Pool
	inner driver.Connector
}

// Connect acquires a connection from the pool for database/sql.
func (c connector) Connect(ctx context.Context) (driver.Conn, error) {
	ctx = c.p.g.CallerContext(ctx)
	conn, err := c.inner.Connect(ctx)
	if err != nil {
		err = c.p.retry(ctx, err, func(ctx context.Context) (err error) {
			conn, err = c.inner.Connect(ctx)
			return err
		})
	}
	return conn, err
}

// Driver returns stdlib's driver, as stdlib's own connector does.
func (c connector) Driver() driver.Driver { return c.inner.Driver() }
