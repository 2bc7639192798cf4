package engine

import (
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/pgstagger/pgstagger/jitter"
)

// The recovery state, [Gate.recovery], is set by a transient failure and
// cleared by the next success. While it is set, every new establishment of
// the process waits for its recoverUntil: the process's next place in a
// wall-clock cycle as long as the recovery window (its phase,
// [Gate.recoveryPhase]) once the shared backoff has passed and the bucket
// holds a token. A failing server is often failing for the whole fleet (a
// restart): the phases spread the fleet's reconnects over one cycle, in
// the same order every cycle, so most of the fleet is back within a cycle
// of the server, with no process drawing again into a tail; and waiting
// for the token first keeps buckets emptied together from releasing the
// fleet together.

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
// establishment admitted at admitted, and reports whether it did.
// Failures of establishments that touched the server before the last
// failure was recorded belong to the same outage: they do not lengthen the
// backoff.
func (g *Gate) failed(admitted, now time.Time) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if o := g.recovery.Load(); o != nil && !admitted.After(o.failedAt) {
		return false
	}
	wait := g.policy.NextBackOff()
	if wait == backoff.Stop {
		g.policy.Reset()
		wait = max(g.policy.NextBackOff(), 0)
	}
	g.recovery.Store(&outage{recoverUntil: g.spreadFrom(now.Add(wait)), failedAt: now})
	g.lastFailure.Store(now.UnixNano())
	return true
}

// spreadFrom is the process's next place in the fleet's reconnect cycle
// once the bucket has a whole token at or after t: the first instant, at or
// after the token, whose offset into a wall-clock cycle as long as the
// recovery window ([Gate.RecoveryWindow]) is the process's phase.
func (g *Gate) spreadFrom(t time.Time) time.Time {
	return g.placeAfter(t, g.nextToken(t), g.RecoveryWindow())
}

// placeAfter is the process's place in a cycle of period: the first instant
// at or after token, when the bucket has a whole token, and not before t,
// whose offset into the cycle is the process's phase. For a fleet member an
// instant up to a fiftieth of the period before token counts: a token
// taken at the member's place comes back a period later plus the few
// milliseconds its establishment took to reach the bucket, and without the
// slack that refill would miss the next place and wait a whole cycle more.
func (g *Gate) placeAfter(t, token time.Time, period time.Duration) time.Time {
	from := token
	if g.tokenGrid() > 0 {
		from = token.Add(-period / 50)
	}
	if from.Before(t) {
		from = t
	}
	return jitter.Phase(from, period, g.recoveryPhase())
}

// recoveryPhase is the process's place in the reconnect cycle, in [0, 1):
// a fleet member's [Plan].Phase; otherwise, once the process has
// established a connection, [jitter.Weyl] of that connection's backend
// process ID, the newest; before that, its Plan.Phase, a draw.
//
// A fleet's processes hold backends the postmaster forked one after
// another, whose process IDs are close to consecutive integers, and
// Weyl's places for consecutive integers are spread evenly over the
// cycle, where independent draws clump: 400 processes in a cycle of 16s
// put 34 in their busiest second (median of 2,000 trials) where the mean
// is 25; 400 consecutive process IDs put 23-27 in every second.
func (g *Gate) recoveryPhase() float64 {
	if g.plan.FleetMember >= 0 {
		return g.plan.Phase
	}
	if pid := g.pid.Load(); pid != 0 {
		return jitter.Weyl(uint64(pid))
	}
	return g.plan.Phase
}
