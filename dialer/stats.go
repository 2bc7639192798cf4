package dialer

import (
	"sync/atomic"
	"time"
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
	Refunds        int64 // ... and CancelRequests the server forked nothing for (refused, or dropped unanswered): their tokens were given back
	CancelDials    int64 // TCP connections opened for CancelRequests
	CancelsSkipped int64 // plain-text CancelRequests for process ID 0 (pgx sends one when a connect fails), answered without a connection
	CancelsShed    int64 // CancelRequests not sent: no token before their deadline, or their wait ended (Close)
	HostsSkipped   int64 // dials not made to a backed-off host of a multi-host connection string while another host was up

	JitterWait  WaitStats // startup jitter
	RateWait    WaitStats // token bucket
	SlotWait    WaitStats // MaxConnecting slots
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
	s := &d.stats
	return Stats{
		Establishments: s.establishments.Load(),
		OK:             s.ok.Load(),
		Transient:      s.transient.Load(),
		Permanent:      s.permanent.Load(),
		Closed:         s.closedCount.Load(),
		Shed:           s.shed.Load(),
		Retries:        s.retries.Load(),
		Dials:          s.dials.Load(),
		Refunds:        s.refunds.Load(),
		CancelDials:    s.cancelDials.Load(),
		CancelsSkipped: s.cancelsSkipped.Load(),
		HostsSkipped:   s.hostsSkipped.Load(),
		CancelsShed:    s.cancelsShed.Load(),
		JitterWait:     s.waits[waitJitter].load(),
		RateWait:       s.waits[waitRate].load(),
		SlotWait:       s.waits[waitSlot].load(),
		BackoffWait:    s.waits[waitBackoff].load(),
	}
}

type counters struct {
	establishments, ok, transient, permanent, closedCount atomic.Int64
	shed, retries, dials, refunds, cancelDials            atomic.Int64
	cancelsSkipped, hostsSkipped, cancelsShed             atomic.Int64

	waits [numWaitKinds]waitCounter
}

type waitCounter struct{ count, total, waiting atomic.Int64 }

// add records a wait of d that ended; each follows a startWait.
func (w *waitCounter) add(d time.Duration) {
	w.waiting.Add(-1)
	w.count.Add(1)
	w.total.Add(int64(d))
}

func (w *waitCounter) load() WaitStats {
	return WaitStats{Count: w.count.Load(), Total: time.Duration(w.total.Load()), Waiting: w.waiting.Load()}
}

// startWait records that a wait of kind began; [Dialer.emitWait] ends it.
func (d *Dialer) startWait(kind waitKind) time.Time {
	d.stats.waits[kind].waiting.Add(1)
	return time.Now()
}
