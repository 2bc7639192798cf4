package dialer

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"golang.org/x/time/rate"
)

func TestInvalidOptionsNameOptionAndValue(t *testing.T) {
	cases := []struct {
		opt  Option
		want []string
	}{
		{WithStartupJitter(-time.Second), []string{"WithStartupJitter", "-1s"}},
		{WithConnectRate(0, 1), []string{"WithConnectRate", "0"}},
		{WithConnectRate(-3, 1), []string{"WithConnectRate", "-3"}},
		{WithConnectRate(rate.Limit(math.NaN()), 1), []string{"WithConnectRate", "NaN"}},
		{WithConnectRate(10, 0), []string{"WithConnectRate", "burst"}},
		{WithLimiter(nil), []string{"WithLimiter", "nil"}},
		{WithLimiter(rate.NewLimiter(5, 0)), []string{"WithLimiter", "burst 0"}},
		{WithMaxConnecting(0), []string{"WithMaxConnecting", "0"}},
		{WithBackOff(nil), []string{"WithBackOff", "nil"}},
		{WithRand(nil), []string{"WithRand", "nil"}},
		{WithFleet(0, 100), []string{"WithFleet", "size"}},
		{WithFleet(10, 0), []string{"WithFleet", "serverBudget"}},
		{WithFleet(10, math.Inf(1)), []string{"WithFleet", "+Inf"}},
		{WithResponseTarget(1), []string{"WithResponseTarget", "(1)"}},
		{WithResponseTarget(-2), []string{"WithResponseTarget", "-2"}},
		{WithResponseTarget(math.NaN()), []string{"WithResponseTarget", "NaN"}},
		{WithResponseTarget(math.Inf(1)), []string{"WithResponseTarget", "+Inf"}},
	}
	for _, c := range cases {
		_, err := New(c.opt)
		if !errors.Is(err, ErrInvalidOption) {
			t.Errorf("New(%v) err = %v, want ErrInvalidOption", c.want, err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not contain %q", err, w)
			}
		}
		if Classify(err) != Permanent {
			t.Errorf("Classify(%v) = %v, want permanent", err, Classify(err))
		}
	}
}

func TestDefaults(t *testing.T) {
	d, err := New()
	if err != nil {
		t.Fatal(err)
	}
	if p := d.Plan(); p != (Plan{}) {
		t.Errorf("Plan before install = %+v, want zero", p)
	}
	cfg, err := ParseConfig("postgres://u@127.0.0.1:1/x?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Install(cfg); err != nil {
		t.Fatal(err)
	}
	want := Plan{StartupWindow: DefaultStartupJitter, Rate: DefaultConnectRate, Burst: DefaultConnectBurst,
		MaxConnecting: DefaultMaxConnecting, ResponseTarget: DefaultResponseTarget, Warm: 1, Dials: 1}
	if p := d.Plan(); p != want {
		t.Errorf("default plan = %+v, want %+v", p, want)
	}
	if err := d.Install(cfg); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("second Install on the same config: err = %v, want ErrInvalidOption", err)
	}
}

func TestFleetPlan(t *testing.T) {
	cases := []struct {
		name        string
		opts        []Option
		warm, dials int
		want        Plan
	}{
		{"one conn each", []Option{WithFleet(1500, 200)}, 1, 1,
			Plan{StartupWindow: 7500 * time.Millisecond, Rate: rate.Limit(200.0 / 1500), Burst: 1}},
		{"warm-up and prefer", []Option{WithFleet(100, 400)}, 5, 2,
			Plan{StartupWindow: 2500 * time.Millisecond, Rate: 4, Burst: 10}},
		{"rate floor", []Option{WithFleet(100000, 100)}, 1, 1,
			Plan{StartupWindow: 1000 * time.Second, Rate: 1.0 / 60, Burst: 1}},
		{"explicit options win", []Option{WithStartupJitter(time.Second), WithFleet(1000, 100), WithConnectRate(7, 3)}, 1, 1,
			Plan{StartupWindow: time.Second, Rate: 7, Burst: 3}},
		{"shared limiter wins", []Option{WithFleet(10, 100), WithLimiter(rate.NewLimiter(50, 6))}, 1, 1,
			Plan{StartupWindow: 100 * time.Millisecond, Rate: 50, Burst: 6}},
	}
	for _, c := range cases {
		cfg, err := newConfig(c.opts...)
		if err != nil {
			t.Fatal(err)
		}
		got := Plan(cfg.Plan(c.warm, c.dials))
		c.want.MaxConnecting, c.want.Warm, c.want.Dials = DefaultMaxConnecting, c.warm, c.dials
		c.want.ResponseTarget = DefaultResponseTarget
		if got != c.want {
			t.Errorf("%s: plan = %+v, want %+v", c.name, got, c.want)
		}
	}
}

func TestParseConfigHidesPassword(t *testing.T) {
	// pgx's keyword/value parser quotes this whole in its cause; the other
	// strings are in the engine's test of the redaction.
	_, err := ParseConfig("postgress://u:s3cretpw@h/db sslmode=disable")
	if !errors.Is(err, ErrInvalidOption) || Classify(err) != Permanent {
		t.Fatalf("err = %v, want a permanent ErrInvalidOption", err)
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error leaks the password: %v", err)
	}
}

func TestFullJitter(t *testing.T) {
	b := FullJitter(backoff.NewConstantBackOff(time.Second), func() float64 { return 0.25 })
	if got := b.NextBackOff(); got != 250*time.Millisecond {
		t.Errorf("NextBackOff = %v, want 250ms", got)
	}
	stop := FullJitter(&backoff.StopBackOff{}, nil)
	if got := stop.NextBackOff(); got != backoff.Stop {
		t.Errorf("Stop passes through as %v", got)
	}
}
