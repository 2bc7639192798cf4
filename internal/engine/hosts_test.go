package engine

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
)

func TestHostHealth(t *testing.T) {
	const group, a, b = "a:1,b:2", "10.0.0.1:1", "10.0.0.2:2"
	h := newHostHealth(func() backoff.BackOff {
		return backoff.NewExponentialBackOff(backoff.WithInitialInterval(time.Second),
			backoff.WithMultiplier(2), backoff.WithRandomizationFactor(0), backoff.WithMaxElapsedTime(0))
	})
	t0 := time.Unix(1000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	var refused error = syscall.ECONNREFUSED

	mustDial := func(addr string, now time.Time) {
		t.Helper()
		if err := h.skip(group, "tcp", addr, now); err != nil {
			t.Fatalf("%s at %v: skipped (%v), want dialed", addr, now.Sub(t0), err)
		}
	}
	mustSkip := func(addr string, now time.Time) {
		t.Helper()
		err := h.skip(group, "tcp", addr, now)
		if err == nil {
			t.Fatalf("%s at %v: dialed, want skipped", addr, now.Sub(t0))
		}
		if Classify(err) != Transient || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("skip error %v classifies %v, want transient, like a refused dial", err, Classify(err))
		}
	}

	// Both seen; a fails, b works.
	mustDial(a, t0)
	h.record(group, "tcp", a, refused, t0)
	mustDial(b, t0)
	h.record(group, "tcp", b, nil, t0)
	mustSkip(a, at(999*time.Millisecond)) // backed off for the first interval, 1s
	mustDial(a, at(time.Second))          // probed again when it ends
	h.record(group, "tcp", a, refused, at(time.Second))
	mustSkip(a, at(2999*time.Millisecond)) // the interval doubled
	mustDial(a, at(3*time.Second))

	// Another group's hosts are not this group's alternatives.
	if err := h.skip("c:3", "tcp", a, at(time.Second+time.Millisecond)); err != nil {
		t.Errorf("a in another group was skipped: %v", err)
	}

	// When b fails too, nothing is skipped: no live host to fall through to.
	h.record(group, "tcp", a, refused, at(3*time.Second))
	h.record(group, "tcp", b, refused, at(3*time.Second))
	mustDial(a, at(3*time.Second+time.Millisecond))
	mustDial(b, at(3*time.Second+time.Millisecond))

	// A successful dial makes a host healthy again, with a fresh policy.
	h.record(group, "tcp", b, nil, at(4*time.Second))
	mustSkip(a, at(4*time.Second))
	h.record(group, "tcp", a, nil, at(5*time.Second))
	h.record(group, "tcp", a, refused, at(6*time.Second))
	mustSkip(a, at(6*time.Second+999*time.Millisecond))
	mustDial(a, at(7*time.Second))
}
