package dialer

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"golang.org/x/time/rate"

	"github.com/pgstagger/pgstagger/jitter"
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
		{WithFleetMember(-1), []string{"WithFleetMember", "-1"}},
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
	p := d.Plan()
	if p.Phase < 0 || p.Phase >= 1 || p.StartupDelay != jitter.Uniform(DefaultStartupJitter, p.Phase) {
		t.Errorf("default phase %v, startup delay %v: want a draw in [0, 1) and that share of %v", p.Phase, p.StartupDelay, DefaultStartupJitter)
	}
	want := Plan{StartupWindow: DefaultStartupJitter, StartupDelay: p.StartupDelay, Phase: p.Phase,
		Rate: DefaultConnectRate, Burst: DefaultConnectBurst,
		MaxConnecting: DefaultMaxConnecting, ResponseTarget: DefaultResponseTarget, Warm: 1, Dials: 1, FleetMember: -1}
	if p != want {
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
			Plan{StartupWindow: 7500 * time.Millisecond, StartupDelay: 3125 * time.Millisecond, Phase: 0.5,
				Rate: rate.Limit(200.0 / 1500), Burst: 2, FleetSize: 1500, FleetBudget: 200, FleetMember: -1}},
		{"warm-up and prefer", []Option{WithFleet(100, 400)}, 5, 2,
			Plan{StartupWindow: 2500 * time.Millisecond, StartupDelay: 2500 * time.Millisecond * 5 / 12, Phase: 0.5,
				Rate: 4, Burst: 12, FleetSize: 100, FleetBudget: 400, FleetMember: -1}},
		{"rate floor", []Option{WithFleet(100000, 100)}, 1, 1,
			Plan{StartupWindow: 1000 * time.Second, StartupDelay: 1000 * time.Second * 5 / 12, Phase: 0.5,
				Rate: 1.0 / 60, Burst: 2, FleetSize: 100000, FleetBudget: 100, FleetMember: -1}},
		{"explicit options win", []Option{WithStartupJitter(time.Second), WithFleet(1000, 100), WithConnectRate(7, 3)}, 1, 1,
			Plan{StartupWindow: time.Second, StartupDelay: time.Second * 5 / 12, Phase: 0.5,
				Rate: 7, Burst: 3, FleetSize: 1000, FleetBudget: 100, FleetMember: -1}},
		{"shared limiter wins", []Option{WithFleet(10, 100), WithLimiter(rate.NewLimiter(50, 6))}, 1, 1,
			Plan{StartupWindow: 100 * time.Millisecond, StartupDelay: 100 * time.Millisecond * 5 / 12, Phase: 0.5,
				Rate: 50, Burst: 6, FleetSize: 10, FleetBudget: 100, FleetMember: -1}},
		{"member on the grid", []Option{WithFleet(10, 100), WithFleetMember(7)}, 1, 1,
			Plan{StartupWindow: 100 * time.Millisecond, StartupDelay: jitter.Decelerating(100*time.Millisecond, 0.75), Phase: 0.75,
				Rate: 10, Burst: 2, FleetSize: 10, FleetBudget: 100, FleetMember: 7}},
		{"no fleet: uniform", []Option{WithStartupJitter(time.Second)}, 1, 1,
			Plan{StartupWindow: time.Second, StartupDelay: time.Second / 2, Phase: 0.5,
				Rate: DefaultConnectRate, Burst: DefaultConnectBurst, FleetMember: -1}},
	}
	for _, c := range cases {
		cfg, err := newConfig(c.opts...)
		if err != nil {
			t.Fatal(err)
		}
		got := Plan(cfg.Plan(c.warm, c.dials, 0.5))
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

func TestFleetFromConnectionString(t *testing.T) {
	install := func(connString string, opts ...Option) (Plan, *pgx.ConnConfig, error) {
		t.Helper()
		d, err := New(opts...)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		cfg, err := ParseConfig(connString)
		if err != nil {
			t.Fatal(err)
		}
		err = d.Install(cfg)
		return d.Plan(), cfg, err
	}
	const base = "postgres://u@127.0.0.1:1/x?sslmode=disable"

	p, cfg, err := install(base + "&pgstagger_fleet_size=500&pgstagger_fleet_budget=250&pgstagger_fleet_member=125&application_name=w")
	if err != nil {
		t.Fatal(err)
	}
	if p.FleetSize != 500 || p.FleetBudget != 250 || p.FleetMember != 125 || p.Phase != 125.5/500 || p.StartupWindow != 2*time.Second {
		t.Errorf("plan = %+v, want fleet 500 at 250/s, member 125 at phase 0.251, window 2s", p)
	}
	for k := range cfg.RuntimeParams {
		if strings.HasPrefix(k, "pgstagger_") {
			t.Errorf("parameter %s left for pgx to send to the server", k)
		}
	}
	if cfg.RuntimeParams["application_name"] != "w" {
		t.Errorf("runtime params = %v, want application_name kept", cfg.RuntimeParams)
	}

	// Keyword/value strings carry them too, and they win over the options.
	p, _, err = install("host=127.0.0.1 port=1 user=u sslmode=disable pgstagger_fleet_size=40 pgstagger_fleet_member=3",
		WithFleet(1000, 80), WithFleetMember(999))
	if err != nil {
		t.Fatal(err)
	}
	if p.FleetSize != 40 || p.FleetBudget != 80 || p.FleetMember != 3 {
		t.Errorf("plan = %+v, want size and member from the string (40, 3), budget from WithFleet (80)", p)
	}

	for _, c := range []struct {
		connString string
		opts       []Option
		want       []string
	}{
		{base + "&pgstagger_fleet_size=ten&pgstagger_fleet_budget=5", nil, []string{"pgstagger_fleet_size", `"ten"`}},
		{base + "&pgstagger_fleet_size=0&pgstagger_fleet_budget=5", nil, []string{"pgstagger_fleet_size", `"0"`}},
		{base + "&pgstagger_fleet_size=10&pgstagger_fleet_budget=-5", nil, []string{"pgstagger_fleet_budget", `"-5"`}},
		{base + "&pgstagger_fleet_size=10&pgstagger_fleet_budget=NaN", nil, []string{"pgstagger_fleet_budget", `"NaN"`}},
		{base + "&pgstagger_fleet_size=10&pgstagger_fleet_budget=5&pgstagger_fleet_member=x", nil, []string{"pgstagger_fleet_member", `"x"`}},
		{base + "&pgstagger_fleet_size=10&pgstagger_fleet_budget=5&pgstagger_fleet_member=10", nil, []string{"pgstagger_fleet_member=10", "10"}},
		{base + "&pgstagger_fleet_size=10", nil, []string{"pgstagger_fleet_size=10", "pgstagger_fleet_budget"}},
		{base + "&pgstagger_fleet_budget=10", nil, []string{"pgstagger_fleet_budget=10", "pgstagger_fleet_size"}},
		{base + "&pgstagger_fleet_member=2", nil, []string{"pgstagger_fleet_member=2", "needs a fleet"}},
		{base, []Option{WithFleetMember(2)}, []string{"WithFleetMember(2)", "needs a fleet"}},
		{base + "&pgstagger_fleet_size=2", []Option{WithFleet(10, 5), WithFleetMember(2)}, []string{"WithFleetMember(2)", "fleet size (2"}},
	} {
		_, _, err := install(c.connString, c.opts...)
		if !errors.Is(err, ErrInvalidOption) {
			t.Errorf("%s: err = %v, want ErrInvalidOption", c.connString, err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not contain %q", c.connString, err, w)
			}
		}
	}

	// One Dialer plans one fleet: a later configuration may repeat its
	// parameters or carry none, not others.
	d, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for i, c := range []struct {
		connString string
		ok         bool
	}{
		{base + "&pgstagger_fleet_size=10&pgstagger_fleet_budget=5", true},
		{base + "&pgstagger_fleet_size=10&pgstagger_fleet_budget=5", true},
		{base, true},
		{base + "&pgstagger_fleet_size=11&pgstagger_fleet_budget=5", false},
	} {
		cfg, err := ParseConfig(c.connString)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Install(cfg); (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrInvalidOption)) {
			t.Errorf("Install #%d (%s): err = %v", i+1, c.connString, err)
		}
	}
}
