package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/pgstagger/pgstagger/jitter"
)

// Retry runs op until it succeeds or fails other than by a transient
// connection-establishment failure; see dialer.Dialer.Retry for the
// contract.
func (g *Gate) Retry(ctx context.Context, op func(ctx context.Context) error) error {
	return g.retry(ctx, 1, op(withCaller(ctx, 1)), op)
}

// RetryAfter continues a retry loop whose first attempt, made without
// Retry, failed with err: it returns err at once unless err is a transient
// establishment failure, and otherwise waits and calls op as Retry does. It
// lets a pool keep its first attempt free of any set-up.
func (g *Gate) RetryAfter(ctx context.Context, err error, op func(ctx context.Context) error) error {
	return g.retry(ctx, 1, err, op)
}

func (g *Gate) retry(ctx context.Context, attempt int, err error, op func(ctx context.Context) error) error {
	var policy backoff.BackOff
	for ; err != nil; attempt++ {
		if g.closeCtx.Err() != nil && !errors.Is(err, ErrClosed) {
			return fmt.Errorf("%w: %w", ErrClosed, err)
		}
		if !isEstablishment(err) || Classify(err) != Transient {
			return err
		}
		if ctx.Err() != nil {
			return &GaveUpError{Attempts: attempt, Err: err, ctxErr: ctx.Err()}
		}
		if policy == nil {
			policy = g.cfg.NewBackOff()
		}
		wait := policy.NextBackOff()
		if wait == backoff.Stop {
			return &GaveUpError{Attempts: attempt, Err: err}
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
			return &GaveUpError{Attempts: attempt, Err: err, ctxErr: context.DeadlineExceeded}
		}
		g.stats.Retries.Add(1)
		if g.tel.log != nil {
			g.tel.log.LogAttrs(ctx, slog.LevelInfo, "pgstagger: retrying connect",
				slog.String(string(g.tel.poolAttr.Key), g.tel.poolName),
				slog.Int(string(AttrAttempt), attempt+1),
				slog.Duration("wait", wait),
				slog.Any("error", err))
		}
		start := g.startWait(WaitBackoff)
		werr := g.sleep(ctx, wait)
		g.endWait(ctx, WaitBackoff, start, time.Now())
		if werr != nil {
			if errors.Is(werr, ErrClosed) {
				return fmt.Errorf("%w (last attempt: %w)", werr, err)
			}
			return &GaveUpError{Attempts: attempt, Err: err, ctxErr: ctx.Err()}
		}
		last := err
		err = op(withCaller(ctx, attempt+1))
		if Classify(err) == Shed {
			// The gate could not fit the next attempt before the
			// deadline: what the caller needs is the last real failure.
			return &GaveUpError{Attempts: attempt, Err: last, ctxErr: context.DeadlineExceeded}
		}
	}
	return nil
}

// sleep waits for wait, until ctx ends or until g is closed.
func (g *Gate) sleep(ctx context.Context, wait time.Duration) error {
	if wait <= 0 {
		return nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer context.AfterFunc(g.closeCtx, func() { cancel(ErrClosed) })()
	return jitter.Sleep(ctx, wait)
}
