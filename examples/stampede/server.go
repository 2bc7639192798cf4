package main

import (
	"context"
	"net"

	"github.com/jackc/pgx/v5/pgconn"
)

// server is what the demo runs against: a real PostgreSQL server, or the
// simulated one (-simulate), reached through its dial and lookup functions.
type server struct {
	url string
	// dial and lookup reach the server; nil: the network's.
	dial   pgconn.DialFunc
	lookup pgconn.LookupFunc
	// restart restarts the server and returns once it accepts
	// connections again; nil when the demo cannot (-url).
	restart func() error
	// lite: the bystander and the measurements connect with the lite
	// client (-client lite), as the fleet does.
	lite bool
	// query runs the lite client's queries on the simulated server
	// without the wire protocol (simpg.Server.Query); nil: through it.
	query queryFunc
	// sideBySide, for a simulated server, starts run in a bubble of its
	// own against a simulated server of its own, and returns a function
	// that waits for it to return (see eachRun); nil for a real server.
	sideBySide func(run func(srv *server)) (wait func())
}

// queryFunc runs sql on the session of backend pid and returns its one row.
type queryFunc func(ctx context.Context, pid int, sql string) ([]int, error)

// conn is a connection the bystander and the measurements open and
// close.
type conn interface{ Close(context.Context) error }

// open opens a connection as the bystander and the measurements do: with
// pgconn, or the lite client.
func (s *server) open(ctx context.Context) (conn, error) {
	if !s.lite {
		c, err := s.connect(ctx)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	cfg, err := pgconn.ParseConfig(s.url)
	if err != nil {
		return nil, err
	}
	s.configure(cfg)
	c, err := liteConnect(ctx, cfg, nil)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// configure points cfg at the server.
func (s *server) configure(cfg *pgconn.Config) {
	if s.dial == nil {
		var nd net.Dialer
		cfg.DialFunc = nd.DialContext
	} else {
		cfg.DialFunc = s.dial
	}
	if s.lookup != nil {
		cfg.LookupFunc = s.lookup
	}
}

// connect opens a connection with pgconn, as the bystander and the
// measurements do.
func (s *server) connect(ctx context.Context) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(s.url)
	if err != nil {
		return nil, err
	}
	s.configure(cfg)
	return pgconn.ConnectConfig(ctx, cfg)
}
