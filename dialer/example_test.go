package dialer_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/dialer"
)

// A fleet of 1,500 workers that each open one connection, against a server
// that should take about 200 new connections a second from all of them.
func ExampleWithFleet() {
	d, err := dialer.New(dialer.WithFleet(1500, 200))
	if err != nil {
		panic(err)
	}
	cfg, err := dialer.ParseConfig("postgres://app@db.internal/app?sslmode=disable")
	if err != nil {
		panic(err)
	}
	if err := d.Install(cfg); err != nil {
		panic(err)
	}
	p := d.Plan()
	fmt.Printf("first connect within %v, then %.3f connects/s\n", p.StartupWindow, float64(p.Rate))
	// Output: first connect within 7.5s, then 0.133 connects/s
}

// Gate an existing pgxpool configuration; pgxpool.NewWithConfig(ctx, cfg)
// then makes every connection through it.
func ExampleDialer_InstallPool() {
	cfg, err := pgxpool.ParseConfig("postgres://app@db.internal/app?pool_min_conns=4&sslmode=disable")
	if err != nil {
		panic(err)
	}
	d, err := dialer.New(dialer.WithFleet(100, 400), dialer.WithMaxConnecting(2))
	if err != nil {
		panic(err)
	}
	if err := d.InstallPool(cfg); err != nil {
		panic(err)
	}
	fmt.Println(d.Plan().StartupWindow, d.Plan().Burst)
	// Output: 1s 5
}

// Invalid options fail in New, naming the option and the value.
func ExampleNew_invalid() {
	_, err := dialer.New(dialer.WithConnectRate(rate.Limit(50), 0))
	fmt.Println(errors.Is(err, dialer.ErrInvalidOption))
	fmt.Println(err)
	// Output:
	// true
	// pgstagger: invalid configuration: WithConnectRate(50, 0): burst must be at least 1
}

// A caller whose deadline falls before its turn in the bucket is answered at
// once, without touching the server.
func ExampleErrShed() {
	shared := rate.NewLimiter(rate.Every(time.Hour), 1)
	shared.Allow() // another pool of the process took the last token
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	_, err := dialer.Connect(ctx, "postgres://app@127.0.0.1:1/app?sslmode=disable",
		dialer.WithStartupJitter(0), dialer.WithLimiter(shared))
	fmt.Println(errors.Is(err, dialer.ErrShed), errors.Is(err, context.DeadlineExceeded))
	// Output: true true
}

// A retry loop of your own asks Classify whether to try again.
func ExampleClassify() {
	for _, err := range []error{nil, dialer.ErrClosed, fmt.Errorf("%w: bad", dialer.ErrInvalidOption)} {
		fmt.Println(dialer.Classify(err))
	}
	// Output:
	// ok
	// closed
	// permanent
}
