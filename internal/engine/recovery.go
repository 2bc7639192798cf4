package engine

import (
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/pgstagger/pgstagger/jitter"
)

// The recovery state, [Gate.recovery], is set by a transient failure and
// cleared by the next success. While it is set, every new establishment of
// the process waits for its recoverUntil: the longer of the shared backoff
// and a fresh draw over the startup window, counted from when the bucket
// next holds a token. A failing server is often failing for the whole fleet
// (a restart): the draw spreads the fleet's reconnects as at a fresh start,
// and counting it from the refill keeps buckets emptied together from
// releasing the fleet together.

// waitRecovery waits out the recovery state, if any.
func (g *Gate) waitRecovery(e *establishment) error {
	o := g.recovery.Load()
	if o == nil {
		return nil
	}
	if err := g.waitUntil(e, o.recoverUntil, WaitBackoff); err != nil {
		return err
	}
	if g.recovery.Load() == nil {
		return nil // a success ended the outage meanwhile
	}
	// The bucket may still be empty after the recovery delay (the dials
	// and CancelRequests of the failure took its tokens). A fleet that
	// failed together spent together, and its buckets refill together:
	// spread from the refill, as from the failure.
	now := time.Now()
	if g.nextToken(now).After(now) {
		return g.waitUntil(e, g.spreadFrom(now), WaitBackoff)
	}
	return nil
}

// recovered clears the recovery state after a success.
func (g *Gate) recovered() {
	if g.recovery.Load() == nil {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.recovery.Load() != nil {
		g.policy.Reset()
		g.recovery.Store(nil)
	}
}

// failed sets the recovery state after a transient failure, at now, of an
// establishment admitted at admitted. Failures of establishments that
// touched the server before the last failure was recorded belong to the
// same outage: they do not lengthen the backoff.
func (g *Gate) failed(admitted, now time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if o := g.recovery.Load(); o != nil && !admitted.After(o.failedAt) {
		return
	}
	wait := g.policy.NextBackOff()
	if wait == backoff.Stop {
		g.policy.Reset()
		wait = max(g.policy.NextBackOff(), 0)
	}
	g.recovery.Store(&outage{recoverUntil: maxTime(now.Add(wait), g.spreadFrom(now)), failedAt: now})
}

// spreadFrom is a fresh draw over the startup window, counted from when the
// bucket next has a whole token after now.
func (g *Gate) spreadFrom(now time.Time) time.Time {
	return g.nextToken(now).Add(jitter.Uniform(g.plan.StartupWindow, g.cfg.Rand()))
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
