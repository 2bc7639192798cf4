package dialer

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/jitter"
)

// These tests exercise the waits the gate imposes before the server is
// touched. They run in a synctest bubble, where time is fake and exact, with
// a DialFunc that never reaches the network: it either refuses, like a port
// with no server, or blocks until its context ends, like a frozen one.

// fakeDials records dial times and answers each dial with err (refused when
// nil), or blocks until ctx is done when block is set.
type fakeDials struct {
	mu      sync.Mutex
	times   []time.Time
	lookups int
	block   bool
	err     error
	// serve, when set, answers each dial with a connection whose other
	// end it runs on a goroutine of its own.
	serve func(server net.Conn)
}

// Failures a fake dial can answer with besides refused.
var (
	errReset     = &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)} // accepted, then reset: the server forked
	errPermanent = errors.New("test: no such server")                                                        // not transient: leaves no recovery state
)

func (f *fakeDials) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	f.mu.Lock()
	f.times = append(f.times, time.Now())
	block, dialErr, serve := f.block, f.err, f.serve
	f.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if dialErr != nil {
		return nil, dialErr
	}
	if serve != nil {
		client, server := net.Pipe()
		go func() {
			defer server.Close()
			serve(server)
		}()
		return client, nil
	}
	return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
}

// lookup counts lookups and resolves every host to itself.
func (f *fakeDials) lookup(_ context.Context, host string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lookups++
	return []string{host}, nil
}

// set changes how later dials are answered.
func (f *fakeDials) set(err error, serve func(net.Conn)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err, f.serve = err, serve
}

func (f *fakeDials) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.times)
}

func fakeConfig(t *testing.T, f *fakeDials) *pgx.ConnConfig {
	t.Helper()
	cfg, err := ParseConfig("postgres://u:pw@127.0.0.1:5432/x?sslmode=disable&connect_timeout=0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.DialFunc = f.dial
	cfg.LookupFunc = f.lookup
	return cfg
}

// fakeInstalled returns a Dialer made of opts, installed on fakeConfig(t, f).
func fakeInstalled(t *testing.T, f *fakeDials, opts ...Option) (*Dialer, *pgx.ConnConfig) {
	t.Helper()
	d, err := New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	cfg := fakeConfig(t, f)
	if err := d.Install(cfg); err != nil {
		t.Fatal(err)
	}
	return d, cfg
}

func noRetry() backoff.BackOff { return &backoff.StopBackOff{} }

// emptied takes lim's tokens, as another pool of the process would have.
func emptied(lim *rate.Limiter) *rate.Limiter {
	for lim.Allow() {
	}
	return lim
}

func TestSynctestBucketSpacesDialsExactly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{err: errPermanent} // leaves no recovery state: only the bucket spaces dials
		d, err := New(WithStartupJitter(0), WithConnectRate(10, 1), WithMaxConnecting(50), WithBackOff(noRetry))
		if err != nil {
			t.Fatal(err)
		}
		cfg := fakeConfig(t, f)
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() { _, _ = d.Connect(context.Background(), cfg) })
		}
		wg.Wait()
		if len(f.times) != 8 {
			t.Fatalf("%d dials, want 8", len(f.times))
		}
		first := f.times[0]
		for _, ts := range f.times {
			if ts.Before(first) {
				first = ts
			}
		}
		seen := map[time.Duration]bool{}
		for _, ts := range f.times {
			seen[ts.Sub(first)] = true
		}
		for k := range 8 {
			if at := time.Duration(k) * 100 * time.Millisecond; !seen[at] {
				t.Errorf("no dial at +%v; dials at %v", at, seen)
			}
		}
		if s := d.Stats(); s.RateWait.Count != 7 || s.Dials != 8 || s.Permanent != 8 {
			t.Errorf("stats = %+v, want 7 rate waits, 8 dials, 8 failures", s)
		}
	})
}

func TestSynctestRetryBacksOffWithFullJitter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		policy := func() backoff.BackOff {
			return backoff.WithMaxRetries(FullJitter(backoff.NewExponentialBackOff(
				backoff.WithInitialInterval(100*time.Millisecond), backoff.WithMultiplier(2),
				backoff.WithRandomizationFactor(0), backoff.WithMaxElapsedTime(0)),
				func() float64 { return 0.5 }), 3)
		}
		d, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithBackOff(policy))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, err = d.Connect(context.Background(), fakeConfig(t, f))
		var g *GaveUpError
		if !errors.As(err, &g) || g.Attempts != 4 {
			t.Fatalf("err = %v, want GaveUpError after 4 attempts", err)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("a policy stop reported as a deadline: %v", err)
		}
		// Waits of half of 100ms, 200ms, 400ms.
		want := []time.Duration{0, 50 * time.Millisecond, 150 * time.Millisecond, 350 * time.Millisecond}
		for i, ts := range f.times {
			if got := ts.Sub(start); got != want[i] {
				t.Errorf("attempt %d at +%v, want +%v", i+1, got, want[i])
			}
		}
		if s := d.Stats(); s.Retries != 3 || s.Establishments != 4 || s.BackoffWait.Total != 350*time.Millisecond {
			t.Errorf("stats = %+v, want 3 retries, 4 establishments, 350ms of backoff", s)
		}
	})
}

func TestSynctestRetryStopsAtOnceWhenBackoffCannotFitDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		d, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1),
			WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(time.Second) }))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err = d.Connect(ctx, fakeConfig(t, f))
		var g *GaveUpError
		if !errors.As(err, &g) || g.Attempts != 3 || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want GaveUpError after 3 attempts matching DeadlineExceeded", err)
		}
		if got := time.Since(start); got != 2*time.Second {
			t.Errorf("returned after %v, want 2s: the third wait cannot fit and is not waited", got)
		}
	})
}

func TestSynctestStartupJitterHoldsEveryCallerUntilRelease(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{err: errPermanent}
		d, err := New(WithStartupJitter(time.Second), WithRand(func() float64 { return 0.25 }),
			WithConnectRate(rate.Inf, 1), WithMaxConnecting(10), WithBackOff(noRetry))
		if err != nil {
			t.Fatal(err)
		}
		cfg := fakeConfig(t, f)
		start := time.Now()
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() { _, _ = d.Connect(context.Background(), cfg) })
		}
		wg.Wait()
		for _, ts := range f.times {
			if got := ts.Sub(start); got != 250*time.Millisecond {
				t.Errorf("dial at +%v, want every first dial at the release time +250ms", got)
			}
		}
		if s := d.Stats(); s.JitterWait.Count != 4 {
			t.Errorf("jitter waits = %d, want 4", s.JitterWait.Count)
		}
		// After the release, nobody waits for it again.
		_, _ = d.Connect(context.Background(), cfg)
		if got := f.times[len(f.times)-1].Sub(start); got != 250*time.Millisecond {
			t.Errorf("connect after release dialled at +%v, want at once", got)
		}
	})
}

func TestSynctestShedBeforeTouchingServer(t *testing.T) {
	cases := []struct {
		name string
		opts func() []Option // made in the bubble, where time is fake
		prep func(d *Dialer)
		wait string
	}{
		{"startup jitter", func() []Option {
			return []Option{WithStartupJitter(time.Second), WithRand(func() float64 { return 0.5 })}
		}, nil, "startup jitter"},
		{"rate limit", func() []Option { return []Option{WithStartupJitter(0), WithLimiter(emptied(rate.NewLimiter(1, 1)))} }, nil, "rate limit"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := &fakeDials{}
				d, cfg := fakeInstalled(t, f, append(c.opts(), WithBackOff(noRetry))...)
				if c.prep != nil {
					c.prep(d)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				defer cancel()
				start := time.Now()
				_, err := d.Connect(ctx, cfg)
				if !errors.Is(err, ErrShed) || !errors.Is(err, context.DeadlineExceeded) || Classify(err) != Shed {
					t.Fatalf("err = %v, want a shed error", err)
				}
				if got := time.Since(start); got != 0 {
					t.Errorf("shed after %v, want at once", got)
				}
				if f.count() != 0 {
					t.Errorf("%d dials: a shed connect must not touch the server", f.count())
				}
				if f.lookups != 0 {
					t.Errorf("%d lookups: a shed connect must end at the first thing pgx calls", f.lookups)
				}
				if s := d.Stats(); s.Shed != 1 {
					t.Errorf("shed count = %d, want 1", s.Shed)
				}
			})
		})
	}
}

func TestSynctestRecoveryBackoffBeforeTheNextConnect(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		_, cfg := fakeInstalled(t, f, WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithBackOff(func() backoff.BackOff {
			return backoff.NewConstantBackOff(time.Second)
		}))
		// A plain pgx connect (as pgxpool's background refills make) fails;
		// the next one waits the Dialer's backoff before touching the server.
		start := time.Now()
		if _, err := pgx.ConnectConfig(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("first connect: %v", err)
		}
		if _, err := pgx.ConnectConfig(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("second connect: %v", err)
		}
		if got := f.times[1].Sub(start); got != time.Second {
			t.Errorf("second attempt at +%v, want +1s after the failure", got)
		}
		// A caller whose deadline ends before the backoff is shed.
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if _, err := pgx.ConnectConfig(ctx, cfg); !errors.Is(err, ErrShed) {
			t.Errorf("connect during recovery with a short deadline: %v, want shed", err)
		}
	})
}

func TestSynctestFailuresOfOneOutageDoNotLengthenTheBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		cfg := fakeConfig(t, f)
		// The first two dials are refused together, once both are made.
		both := make(chan struct{})
		var first sync.Once
		var dials sync.WaitGroup
		dials.Add(2)
		cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if f.count() < 2 {
				dials.Done()
				first.Do(func() { go func() { dials.Wait(); close(both) }() })
				<-both
			}
			return f.dial(ctx, network, addr)
		}
		// Two in flight at once, the pacer off (it admits one first).
		d, err := New(WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithMaxConnecting(2), WithResponseTarget(0),
			WithBackOff(func() backoff.BackOff {
				return backoff.NewExponentialBackOff(backoff.WithInitialInterval(time.Second),
					backoff.WithMultiplier(2), backoff.WithRandomizationFactor(0))
			}))
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Install(cfg); err != nil {
			t.Fatal(err)
		}
		// Two connects touch the server together and both fail: one
		// outage, so the backoff is its first interval, 1s, not 2s.
		start := time.Now()
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() { _, _ = pgx.ConnectConfig(context.Background(), cfg) })
		}
		wg.Wait()
		_, _ = pgx.ConnectConfig(context.Background(), cfg)
		if got := f.times[2].Sub(start); got != time.Second {
			t.Errorf("connect after one outage dialled at +%v, want +1s (dials at %v)", got, f.times)
		}
	})
}

// TestSynctestWaitsEndOnCancelAndClose puts establishments in every kind of wait and
// checks that cancelling their context, or closing the Dialer, ends each at
// once.
func TestSynctestWaitsEndOnCancelAndClose(t *testing.T) {
	kinds := []struct {
		name  string
		opts  func() []Option // made in the bubble, where time is fake
		setup func(d *Dialer, f *fakeDials)
	}{
		{"startup jitter", func() []Option { return []Option{WithStartupJitter(time.Hour)} }, nil},
		{"rate limit", func() []Option {
			return []Option{WithStartupJitter(0), WithLimiter(emptied(rate.NewLimiter(0.001, 1)))}
		}, nil},
		{"connecting slot", func() []Option {
			return []Option{WithStartupJitter(0), WithConnectRate(rate.Inf, 1), WithMaxConnecting(1)}
		},
			func(d *Dialer, f *fakeDials) { f.block = true }},
		{"backoff", func() []Option {
			return []Option{WithStartupJitter(0), WithConnectRate(rate.Inf, 1),
				WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(time.Hour) })}
		}, nil},
	}
	for _, k := range kinds {
		for _, end := range []string{"cancel", "close"} {
			t.Run(k.name+"/"+end, func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					f := &fakeDials{}
					d, cfg := fakeInstalled(t, f, k.opts()...)
					if k.setup != nil {
						k.setup(d, f)
					}
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					const n = 5
					errs := make(chan error, n)
					for range n {
						go func() {
							_, err := d.Connect(ctx, cfg)
							errs <- err
						}()
					}
					synctest.Wait() // every caller is now blocked in its wait
					select {
					case err := <-errs:
						t.Fatalf("a caller returned before the end: %v", err)
					default:
					}
					waiting := func() int64 {
						s := d.Stats()
						return s.JitterWait.Waiting + s.RateWait.Waiting + s.SlotWait.Waiting + s.PacerWait.Waiting + s.BackoffWait.Waiting
					}
					want := int64(n)
					if k.name == "connecting slot" {
						want-- // one caller holds the slot, connecting
					}
					if got := waiting(); got != want {
						t.Errorf("stats count %d waits under way, want %d", got, want)
					}
					start := time.Now()
					if end == "cancel" {
						cancel()
					} else {
						d.Close()
					}
					for range n {
						err := <-errs
						want := error(context.Canceled)
						if end == "close" {
							want = ErrClosed
						}
						if !errors.Is(err, want) {
							t.Errorf("err = %v, want %v", err, want)
						}
					}
					if got := time.Since(start); got != 0 {
						t.Errorf("waits ended %v after the %s, want at once", got, end)
					}
					if got := waiting(); got != 0 {
						t.Errorf("stats count %d waits under way after the %s, want 0", got, end)
					}
				})
			})
		}
	}
}

func TestSynctestRefusedDialsGiveTheirTokenBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		lim := rate.NewLimiter(rate.Every(time.Hour), 1)
		d, err := New(WithStartupJitter(0), WithLimiter(lim), WithBackOff(noRetry))
		if err != nil {
			t.Fatal(err)
		}
		refused := &fakeDials{}
		cfg := fakeConfig(t, refused)
		start := time.Now()
		for range 5 {
			if _, err := d.Connect(context.Background(), cfg); Classify(err) != Transient {
				t.Fatalf("connect: %v", err)
			}
		}
		for i, ts := range refused.times {
			if ts != start {
				t.Errorf("refused dial %d at +%v: a refused dial must not use up the hour-long token", i, ts.Sub(start))
			}
		}
		if s := d.Stats(); s.Refunds != 5 {
			t.Errorf("refunds = %d, want 5", s.Refunds)
		}
		// A dial the server accepted (and then reset) keeps its token: the
		// next connect cannot have one within its deadline.
		cfg.DialFunc = (&fakeDials{err: errReset}).dial
		if _, err := d.Connect(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("connect: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := d.Connect(ctx, cfg); !errors.Is(err, ErrShed) {
			t.Errorf("connect after an accepted dial: %v, want shed (the bucket is empty for an hour)", err)
		}
	})
}

// A connect whose host lookup fails dials nothing, and forks nothing: the
// token admit took for its first dial goes back to the bucket.
func TestSynctestFailedLookupGivesItsTokenBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		lim := rate.NewLimiter(rate.Every(time.Hour), 1)
		d, err := New(WithStartupJitter(0), WithLimiter(lim), WithBackOff(noRetry))
		if err != nil {
			t.Fatal(err)
		}
		f := &fakeDials{serve: acceptAfter(0)}
		cfg := fakeConfig(t, f)
		errLookup := &net.DNSError{Err: "no such host", Name: "db.invalid", IsNotFound: true}
		cfg.LookupFunc = func(context.Context, string) ([]string, error) { return nil, errLookup }
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		for range 3 {
			if _, err := d.Connect(ctx, cfg); !errors.As(err, new(*net.DNSError)) {
				t.Fatalf("connect: %v, want the lookup's error (a shed one means the bucket is empty)", err)
			}
		}
		if s := d.Stats(); s.Refunds != 3 || s.Dials != 0 {
			t.Errorf("refunds %d, dials %d; want 3 and 0", s.Refunds, s.Dials)
		}
		cfg.LookupFunc = f.lookup
		conn, err := d.Connect(ctx, cfg)
		if err != nil {
			t.Fatalf("connect once the name resolves: %v, want the hour-long token still in the bucket", err)
		}
		conn.Close(context.Background())
	})
}

func TestSynctestRecoveryKeepsThePhaseOfTheStartupWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		d, cfg := fakeInstalled(t, f, WithStartupJitter(10*time.Second), WithRand(func() float64 { return 0.3 }),
			WithConnectRate(rate.Inf, 1), WithBackOff(func() backoff.BackOff {
				return backoff.WithMaxRetries(backoff.NewConstantBackOff(time.Second), 1)
			}))
		// synctest's clock starts at a whole multiple of 10s since the
		// Unix epoch: the reconnect cycle's phase 0.3 is at 3s, 13s, 23s…
		start := time.Now()
		if start.UnixNano()%int64(10*time.Second) != 0 {
			t.Fatalf("synctest starts at %v, not on a 10s boundary", start)
		}
		// The first connect waits for the startup release at 3s and fails.
		if _, err := pgx.ConnectConfig(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("first connect: %v", err)
		}
		// The next waits for the backoff (1s), then for the process's
		// place in the cycle: 13s.
		if _, err := pgx.ConnectConfig(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("second connect: %v", err)
		}
		if got := []time.Duration{f.times[0].Sub(start), f.times[1].Sub(start)}; got[0] != 3*time.Second || got[1] != 13*time.Second {
			t.Errorf("dials at %v, want [3s 13s]", got)
		}
		// A retry loop's attempts keep the phase too.
		_, _ = d.Connect(context.Background(), cfg) // fails at 23s, retries once at 33s
		if got := []time.Duration{f.times[2].Sub(start), f.times[3].Sub(start)}; got[0] != 23*time.Second || got[1] != 33*time.Second {
			t.Errorf("retry loop dials at %v, want [23s 33s]", got)
		}
	})
}

func TestSynctestRecoverySpreadStartsWhenTheBucketRefills(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{err: errReset} // accepted and reset: the token was spent
		_, cfg := fakeInstalled(t, f, WithStartupJitter(10*time.Second), WithRand(func() float64 { return 0.5 }),
			WithConnectRate(rate.Every(4*time.Second), 1), WithBackOff(noRetry))
		start := time.Now()
		_, _ = pgx.ConnectConfig(context.Background(), cfg) // released at 5s, fails
		_, _ = pgx.ConnectConfig(context.Background(), cfg)
		// The token spent at 5s is back at 9s; the process's place in the
		// 10s cycle after that is 15s, not 9s (when every process of a
		// fleet whose tokens went at 5s would connect together).
		if got := f.times[1].Sub(start); got != 15*time.Second {
			t.Errorf("second dial at +%v, want +15s", got)
		}
	})
}

// cancelRequest is the CancelRequest message for process pid, secret key 7.
func cancelRequest(pid uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte{0, 0, 0, 16, 4, 210, 22, 46}, pid)[:12:12]
}

// readStartup reads the client's startup message, reporting whether it
// came whole.
func readStartup(server net.Conn) bool {
	var n [4]byte
	if _, err := io.ReadFull(server, n[:]); err != nil {
		return false
	}
	_, err := io.CopyN(io.Discard, server, int64(binary.BigEndian.Uint32(n[:]))-4)
	return err == nil
}

// drain reads what the client sends until it closes.
func drain(server net.Conn) { _, _ = io.Copy(io.Discard, server) }

// acceptAfter is a server that reads the startup message, waits took and
// lets the client in (AuthenticationOk, ReadyForQuery), then reads until the
// client leaves.
func acceptAfter(took time.Duration) func(net.Conn) {
	return func(server net.Conn) {
		if !readStartup(server) {
			return
		}
		time.Sleep(took)
		_, _ = server.Write([]byte{'R', 0, 0, 0, 8, 0, 0, 0, 0, 'Z', 0, 0, 0, 5, 'I'})
		drain(server)
	}
}

func TestSynctestCancelRequestsWaitForTheBucketWithinTheirDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{serve: drain}
		lim := rate.NewLimiter(1, 1)
		d, cfg := fakeInstalled(t, f, WithLimiter(lim))
		lim.Allow() // the bucket is empty: the next token comes in 1s
		msg := append(cancelRequest(42), 0, 0, 0, 7)
		cancelWithin := func(deadline time.Duration) error {
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			// A dial outside any establishment is a CancelRequest.
			conn, err := cfg.DialFunc(ctx, "tcp", "127.0.0.1:5432")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_, err = conn.Write(msg)
			return err
		}

		// A deadline the wait cannot fit: not sent, and at once.
		start := time.Now()
		err := cancelWithin(500 * time.Millisecond)
		if !errors.Is(err, ErrShed) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err = %v, want ErrShed and context.DeadlineExceeded", err)
		}
		if got := time.Since(start); got != 0 {
			t.Errorf("the unsendable cancel took %v, want an answer at once", got)
		}
		if s := d.Stats(); s.CancelsShed != 1 || s.CancelDials != 0 || f.count() != 0 || s.Shed != 0 {
			t.Errorf("stats %+v, server saw %d dials: want one cancel shed, no dial, no establishment shed", s, f.count())
		}

		// A deadline it fits: sent when the token comes.
		if err := cancelWithin(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		if got := time.Since(start); got != time.Second {
			t.Errorf("cancel sent after %v, want when the token came (1s)", got)
		}
		if s := d.Stats(); s.CancelDials != 1 || f.count() != 1 || s.RateWait.Count != 1 {
			t.Errorf("stats %+v, server saw %d dials: want one cancel dial after one rate wait", s, f.count())
		}
		// It took the token: no debt.
		if tokens := lim.Tokens(); tokens < -0.01 || tokens > 0.01 {
			t.Errorf("bucket holds %.2f tokens, want 0 after the cancel took the one that came", tokens)
		}

		// Closing the connection ends its wait, and gives the token back.
		lim.Allow()
		ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
		defer cancel()
		conn, err := cfg.DialFunc(ctx, "tcp", "127.0.0.1:5432")
		if err != nil {
			t.Fatal(err)
		}
		wrote := make(chan error, 1)
		go func() { _, err := conn.Write(msg); wrote <- err }()
		synctest.Wait() // the write is waiting for the token
		conn.Close()
		if err := <-wrote; err == nil {
			t.Error("a write whose connection closed while it waited succeeded")
		}
		if s := d.Stats(); s.CancelDials != 1 || s.CancelsShed != 2 {
			t.Errorf("stats %+v: want the closed cancel shed, not dialed", s)
		}
	})
}

func TestSynctestConnectDroppedUnansweredCostsNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// A server that takes the startup message and closes without a
		// word, as a postmaster exiting drops the connections it has not
		// accepted yet. pgx then closes its half-made connection, which
		// sends a CancelRequest for process ID 0.
		f := &fakeDials{serve: func(server net.Conn) {
			_, _ = server.Read(make([]byte, 1024))
		}}
		lim := rate.NewLimiter(rate.Every(time.Hour), 1)
		d, err := New(WithStartupJitter(0), WithLimiter(lim), WithBackOff(noRetry))
		if err != nil {
			t.Fatal(err)
		}
		cfg := fakeConfig(t, f)
		if _, err := d.Connect(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("connect: %v, want a transient failure", err)
		}
		synctest.Wait() // pgx's close runs on a goroutine of its own
		if n := f.count(); n != 1 {
			t.Errorf("server saw %d connections, want 1: the CancelRequest for process 0 must not be dialed", n)
		}
		s := d.Stats()
		if s.CancelsSkipped != 1 || s.CancelDials != 0 {
			t.Errorf("cancels skipped = %d, dialed = %d; want 1, 0", s.CancelsSkipped, s.CancelDials)
		}
		if s.Refunds != 1 {
			t.Errorf("refunds = %d, want 1", s.Refunds)
		}
		if tokens := lim.Tokens(); tokens < 0.99 {
			t.Errorf("bucket holds %.2f tokens, want the hour-long token back", tokens)
		}

		// A server that answered before closing forked a backend: the
		// token stays spent.
		f.set(nil, func(server net.Conn) {
			_, _ = server.Read(make([]byte, 1024))
			_, _ = server.Write([]byte{'R'})
		})
		if _, err := d.Connect(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("connect: %v, want a transient failure", err)
		}
		synctest.Wait()
		if s := d.Stats(); s.Refunds != 1 {
			t.Errorf("refunds = %d after an answered connection, want still 1", s.Refunds)
		}
		if tokens := lim.Tokens(); tokens > 0.01 {
			t.Errorf("bucket holds %.2f tokens, want the token spent", tokens)
		}
	})
}

func TestSynctestRecoverySpreadsAgainWhenTheBucketIsStillEmpty(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{err: errReset} // the token is spent
		_, cfg := fakeInstalled(t, f, WithStartupJitter(10*time.Second), WithRand(func() float64 { return 0.5 }),
			WithConnectRate(rate.Every(4*time.Second), 1), WithBackOff(noRetry))
		start := time.Now()
		_, _ = pgx.ConnectConfig(context.Background(), cfg) // released at 5s, fails: token at 9s, recovery at 15s
		// At 12s a CancelRequest borrows the token that came back at 9s:
		// the next one is due at 16s.
		time.Sleep(12*time.Second - time.Since(start))
		f.set(nil, drain)
		conn, err := cfg.DialFunc(context.Background(), "tcp", "127.0.0.1:5432")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write(append(cancelRequest(42), 0, 0, 0, 7)); err != nil {
			t.Fatal(err)
		}
		conn.Close()
		f.set(errReset, nil)
		// The recovery delay ends at 15s with the bucket empty until
		// 16s: the process's next place in the cycle after that, 25s (not
		// 16s, when a fleet that borrowed together would connect
		// together).
		_, _ = pgx.ConnectConfig(context.Background(), cfg)
		if got := f.times[len(f.times)-1].Sub(start); got != 25*time.Second {
			t.Errorf("dial at +%v, want +25s", got)
		}
	})
}

func TestSynctestBucketWaitDoesNotEatTheConnectTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var dialErr error
		var dialedAt time.Time
		cfg := fakeConfig(t, &fakeDials{})
		cfg.ConnectTimeout = 200 * time.Millisecond
		cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			dialedAt, dialErr = time.Now(), ctx.Err()
			return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
		}
		lim := rate.NewLimiter(rate.Every(600*time.Millisecond), 1)
		lim.Allow()
		d, err := New(WithStartupJitter(0), WithLimiter(lim), WithBackOff(noRetry))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, _ = d.Connect(context.Background(), cfg)
		if got := dialedAt.Sub(start); got != 600*time.Millisecond {
			t.Errorf("dialled at +%v, want +600ms when the token arrives", got)
		}
		if dialErr != nil {
			t.Errorf("the dial's context had already ended (%v): the bucket wait used up connect_timeout", dialErr)
		}
	})
}

func TestSynctestWaitThatLeavesNoTimeToConnectIsShed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		// Two tokens, then one every 300ms.
		lim := rate.NewLimiter(rate.Every(300*time.Millisecond), 2)
		d, cfg := fakeInstalled(t, f, WithStartupJitter(0), WithLimiter(lim), WithBackOff(noRetry))
		// Connects have been taking 40ms, then 80ms: 50ms on average.
		for _, took := range []time.Duration{40 * time.Millisecond, 80 * time.Millisecond} {
			f.set(nil, acceptAfter(took))
			c, err := d.Connect(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			c.Close(context.Background())
		}
		if got := d.g.ConnectTime(); got != 50*time.Millisecond {
			t.Fatalf("average connect time %v, want 50ms", got)
		}
		f.set(nil, nil)
		dials := f.count()
		// The next token comes 300ms after the first two were taken, 120ms
		// ago. A caller with 90ms to spare then would have 90ms to connect
		// and use the connection: less than twice the 50ms connects take
		// (and more than a quarter of its 270ms), so it is answered now.
		tokenAt := time.Now().Add(180 * time.Millisecond)
		ctx, cancel := context.WithDeadline(context.Background(), tokenAt.Add(90*time.Millisecond))
		defer cancel()
		_, err := d.Connect(ctx, cfg)
		if !errors.Is(err, ErrShed) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("connect with 90ms to spare: %v, want shed", err)
		}
		if want := "would leave less than the 100ms a connect and its use need of the 270ms before the caller's deadline"; !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
		if f.count() != dials {
			t.Errorf("the server saw %d dials, want none", f.count()-dials)
		}
		// With 110ms to spare it waits and dials.
		ctx, cancel = context.WithDeadline(context.Background(), tokenAt.Add(110*time.Millisecond))
		defer cancel()
		if _, err := d.Connect(ctx, cfg); errors.Is(err, ErrShed) {
			t.Fatalf("connect with 110ms to spare: %v, want a dial", err)
		}
		if f.count() != dials+1 {
			t.Errorf("the server saw %d dials, want 1", f.count()-dials)
		}
	})
}

// A connect's average time, learned on an idle server, says little of what
// the next one takes on a busy one, after a restart say, nor of the caller's
// query: a wait that would leave the caller less than a quarter of its time
// is shed however fast connects have been.
func TestSynctestWaitThatLeavesLessThanAQuarterIsShed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		// One token, then one every 6s.
		start := time.Now()
		lim := rate.NewLimiter(rate.Every(6*time.Second), 1)
		d, cfg := fakeInstalled(t, f, WithStartupJitter(0), WithLimiter(lim), WithBackOff(noRetry))
		f.set(nil, acceptAfter(5*time.Millisecond))
		c, err := d.Connect(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.Close(context.Background())
		if got := d.g.ConnectTime(); got != 5*time.Millisecond {
			t.Fatalf("average connect time %v, want 5ms", got)
		}
		dials := f.count()
		// The next token comes 6s from now. A caller with 7.9s would have
		// 1.9s left: far more than twice 5ms, less than a quarter of 7.9s.
		ctx, cancel := context.WithTimeout(context.Background(), 7900*time.Millisecond)
		defer cancel()
		if c, err = d.Connect(ctx, cfg); err == nil {
			c.Close(context.Background())
		}
		if !errors.Is(err, ErrShed) {
			t.Fatalf("connect with 1.9s of 7.9s to spare: %v, want shed", err)
		}
		if want := "would leave less than the 1.975s a connect and its use need of the 7.9s before the caller's deadline"; !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
		if f.count() != dials {
			t.Errorf("the server saw %d dials, want none", f.count()-dials)
		}
		// A caller with 8.1s waits for the token and dials: a quarter of
		// its time is left.
		ctx, cancel = context.WithTimeout(context.Background(), 8100*time.Millisecond)
		defer cancel()
		c, err = d.Connect(ctx, cfg)
		if err != nil {
			t.Fatalf("connect with 2.1s of 8.1s to spare: %v, want a connection", err)
		}
		c.Close(context.Background())
		if got := time.Since(start); got != 6*time.Second+5*time.Millisecond {
			t.Errorf("connected at +%v, want at the token (+6s) and 5ms later", got)
		}
		if f.count() != dials+1 {
			t.Errorf("the server saw %d dials, want 1", f.count()-dials)
		}
	})
}

func TestSynctestRefusedCancelRequestGivesItsTokenBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		lim := rate.NewLimiter(rate.Every(time.Hour), 1)
		f := &fakeDials{} // refuses
		_, cfg := fakeInstalled(t, f, WithLimiter(lim))
		conn, err := cfg.DialFunc(context.Background(), "tcp", "127.0.0.1:5432")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write(append(cancelRequest(42), 0, 0, 0, 7)); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("write: %v, want the refusal", err)
		}
		if f.count() != 1 {
			t.Errorf("server saw %d dials, want 1", f.count())
		}
		if tokens := lim.Tokens(); tokens < 0.99 {
			t.Errorf("bucket holds %.2f tokens, want the refused cancel's token back", tokens)
		}
	})
}

// A numbered fleet whose server is down comes back within one window of the
// server, one member at a time on an even grid, at its budget.
func TestSynctestFleetMembersReconnectOnTheirGridWithinOneWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const (
			size   = 20
			budget = 10.0                    // connections/s: a 2s window
			up     = 5300 * time.Millisecond // the server comes back
			accept = 10 * time.Millisecond
		)
		window := time.Duration(size / budget * float64(time.Second))
		f := &fakeDials{} // refused until up
		start := time.Now()
		go func() {
			time.Sleep(up)
			f.set(nil, acceptAfter(accept))
		}()
		connected := make([]time.Duration, size)
		var wg sync.WaitGroup
		for i := range size {
			// Every member draws the same place, 0.5: only the member
			// index spreads them.
			d, cfg := fakeInstalled(t, f, WithFleet(size, budget), WithFleetMember(i), WithRand(func() float64 { return 0.5 }),
				WithBackOff(func() backoff.BackOff { return backoff.NewConstantBackOff(100 * time.Millisecond) }))
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				conn, err := d.Connect(ctx, cfg)
				if err != nil {
					t.Errorf("member %d: %v", i, err)
					return
				}
				connected[i] = time.Since(start)
				conn.Close(context.Background())
			})
		}
		wg.Wait()
		for i, at := range connected {
			// Member i's place in each 2s cycle is (i + ½)/20 of it.
			phase := time.Duration((float64(i) + 0.5) / size * float64(window))
			if want := start.Add(up).Add(window).Add(accept); start.Add(at).After(want) {
				t.Errorf("member %d connected at %v, later than a window after the server came back (%v)", i, at, want.Sub(start))
			}
			if off := (at - accept) % window; off != phase {
				t.Errorf("member %d connected at %v, %v into a cycle, want at its place %v", i, at, off, phase)
			}
		}
		// After the server is up, no second carries more than the budget.
		var after []time.Time
		for _, at := range f.times {
			if !at.Before(start.Add(up)) {
				after = append(after, at)
			}
		}
		checkPerSecond(t, after, budget, start)
		// While it was down, each member tried at its start, then at most
		// once a cycle.
		cycles := int((up + window - 1) / window)
		if refused, most := len(f.times)-len(after), size*(1+cycles); refused > most {
			t.Errorf("%d refused dials while down, want at most %d: one per member at start and per cycle", refused, most)
		}
	})
}

// A numbered fleet that connected at its start and connects again as soon
// as its buckets refill (its connections died with no failed connect, so
// no reconnect cycle began) still dials at its budget: waits for a token
// end on each member's place in a cycle of one refill, not on the refill
// times the start's decelerating schedule left.
func TestSynctestFleetTokenWaitsEndOnTheMembersGrid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const (
			size   = 20
			budget = 10.0 // connections/s: a 2s window, a token per member every 2s
		)
		f := &fakeDials{}
		f.set(nil, acceptAfter(0))
		start := time.Now()
		var wg sync.WaitGroup
		for i := range size {
			d, cfg := fakeInstalled(t, f, WithFleet(size, budget), WithFleetMember(i), WithResponseTarget(0))
			wg.Go(func() {
				for range 2 {
					conn, err := d.Connect(context.Background(), cfg)
					if err != nil {
						t.Errorf("member %d: %v", i, err)
						return
					}
					conn.Close(context.Background())
				}
			})
		}
		wg.Wait()
		if n := f.count(); n != 2*size {
			t.Fatalf("%d dials, want %d", n, 2*size)
		}
		// The second connects: no second carries more than the budget.
		second := f.times[size:]
		checkPerSecond(t, second, budget, start)
	})
}

// A fleet member whose connect the server forked for and then failed (here,
// answered with a byte and closed) gets its token back: it tries again at
// its next place in the reconnect cycle, not a whole refill later and then
// at its place.
func TestSynctestFleetMemberTransientFailureKeepsItsPlace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		f.set(nil, func(server net.Conn) {
			_, _ = server.Read(make([]byte, 1024))
			_, _ = server.Write([]byte{'R'})
		})
		// Fleet of 10 at 1/s: a 10s window and cycle, one token per 10s;
		// member 3's place is 3.5s into each cycle, and its startup delay
		// (the decelerating window) 2.74s.
		d, cfg := fakeInstalled(t, f, WithFleet(10, 1), WithFleetMember(3), WithBackOff(noRetry), WithResponseTarget(0))
		start := time.Now()
		if _, err := pgx.ConnectConfig(context.Background(), cfg); Classify(err) != Transient {
			t.Fatalf("first connect: %v, want a transient failure", err)
		}
		first := f.times[0].Sub(start)
		_, _ = pgx.ConnectConfig(context.Background(), cfg)
		// Without the token back: refilled at 12.74s, then its place, 13.5s.
		if got := f.times[1].Sub(start); got != 3500*time.Millisecond {
			t.Errorf("dials at %v and %v, want the second at its place in this cycle, 3.5s", first, got)
		}
		if s := d.Stats(); s.Refunds != 2 {
			t.Errorf("refunds = %d, want both failed connects' tokens back", s.Refunds)
		}
	})
}

// checkPerSecond fails t if any second from one of dials on carries more
// than most of them (times reported from start).
func checkPerSecond(t *testing.T, dials []time.Time, most int, start time.Time) {
	t.Helper()
	for _, from := range dials {
		n := 0
		for _, at := range dials {
			if !at.Before(from) && at.Before(from.Add(time.Second)) {
				n++
			}
		}
		if n > most {
			t.Errorf("%d dials in the second from %v, want at most the budget %d", n, from.Sub(start), most)
		}
	}
}

// A fleet member does not queue a CancelRequest for its bucket: it holds
// one token a window, and a cancel waiting for it would put the member's
// next connect a whole cycle later.
func TestSynctestFleetMemberSendsNoCancelItMustWaitFor(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		f.set(nil, acceptAfter(0))
		// Fleet of 10 at 1/s: one token per 10s; member 3's place is 3.5s
		// into each cycle, its startup delay 2.74s.
		d, cfg := fakeInstalled(t, f, WithFleet(10, 1), WithFleetMember(3), WithBackOff(noRetry), WithResponseTarget(0))
		start := time.Now()
		conn, err := pgx.ConnectConfig(context.Background(), cfg) // takes the token at 2.74s
		if err != nil {
			t.Fatal(err)
		}
		conn.Close(context.Background())
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		c, err := cfg.DialFunc(ctx, "tcp", "127.0.0.1:5432")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(append(cancelRequest(42), 0, 0, 0, 7)); err == nil {
			t.Error("CancelRequest sent, want it not sent: the bucket is empty until 12.74s")
		}
		c.Close()
		if s := d.Stats(); s.CancelsShed != 1 || s.CancelDials != 0 {
			t.Errorf("cancels shed %d, dialed %d; want 1 and 0", s.CancelsShed, s.CancelDials)
		}
		// The member's next connect takes the token refilled at 12.74s,
		// at its place in the cycle: 13.5s.
		conn, err = pgx.ConnectConfig(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		conn.Close(context.Background())
		if got := f.times[len(f.times)-1].Sub(start); got != 13500*time.Millisecond {
			t.Errorf("next connect dialed at %v, want 13.5s", got)
		}
	})
}

// A fleet member's bucket holds one connect to spare once it has refilled:
// a CancelRequest (pgx sends one whenever it closes a busy connection) may
// take it, and the connect that replaces the connection still goes at once
// instead of a refill later; with no spare the CancelRequest is not sent.
func TestSynctestFleetMemberKeepsItsNextConnectsToken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{}
		f.set(nil, acceptAfter(0))
		// Fleet of 10 at 1/s: one token per 10s, burst 2; member 3's place
		// is 3.5s into each cycle, its startup delay 2.74s.
		d, cfg := fakeInstalled(t, f, WithFleet(10, 1), WithFleetMember(3), WithBackOff(noRetry), WithResponseTarget(0))
		start := time.Now()
		connect := func() time.Duration {
			t.Helper()
			conn, err := pgx.ConnectConfig(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			conn.Close(context.Background())
			return f.times[len(f.times)-1].Sub(start)
		}
		cancelSent := func() bool {
			t.Helper()
			c, err := cfg.DialFunc(context.Background(), "tcp", "127.0.0.1:5432")
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, err = c.Write(append(cancelRequest(42), 0, 0, 0, 7))
			return err == nil
		}
		// The start: the spare accrues over the first refill, so a second
		// connect waits for it, at the member's place: 13.5s.
		if got, want := connect(), jitter.Decelerating(10*time.Second, 0.35); got != want {
			t.Fatalf("first connect at %v, want its startup delay, %v", got, want)
		}
		if got := connect(); got != 13500*time.Millisecond {
			t.Errorf("second connect at %v, want 13.5s", got)
		}
		// Refilled: a CancelRequest goes, and the connect after it too.
		time.Sleep(time.Until(start.Add(40 * time.Second)))
		if !cancelSent() {
			t.Error("CancelRequest not sent with a token to spare")
		}
		if got := connect(); got != 40*time.Second {
			t.Errorf("connect after the CancelRequest at %v, want at once, 40s", got)
		}
		// One connect's token left, as when a replaced connection is lost
		// again: no CancelRequest, and the connect goes at once.
		time.Sleep(time.Until(start.Add(60 * time.Second)))
		if got := connect(); got != 60*time.Second {
			t.Fatalf("connect at %v, want at once, 60s", got)
		}
		if cancelSent() {
			t.Error("CancelRequest sent with the next connect's token")
		}
		if got := connect(); got != 60*time.Second {
			t.Errorf("connect after the CancelRequest not sent at %v, want at once, 60s", got)
		}
		if s := d.Stats(); s.CancelDials != 1 || s.CancelsShed != 1 {
			t.Errorf("cancels dialed %d, shed %d; want 1 and 1", s.CancelDials, s.CancelsShed)
		}
	})
}

// answerThenReady is a server that reads the startup message, answers
// (AuthenticationOk) after fork, and lets the client in (ReadyForQuery)
// after startup more: a backend's first byte comes before its start-up
// work, which runs beside every other backend starting at once.
func answerThenReady(fork, startup time.Duration) func(net.Conn) {
	return func(server net.Conn) {
		if !readStartup(server) {
			return
		}
		time.Sleep(fork)
		if _, err := server.Write([]byte{'R', 0, 0, 0, 8, 0, 0, 0, 0}); err != nil {
			return
		}
		time.Sleep(startup)
		_, _ = server.Write([]byte{'Z', 0, 0, 0, 5, 'I'})
		drain(server)
	}
}

// The pacer counts an establishment until the connection is ready, not
// until the server's first byte: the backend's start-up after it is load
// the server's other clients wait behind, and the pacer's sample (and so
// its baseline) is the whole establishment.
func TestSynctestPacerHoldsItsSlotUntilTheConnectionIsReady(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const fork, startup = time.Millisecond, 50 * time.Millisecond
		f := &fakeDials{serve: answerThenReady(fork, startup)}
		d, cfg := fakeInstalled(t, f, WithStartupJitter(0))
		start := time.Now()
		connectAll(t, 2, func() (*pgx.Conn, error) { return pgx.ConnectConfig(context.Background(), cfg) })
		f.mu.Lock()
		times := f.times
		f.mu.Unlock()
		if len(times) != 2 {
			t.Fatalf("%d dials, want 2", len(times))
		}
		if got := times[1].Sub(start); got < fork+startup {
			t.Errorf("second dial %v after the first, want it once the first connection was ready (%v): the pacer starts at one in flight", got, fork+startup)
		}
		if s := d.Stats(); s.Baseline != fork+startup {
			t.Errorf("pacer baseline %v, want the whole establishment's %v", s.Baseline, fork+startup)
		}
	})
}

// The server's facts bound the first byte of an idle connect, not the
// backend's start-up after it: a server that forks 1,000 backends a second
// does not authenticate and start one up in 2ms.
func TestSynctestFactsBoundLeavesTheStartUpAfterTheFirstByte(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const fork, startup = time.Millisecond, 50 * time.Millisecond
		f := &fakeDials{serve: answerThenReady(fork, startup)}
		d, cfg := fakeInstalled(t, f, WithStartupJitter(0))
		connectAll(t, 2, func() (*pgx.Conn, error) { return pgx.ConnectConfig(context.Background(), cfg) })
		// 101 backends started within a tenth of a second: 1,000 forks a
		// second, 2ms for two.
		d.g.LearnFacts(100, 101, 101, time.Now())
		if s := d.Stats(); s.Baseline != fork+startup || s.Decreases != 0 {
			t.Errorf("pacer baseline %v after %d decreases, want the idle %v kept: the facts bound the first byte, and the %v start-up after it is no queue",
				s.Baseline, s.Decreases, fork+startup, startup)
		}
	})
}

// A single-connection process whose connects were answered inside a storm
// has a pacer limit far below one, and no further answers to raise it on.
// Long after, the connect that replaces a connection lost at once goes
// after one answer's pause, not 63 of them: a quiet spell wakes the
// pacer to one prober, its baseline kept.
func TestSynctestPacerBelowOneWakesAfterAQuietSpell(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeDials{serve: answerThenReady(time.Millisecond, 4*time.Millisecond)}
		d, cfg := fakeInstalled(t, f, WithStartupJitter(0), WithConnectRate(rate.Inf, 1))
		connect := func() {
			t.Helper()
			conn, err := pgx.ConnectConfig(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			conn.Close(context.Background())
		}
		connect() // baseline 5ms, allowed 10ms
		// A storm: answers of 400ms cut the limit to its floor.
		f.set(nil, answerThenReady(400*time.Millisecond, 0))
		for d.Stats().ConnectLimit > 1.0/64 {
			connect()
		}
		// Long after, answers of 15ms, over allowed: the first connect goes
		// at once, the second after the pause the first one's answer calls
		// for.
		time.Sleep(time.Minute)
		f.set(nil, answerThenReady(15*time.Millisecond, 0))
		connect()
		answered := time.Now()
		connect()
		f.mu.Lock()
		last := f.times[len(f.times)-1]
		f.mu.Unlock()
		// Woken to 1, the 15ms answer cuts it to 2/3: a 5ms pause. Not
		// woken, 1/64 and a pause of 63 × 10ms.
		if got := last.Sub(answered); got > 10*time.Millisecond {
			t.Errorf("the next connect went %v after the answer, want within 10ms: the storm's limit is stale (%+v)", got, d.Stats())
		}
		if s := d.Stats(); s.Baseline != 5*time.Millisecond {
			t.Errorf("baseline %v, want the 5ms one kept", s.Baseline)
		}
	})
}

// A Close while a dial is under way ends it: the dial returns the
// cancellation (context.Canceled, as net.Dialer does, not Close's cause),
// and the establishment counts as closed, not as a permanent failure, in
// Stats and in its span's error.type.
func TestSynctestCloseDuringADialCountsAsClosed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dials := &fakeDials{block: true}
		d, cfg := fakeInstalled(t, dials, WithStartupJitter(0), WithBackOff(noRetry))
		errs := make(chan error, 1)
		go func() {
			_, err := d.Connect(context.Background(), cfg)
			errs <- err
		}()
		synctest.Wait() // the dial is blocked
		if got := len(dials.times); got != 1 {
			t.Fatalf("%d dials under way, want 1", got)
		}
		d.Close()
		if err := <-errs; err == nil {
			t.Fatal("a connect whose dial Close ended succeeded")
		}
		if s := d.Stats(); s.Closed != 1 || s.Permanent != 0 {
			t.Errorf("stats closed %d, permanent %d; want 1 and 0", s.Closed, s.Permanent)
		}
	})
}
