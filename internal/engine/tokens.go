package engine

import (
	"context"
	"time"

	"golang.org/x/time/rate"
)

// Every TCP connection the server may fork a backend for takes one token
// from the bucket: an establishment's first dial in admit, its further
// dials (sslmode=prefer's plain-text redial, multi-host fallbacks) in
// dialFunc, a CancelRequest in cancelConn. A token comes back when the
// server forked nothing for it: the dial was refused, or the connection was
// reset or closed before the server sent a byte (a postmaster exiting drops
// the connections it had not accepted yet).

// takeToken takes one token from the bucket for e, waiting for it unless
// the wait cannot end in time for the caller (see shedIfTooLate). refund
// gives the token back.
func (g *Gate) takeToken(e *establishment) (refund func(), err error) {
	return g.token(e.wait, e.ctx, g.tokenGrid(),
		func(need time.Duration, at time.Time) error { return g.shedIfTooLate(e, WaitRate, need, at) },
		func(need time.Duration, _ error) error { return g.waitError(e, WaitRate, need) })
}

// tokenGrid is the period of the grid a fleet member's waits for a token
// end on, at its phase (0: no grid). A fleet's buckets all refill at
// budget ÷ size; waits that end on each member's place in a cycle of one
// refill keep the fleet's dials spread at its budget whenever its members
// wait for tokens together: buckets emptied at the fleet's start would
// otherwise refill on the start's schedule, on top of the reconnect cycle,
// and a fleet that lost its connections to a restart would dial at twice
// its budget.
func (g *Gate) tokenGrid() time.Duration {
	if g.plan.FleetSize == 0 || g.cfg.Limiter != nil || g.plan.Rate == rate.Inf || g.plan.Rate <= 0 {
		return 0
	}
	return time.Duration(float64(time.Second) / float64(g.plan.Rate))
}

// cancelToken takes a token for a CancelRequest, waiting for it until ctx
// ends (see [cancelConn]); a wait that cannot end before ctx's deadline is
// not begun. A fleet member neither waits nor takes the tokens its next
// connect needs: its bucket refills one connect a window, and a
// CancelRequest that took them would put that connect a refill, and so a
// reconnect cycle, later. pgx sends one whenever it closes a busy
// connection, after a query's context ended say, and the connect that
// replaces the connection comes right after it. refund gives the token
// back.
func (g *Gate) cancelToken(ctx context.Context) (refund func(), err error) {
	if g.tokenGrid() > 0 && g.limiter.Tokens() < float64(g.plan.Dials+1) {
		g.stats.CancelsShed.Add(1)
		return nil, &shedError{why: "CancelRequest not sent: this fleet member's bucket holds only what its next connect needs"}
	}
	return g.token(ctx, ctx, 0,
		func(need time.Duration, at time.Time) error {
			dl, ok := ctx.Deadline()
			if (ok && dl.Before(at)) || g.tokenGrid() > 0 {
				g.stats.CancelsShed.Add(1)
				var left time.Duration // unknown without a deadline
				if ok {
					left = time.Until(dl)
				}
				return &shedError{wait: waitNames[WaitRate], need: need, left: left}
			}
			return nil
		},
		func(_ time.Duration, err error) error {
			g.stats.CancelsShed.Add(1)
			return err
		})
}

// token takes one token from the bucket, waiting for it until ctx ends
// (the wait's span and metric go under spanCtx) unless tooLate refuses a
// wait of need ending at at; ended turns the error of a wait that ended
// early into the one returned. With grid not 0, a wait ends at the
// process's place in a cycle of grid (see placeAfter), which may come up to
// a fiftieth of grid before the token: the bucket has counted the token as
// taken when it comes, so the rate holds. refund gives the token back.
func (g *Gate) token(ctx, spanCtx context.Context, grid time.Duration, tooLate func(need time.Duration, at time.Time) error,
	ended func(need time.Duration, err error) error) (refund func(), err error) {
	now := time.Now()
	r := g.limiter.ReserveN(now, 1)
	if !r.OK() {
		return nil, ErrInvalidOption // burst 0: validated away by the options
	}
	wait := r.DelayFrom(now)
	// Cancelling as of the moment the token was used restores it exactly,
	// less whatever other reservations took since.
	act := now.Add(wait)
	refund = func() { r.CancelAt(act) }
	if wait == 0 {
		return refund, nil
	}
	if grid > 0 {
		wait = max(g.placeAfter(now, act, grid).Sub(now), 0)
		if wait == 0 {
			return refund, nil
		}
	}
	if err := tooLate(wait, now.Add(wait)); err != nil {
		r.CancelAt(now)
		return nil, err
	}
	start := g.startWait(WaitRate)
	err = g.sleep(ctx, wait)
	g.endWait(spanCtx, WaitRate, start, time.Now())
	if err != nil {
		r.Cancel()
		return nil, ended(wait, err)
	}
	return refund, nil
}

// refund gives back a token the server forked nothing for.
func (g *Gate) refund(giveBack func()) {
	giveBack()
	g.stats.Refunds.Add(1)
}

// giveBack returns r's token to the bucket, once; r's establishment's mu is
// held, or r is not yet recorded.
func (r *dialRecord) giveBack(g *Gate) {
	if r.refunded {
		return
	}
	r.refunded = true
	g.refund(r.refund)
}

// dropped reports whether the server reset or closed the connection without
// sending a byte: nothing was forked for it.
func (c *tracedConn) dropped() bool {
	return c.unanswered.Load() && c.firstRead.Load() == 0
}

// nextToken is when the bucket will next have a whole token.
func (g *Gate) nextToken(now time.Time) time.Time {
	lim := g.limiter.Limit()
	tokens := g.limiter.TokensAt(now)
	if lim == rate.Inf || tokens >= 1 || lim <= 0 {
		return now
	}
	return now.Add(time.Duration((1 - tokens) / float64(lim) * float64(time.Second)))
}
