package engine

import (
	"sync/atomic"
	"time"
)

// Counters is what a Gate has done since it was created; package dialer
// reports a snapshot of it as dialer.Stats, whose fields document each.
type Counters struct {
	Establishments, OK, Transient, Permanent, Closed atomic.Int64
	Shed, Retries, Dials, Refunds, CancelDials       atomic.Int64
	CancelsSkipped, HostsSkipped, CancelsShed        atomic.Int64
	Lost, PlainAfterTLSRefused                       atomic.Int64

	Waits [NumWaitKinds]WaitCounter // by kind
}

// WaitCounter counts one kind of wait.
type WaitCounter struct{ Count, Total, Waiting atomic.Int64 }

// add records a wait of d that ended; each follows a startWait.
func (w *WaitCounter) add(d time.Duration) {
	w.Waiting.Add(-1)
	w.Count.Add(1)
	w.Total.Add(int64(d))
}

// Counters returns g's counters, for reading.
func (g *Gate) Counters() *Counters { return &g.stats }

// startWait records that a wait of kind began; [Gate.endWait] ends it.
func (g *Gate) startWait(kind WaitKind) time.Time {
	g.stats.Waits[kind].Waiting.Add(1)
	return time.Now()
}
