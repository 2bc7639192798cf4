package engine

import (
	"container/list"
	"context"
	"math"
	"sync"
	"time"
)

// pacer decides how many establishments may be in flight at once, from the
// server's response time: how long an establishment takes from pgconn's
// first lookup or dial until the connection is ready, which is the
// postmaster's queue, the fork, and the backend's start-up (authentication
// and InitPostgres), seen alike by every client of the server. The
// start-up counts: it comes after the backend's first byte, and it runs on
// the server's cores beside every other backend starting at once, so a
// pacer that stopped at the first byte saw part of the load it caused
// (measured: a fleet of 60 pools × 25 paced on the first byte left an
// unrelated client's connect p99 at 35-73× idle, on the whole
// establishment 12-22×; BENCHMARKS.md). For a single-server queue
// R ≈ S/(1−ρ), so the ratio of R to its idle value, the baseline, measures
// the load whoever causes it: a ratio target bounds every client's connect
// latency however many processes run a pacer, where a fixed number of
// extra connects per process would leave a queue that grows with the
// fleet.
//
// The law, per finished establishment:
//
//   - baseline is the smallest response time seen. It is kept across
//     failures and restarts, and only falls: a baseline that followed a
//     moving average would drift up under lasting load. The server's facts
//     bound it (capBaseline): a pacer whose first answers came from inside
//     a storm measured the storm's queue, and would keep it.
//   - smoothed is a moving average of recent response times (weight 1/4),
//     so that one slow fork on a busy machine is not taken for a queue. A
//     new baseline resets it: the queue was empty then. So does, below a
//     limit of 1, an answer within allowed: such answers come one at a
//     time, many baselines apart.
//   - allowed is target × baseline, or baseline + pacerSlack if more.
//   - smoothed ≤ allowed: the limit grows, by one per success below the
//     slow-start threshold (doubling per round of connects) and by one per
//     round above it, and below a limit of 1 by subOneStep per answer; not
//     while fewer than half of the slots were in use (a limit that was not
//     the constraint says nothing), nor while a pool waits for the
//     server's facts (holdForFacts). A pool's establishments after its
//     first wait until it has read the facts on that first connection
//     (factsWait).
//   - smoothed > allowed: the limit is multiplied by allowed ÷ smoothed,
//     kept within [1/2, 9/10] (a cut too small to matter would leave
//     pacers sharing a server in a stalemate just above the target), at
//     most once per round: an establishment admitted before the last
//     decrease does not decrease it again, unless smoothed is more than
//     twice allowed (a deep queue's rounds are as long as the queue); a
//     queue that deep is cut by as much as 1/8 (see cut). The slow-start
//     threshold becomes the new limit. A cap from the server's facts that
//     shows the answers so far were a queue cuts at once.
//   - a transient failure (refused, 53300, 57P03, a timeout): the limit
//     falls to one, a prober, and slow start doubles it from there.
//   - a limit below 1 that has admitted nothing for staleAfter past its
//     own pause comes back to one, a prober, with no pause, and the next
//     answer starts the moving average afresh (wake): what it says is
//     the queue of a storm long gone.
//   - every 10s or so (±15%, so that processes do not probe together), a
//     pacer that is using its limit lets one establishment in flight until
//     one admitted alone is answered, then returns to its limit: a pacer
//     that started while others held the server's queue learned a baseline
//     that includes their queue, and alone it can see a shorter one. This
//     is BBR's and Envoy's minimum-RTT probe; without it the late pacer
//     would hold its share at the first ones' expense (up to the target
//     squared times the idle response time).
//
// The limit stays in [minLimit, max]. Below 1 one establishment is in
// flight at a time, the share limit of the time: the next is admitted
// (1/limit − 1) times the last response time after an answer, that time
// taken as allowed at most (space). A fleet of n processes each holding
// one connect at the postmaster would keep a queue of n, which every other
// client waits behind (Swift's congestion window below one packet, for the
// same reason). With the pacer off (target 0) the limit is max, fixed, and
// nothing is learned.
//
// pacer's methods take the time as a parameter, so that the law can be
// tested, and simulated, on a clock of the caller's.
type pacer struct {
	target float64 // ratio; 0: off
	max    float64 // ceiling of limit
	rand   func() float64

	mu         sync.Mutex
	limit      float64       // guarded by mu: establishments allowed in flight
	ssthresh   float64       // guarded by mu: slow start below it
	held       int           // guarded by mu: slots held
	waiters    list.List     // guarded by mu: of chan int (the slots held once granted), first come first served
	baseline   time.Duration // guarded by mu: smallest response time seen; 0 until the first
	smoothed   time.Duration // guarded by mu: moving average of response times
	lastShrink time.Time     // guarded by mu: when the limit last fell
	decreases  int64         // guarded by mu: how often it fell
	nextProbe  time.Time     // guarded by mu: when to probe the baseline next; zero before the first answer
	probeFrom  time.Time     // guarded by mu: when the probe under way began; zero when none is
	probeLimit float64       // guarded by mu: the limit to return to after the probe
	ceiling    time.Duration // guarded by mu: what the server's facts say an idle answer's first byte takes, at most (0: unknown)
	startup    time.Duration // guarded by mu: the quickest time from the server's first byte to a ready connection seen (0: none yet)
	notBefore  time.Time     // guarded by mu: below a limit of 1, when the next establishment may be admitted
	lastAnswer time.Time     // guarded by mu: when the last establishment was answered, or failed
	awaitFacts bool          // guarded by mu: the limit does not grow until the server's facts come (see holdForFacts)
	firstFacts chan struct{} // guarded by mu: closed when the first facts come; nil unless awaited (see factsWait)
}

// pacerSlack is how far above the baseline the response time may always
// rise before the pacer calls it a queue: on a loopback server answering in
// a fraction of a millisecond, twice the baseline is a scheduler's hiccup on
// a busy machine, not a postmaster's queue. It changes nothing for a
// baseline of pacerSlack/(ratio − 1) or more (4ms at the default ratio,
// 1.5), where the target ratio allows more.
const pacerSlack = 2 * time.Millisecond

// subOneStep is how much an answer within allowed adds to a limit below 1:
// additive, as Swift's window below one packet grows, where doubling per
// answer had the pools of a fleet, all below 1 in a storm, climb and cut
// together. Measured in the demo's pools scenario (60 × 25) on simulated
// time, 16 runs each, with space's response-time pause: the bystander's
// connect p99 12.5× idle (median; 10-16×) and all ready at 1.65× the
// physical limit, where doubling and pauses of baselines gave 16× (13-18×)
// at 1.69× (BENCHMARKS.md).
const subOneStep = 1.0 / 8

// minLimit is the smallest limit: one establishment in flight a sixty-fourth
// of the time. Below one, a pacer spaces its connects (see notBefore): a
// fleet of n pacers each holding one connect at the postmaster would keep a
// queue of n, which is what the bystander waits behind.
const minLimit = 1.0 / 64

// probeEvery is how often a pacer probes its baseline, give or take 15%.
const probeEvery = 10 * time.Second

// newPacer returns a pacer with the given target ratio (0: off) that starts
// at initial establishments in flight and never allows more than max.
func newPacer(target float64, initial, max int, rand func() float64) *pacer {
	p := &pacer{target: target, max: float64(max), rand: rand, limit: float64(max), ssthresh: math.Inf(1)}
	if target > 0 {
		p.limit = math.Min(float64(initial), p.max)
	}
	return p
}

// slots is how many establishments the limit admits at once; p.mu is held.
func (p *pacer) slots() int { return max(1, int(p.limit)) }

// tryTake takes a slot if one is free and nobody waits for one, reporting
// how many slots are then held.
func (p *pacer) tryTake() (ok bool, inUse int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held < p.slots() && p.waiters.Len() == 0 {
		p.held++
		return true, p.held
	}
	return false, 0
}

// take waits for a slot, first come first served, until ctx ends,
// reporting how many slots were held once it had one.
func (p *pacer) take(ctx context.Context) (inUse int, err error) {
	p.mu.Lock()
	if p.held < p.slots() && p.waiters.Len() == 0 {
		p.held++
		defer p.mu.Unlock()
		return p.held, nil
	}
	ready := make(chan int, 1)
	elem := p.waiters.PushBack(ready)
	p.mu.Unlock()
	select {
	case inUse := <-ready:
		return inUse, nil
	case <-ctx.Done():
		p.mu.Lock()
		defer p.mu.Unlock()
		select {
		case <-ready: // granted meanwhile: pass it on
			p.held--
			p.grant()
		default:
			p.waiters.Remove(elem)
		}
		return 0, ctx.Err()
	}
}

// give returns a slot.
func (p *pacer) give() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.held--
	p.grant()
}

// grant hands free slots to waiters in order; p.mu is held.
func (p *pacer) grant() {
	for p.held < p.slots() && p.waiters.Len() > 0 {
		ready := p.waiters.Remove(p.waiters.Front()).(chan int)
		p.held++
		ready <- p.held
	}
}

// succeeded feeds a successful establishment admitted at admitted, whose
// connection's response time was rt (0 if unknown), startup of it after
// the server's first byte (0 if unknown), with inUse slots held when it was
// admitted. It reports whether the limit fell.
func (p *pacer) succeeded(now, admitted time.Time, rt, startup time.Duration, inUse int) bool {
	if p.target == 0 || rt <= 0 {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if startup > 0 && (p.startup == 0 || startup < p.startup) {
		p.startup = startup
	}
	p.lastAnswer = now
	switch {
	case p.baseline == 0 || rt < p.baseline:
		// A new smallest answer: the queue was empty, whatever slower
		// answers (a process's first connect, a cold server) came before.
		p.baseline, p.smoothed = rt, rt
	case p.smoothed == 0: // the first answer after wake
		p.smoothed = rt
	default:
		p.smoothed += (rt - p.smoothed) / 4
	}
	if c := p.bound(); c > 0 && p.baseline > c {
		p.baseline = c
	}
	allowed := p.allowed()
	if p.limit < 1 && float64(rt) <= allowed {
		// Below 1 answers come one at a time, baselines apart: an answer
		// without a queue is the news, and an average over the queue
		// that was would keep the pacer silent for as long again.
		p.smoothed = rt
	}
	defer p.space(now, rt)
	if p.probe(now, admitted, inUse) {
		return false
	}
	if float64(p.smoothed) <= allowed {
		if 2*inUse >= p.slots() && !p.awaitFacts {
			switch {
			case p.limit < 1:
				p.limit += subOneStep
			case p.limit < p.ssthresh:
				p.limit++
			default:
				p.limit += 1 / p.limit
			}
			p.limit = math.Min(p.limit, p.max)
			p.grant()
		}
		return false
	}
	// A round is answered once; but a queue of more than twice the target
	// is cut at every answer: its rounds are as long as the queue, and a
	// halving per round would leave it for many.
	if !admitted.After(p.lastShrink) && float64(p.smoothed) <= 2*allowed {
		return false
	}
	p.shrink(now, p.cut(allowed))
	return true
}

// cut is the factor by which a response time above allowed multiplies the
// limit: allowed ÷ smoothed, at most 9/10 (a smaller cut would leave pacers
// sharing a server in a stalemate just above the target) and at least 1/2,
// or 1/8 for a queue deeper than twice the target: a pacer that finds
// itself in a storm's queue has many answers' worth of limit to shed, and
// its answers are as far apart as the queue is deep; p.mu is held.
func (p *pacer) cut(allowed float64) float64 {
	floor := 0.5
	if float64(p.smoothed) > 2*allowed {
		floor = 1.0 / 8
	}
	return min(math.Max(floor, allowed/float64(p.smoothed)), 0.9)
}

// allowed is the response time above which the pacer sees a queue; p.mu
// is held.
func (p *pacer) allowed() float64 {
	return math.Max(p.target*float64(p.baseline), float64(p.baseline+pacerSlack))
}

// probe starts, ends or continues a probe of the baseline, reporting
// whether one is under way; p.mu is held.
func (p *pacer) probe(now, admitted time.Time, inUse int) bool {
	switch {
	case p.nextProbe.IsZero():
		p.scheduleProbe(now)
	case !p.probeFrom.IsZero():
		if inUse == 1 && admitted.After(p.probeFrom) {
			// Answered alone: the baseline has seen what it can.
			p.limit, p.probeFrom = p.probeLimit, time.Time{}
			p.scheduleProbe(now)
			p.grant()
			return false
		}
		return true
	case now.After(p.nextProbe) && 2*inUse >= p.slots() && p.limit >= 2:
		p.probeFrom, p.probeLimit, p.limit = now, p.limit, 1
		return true
	}
	return false
}

func (p *pacer) scheduleProbe(now time.Time) {
	p.nextProbe = now.Add(time.Duration(float64(probeEvery) * (0.85 + 0.3*p.rand())))
}

// failed feeds a transient failure: one prober, then slow start.
func (p *pacer) failed(now time.Time) bool {
	if p.target == 0 {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lastAnswer = now
	p.probeFrom = time.Time{} // a failure ends a probe: the limit starts over
	if p.limit <= 1 {
		return false
	}
	p.ssthresh = math.Max(p.limit/2, 2)
	p.limit = 1
	p.lastShrink = now
	p.decreases++
	return true
}

// shrink multiplies the limit by factor; p.mu is held.
func (p *pacer) shrink(now time.Time, factor float64) {
	p.limit = math.Max(minLimit, p.limit*factor)
	p.ssthresh = math.Max(p.limit, 2)
	p.lastShrink = now
	p.decreases++
}

// space sets when the next establishment may be admitted after an answer
// at now that took rt: below a limit of 1 one establishment is in flight
// the share limit of the time, so the next waits (1/limit − 1) times rt,
// or allowed if that is less (rt is never below the baseline, which
// succeeded lowers to it first): a pacer that cut its limit inside a deep
// queue would otherwise fall silent for as long as the queue was deep,
// times 1/limit, and come back long after the queue drained. A pause of
// baselines alone, whatever the answers took, let a fleet's pools below 1
// each keep an establishment at a queued postmaster most of the time
// (measured: 60 pools × 25, bystander p99 16× idle, against 12.5× with
// both this and subOneStep; see subOneStep); p.mu is held.
func (p *pacer) space(now time.Time, rt time.Duration) {
	if p.limit >= 1 {
		p.notBefore = time.Time{}
		return
	}
	unit := math.Min(float64(rt), p.allowed())
	p.notBefore = now.Add(time.Duration(unit * (1/p.limit - 1)))
}

// staleAfter is how long a pacer below a limit of 1 may admit nothing,
// past its own pause, before its limit is stale (see wake).
const staleAfter = probeEvery

// wake returns a pacer below a limit of 1 that has had nothing in flight
// and admitted nothing for staleAfter past its own pause to a limit of 1,
// a prober, before an establishment is admitted at now; the baseline is
// kept, and the prober's answer starts the moving average afresh. Below 1
// a pacer learns only from its own answers, one at a time: a
// single-connection process whose one connect was answered inside a
// fleet's start-up storm would otherwise keep that storm's 1/64 for good,
// and after a restart the connect that replaces a connection lost at once
// would wait 63 answers' time (measured: 14s, one of a fleet of 461
// workers recovered 30s after the restart where the rest took 22s).
func (p *pacer) wake(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.target == 0 || p.limit >= 1 || p.held > 0 || p.lastAnswer.IsZero() {
		return
	}
	if now.Sub(p.lastAnswer) < staleAfter || now.Sub(p.notBefore) < staleAfter {
		return
	}
	p.limit, p.smoothed, p.notBefore = 1, 0, time.Time{}
}

// admitAt is when an establishment that holds a slot may go to the server:
// at once (the zero time) unless the limit is below 1.
func (p *pacer) admitAt() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.notBefore
}

// holdForFacts keeps the limit from growing until factsRead: a pool's first
// answers may come from inside a storm, and a baseline learned there would
// let the limit grow into the storm's queue before the server's facts
// bound it (capBaseline). The pool reads them on its first connection.
func (p *pacer) holdForFacts() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.awaitFacts = p.target > 0
	if p.awaitFacts && p.firstFacts == nil {
		p.firstFacts = make(chan struct{})
	}
}

// factsWait returns a channel that is closed when the pool's first read of
// the server's facts is done, once a connection has been established and
// until then; otherwise nil. The establishments after a pool's first wait
// for it: the pool reads the facts on that connection, and until it has, a
// pacer inside a storm's queue cannot tell the queue from the baseline,
// and each of a fleet's pools would keep one establishment in it.
func (p *pacer) factsWait() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.baseline == 0 || p.firstFacts == nil { // no establishment yet
		return nil
	}
	select {
	case <-p.firstFacts:
		return nil
	default:
		return p.firstFacts
	}
}

// firstFactsCame ends factsWait; p.mu is held.
func (p *pacer) firstFactsCame() {
	if p.firstFacts != nil {
		select {
		case <-p.firstFacts:
		default:
			close(p.firstFacts)
		}
	}
}

// factsRead ends holdForFacts (and factsWait, if a read failed).
func (p *pacer) factsRead() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.awaitFacts = false
	p.firstFactsCame()
}

// capBaseline tells the pacer that an idle answer comes within ceiling
// (the round trip and the postmaster's forks), from what the server says
// of itself (see [Gate.LearnFacts]), and then within the start-up after it
// (see bound): a pacer that started inside a storm measured the storm's
// queue as its baseline, and would keep it.
func (p *pacer) capBaseline(now time.Time, ceiling time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.firstFactsCame()
	if p.target == 0 || ceiling <= 0 {
		return
	}
	p.ceiling = ceiling
	c := p.bound()
	if p.baseline <= c {
		return
	}
	p.baseline = c
	// The answers so far came from inside a queue the pacer could not see
	// without the cap: cut now rather than an answer later, which is as far
	// off as the queue is deep.
	if allowed := p.allowed(); float64(p.smoothed) > allowed {
		p.shrink(now, p.cut(allowed))
	}
}

// bound is the most an idle establishment takes, as far as the server's
// facts tell (0: unknown): the ceiling they put on the server's first byte
// (a round trip and the forks), and the start-up after that byte, the
// quickest seen (TLS, authentication, the backend's InitPostgres), which no
// queue at the postmaster lengthens. Without the start-up, a server forking
// 1,400 backends a second would bound a connect at about 1.5ms while its
// scram-sha-256 authentication alone takes longer, and every answer would
// look like a queue; p.mu is held.
func (p *pacer) bound() time.Duration {
	if p.ceiling <= 0 {
		return 0
	}
	return p.ceiling + p.startup
}

// pacerState is what the pacer reports.
type pacerState struct {
	limit     float64
	baseline  time.Duration
	decreases int64
}

func (p *pacer) state() pacerState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return pacerState{limit: p.limit, baseline: p.baseline, decreases: p.decreases}
}
