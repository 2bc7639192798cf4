package pool_test

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/pool"
)

// The one-line migration from pgxpool.New: no option is needed to protect
// the server, and New does no I/O.
func ExampleNew() {
	ctx := context.Background()
	p, err := pool.New(ctx, "postgres://app@db.internal/app?sslmode=disable&pool_max_conns=10")
	if err != nil {
		panic(err)
	}
	defer p.Close()
	plan := p.Dialer().Plan()
	fmt.Println(plan.StartupWindow, plan.Rate, plan.Burst, plan.MaxConnecting, plan.ResponseTarget)
	// Output: 1s 200 32 32 1.5
}

// Budget a fleet: 300 workers start together, each keeping 2 connections
// warm, and the server should take about 150 new connections a second.
func ExampleWithFleet() {
	ctx := context.Background()
	p, err := pool.New(ctx, "postgres://app@db.internal/app?sslmode=disable&pool_min_conns=2",
		pool.WithFleet(300, 150))
	if err != nil {
		panic(err)
	}
	defer p.Close()
	plan := p.Dialer().Plan()
	fmt.Printf("window %v, %.1f connects/s per worker\n", plan.StartupWindow, float64(plan.Rate))
	// Output: window 4s, 0.5 connects/s per worker
}

// An operator sets the fleet per deployment in DATABASE_URL; each worker of
// a StatefulSet knows its ordinal, here 150 of 300, and starts in its own
// slot of the window.
func ExampleWithFleetMember() {
	ctx := context.Background()
	url := "postgres://app@db.internal/app?sslmode=disable&pgstagger_fleet_size=300&pgstagger_fleet_budget=150"
	p, err := pool.New(ctx, url, pool.WithFleetMember(150))
	if err != nil {
		panic(err)
	}
	defer p.Close()
	plan := p.Dialer().Plan()
	fmt.Printf("window %v, member %d starts after %v\n", plan.StartupWindow, plan.FleetMember, plan.StartupDelay.Round(time.Millisecond))
	// Output: window 2s, member 150 starts after 837ms
}

// Count the server's connections at most once a minute, to size the
// reconnect window after a restart. Until the first count, which comes
// with the first Acquire, the window is the startup window.
func ExampleWithServerFacts() {
	ctx := context.Background()
	p, err := pool.New(ctx, "postgres://app@db.internal/app?sslmode=disable", pool.WithServerFacts(time.Minute))
	if err != nil {
		panic(err)
	}
	defer p.Close()
	fmt.Println(p.Dialer().RecoveryWindow(), p.Dialer().Stats().ServerConns)
	// Output: 1s 0
}

// Several pools of one process share a bucket.
func ExampleWithLimiter() {
	ctx := context.Background()
	shared := rate.NewLimiter(50, 5)
	orders, err := pool.New(ctx, "postgres://app@orders.internal/orders?sslmode=disable", pool.WithLimiter(shared))
	if err != nil {
		panic(err)
	}
	defer orders.Close()
	users, err := pool.New(ctx, "postgres://app@users.internal/users?sslmode=disable", pool.WithLimiter(shared))
	if err != nil {
		panic(err)
	}
	defer users.Close()
	fmt.Println(orders.Dialer().Plan().Rate, users.Dialer().Plan().Rate)
	// Output: 50 50
}

// An existing pgxpool configuration, hooks included, keeps working.
func ExampleNewWithConfig() {
	cfg, err := pgxpool.ParseConfig("postgres://app@db.internal/app?sslmode=disable")
	if err != nil {
		panic(err)
	}
	cfg.MaxConnLifetime = 30 * time.Minute
	p, err := pool.NewWithConfig(context.Background(), cfg, pool.WithLifetimeJitter(90*time.Second))
	if err != nil {
		panic(err)
	}
	defer p.Close()
	fmt.Println(p.Config().MaxConnLifetime) // the configuration as given
	// Output: 30m0s
}

// database/sql with the pool's protections and retries, for code that needs
// a *sql.DB: GORM (gorm.Open(postgres.New(postgres.Config{Conn: db}))), ent
// (entsql.OpenDB(dialect.Postgres, db)), sqlx (sqlx.NewDb(db, "pgx")). A
// call made while the server restarts waits for it, under its context.
func ExampleOpenDB() {
	ctx := context.Background()
	p, err := pool.New(ctx, "postgres://app@db.internal/app?sslmode=disable&pool_max_conns=10")
	if err != nil {
		panic(err)
	}
	defer p.Close()
	db := pool.OpenDB(p)
	defer db.Close() // before p.Close: it returns the connections to p

	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var n int
	if err := db.QueryRowContext(ctx, "select count(*) from orders").Scan(&n); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(n)
}
