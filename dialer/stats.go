package dialer

import (
	"time"

	"github.com/pgstagger/pgstagger/internal/engine"
)

// Stats is a snapshot of what a Dialer has done since it was created.
type Stats struct {
	Establishments int64 // connection establishments begun
	OK             int64 // ... that succeeded
	Transient      int64 // ... that failed transiently (retryable)
	Permanent      int64 // ... that failed permanently
	Closed         int64 // ... ended by Close
	Shed           int64 // waits refused because the caller's deadline came first
	Retries        int64 // retry-loop attempts after the first
	Dials          int64 // TCP connections attempted for establishments
	Refunds        int64 // ... and CancelRequests the server forked nothing for (refused, or dropped unanswered), and establishments that dialed nothing (a failed lookup): their tokens were given back
	CancelDials    int64 // TCP connections opened for CancelRequests
	CancelsSkipped int64 // plain-text CancelRequests for process ID 0 (pgx sends one when a connect fails), answered without a connection
	CancelsShed    int64 // CancelRequests not sent: no token before their deadline (a fleet member's: none at hand beyond its next connect's), or their wait ended (Close)
	HostsSkipped   int64 // dials not made to a backed-off host of a multi-host connection string while another host was up
	Lost           int64 // sessions the server ended as it shut down or crashed (57P01, 57P02): the first of an outage sets the recovery state

	// PlainAfterTLSRefused counts establishments whose server refused TLS
	// and that pgx dialed again in plain text: sslmode=prefer, pgx's
	// default, against a server without TLS. Each cost the postmaster two
	// forks; the first is logged as a warning. Set sslmode explicitly.
	PlainAfterTLSRefused int64

	// What the pool last read of the server (zero before the first
	// read, and for a pool that reads nothing, as a configured fleet's
	// pool of one by default; see pool.WithServerFacts), and the
	// reconnect window it calls for.
	ServerConns    int           // connections to a database the server held
	ServerPeakRate float64       // the fastest growth of ServerConns between two reads, per second
	ServerFactsAt  time.Time     // when ServerConns was read
	RecoveryWindow time.Duration // see [Dialer.RecoveryWindow]

	ConnectLimit float64       // connects the pacer lets be under way at once now, first dial to ready; below 1, the share of the time one is, spaced (0: pacer off)
	Baseline     time.Duration // the pacer's baseline: the quickest establishment seen, first lookup or dial to ready (0: none yet)
	Decreases    int64         // times the pacer's limit fell

	JitterWait  WaitStats // startup jitter
	RateWait    WaitStats // token bucket
	SlotWait    WaitStats // MaxConnecting slots
	PacerWait   WaitStats // the pacer's slots (see WithResponseTarget)
	BackoffWait WaitStats // backoff between attempts and after failures
}

// WaitStats counts one kind of wait the gate imposed.
type WaitStats struct {
	Count   int64         // waits that ended
	Total   time.Duration // ... and their summed length
	Waiting int64         // waits under way now
}

// Stats returns a snapshot of the Dialer's counters.
func (d *Dialer) Stats() Stats {
	c := d.g.Counters()
	limit, baseline, decreases := d.g.PacerState()
	f := d.g.Facts()
	wait := func(k engine.WaitKind) WaitStats {
		w := &c.Waits[k]
		return WaitStats{Count: w.Count.Load(), Total: time.Duration(w.Total.Load()), Waiting: w.Waiting.Load()}
	}
	return Stats{
		Establishments:       c.Establishments.Load(),
		OK:                   c.OK.Load(),
		Transient:            c.Transient.Load(),
		Permanent:            c.Permanent.Load(),
		Closed:               c.Closed.Load(),
		Shed:                 c.Shed.Load(),
		Retries:              c.Retries.Load(),
		Dials:                c.Dials.Load(),
		Refunds:              c.Refunds.Load(),
		CancelDials:          c.CancelDials.Load(),
		CancelsSkipped:       c.CancelsSkipped.Load(),
		CancelsShed:          c.CancelsShed.Load(),
		HostsSkipped:         c.HostsSkipped.Load(),
		Lost:                 c.Lost.Load(),
		PlainAfterTLSRefused: c.PlainAfterTLSRefused.Load(),
		ServerConns:          f.Held,
		ServerPeakRate:       f.PeakRate,
		ServerFactsAt:        f.At,
		RecoveryWindow:       d.g.RecoveryWindow(),
		ConnectLimit:         limit,
		Baseline:             baseline,
		Decreases:            decreases,
		JitterWait:           wait(engine.WaitJitter),
		RateWait:             wait(engine.WaitRate),
		SlotWait:             wait(engine.WaitSlot),
		PacerWait:            wait(engine.WaitPacer),
		BackoffWait:          wait(engine.WaitBackoff),
	}
}
