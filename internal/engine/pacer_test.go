package engine

import (
	"context"
	"errors"
	"math"
	"sort"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

const ms = time.Millisecond

func half() float64 { return 0.5 }

// round feeds one round of successes: one per slot, each admitted at
// admitted and answered in rt, with every slot in use.
func round(p *pacer, now, admitted time.Time, rt time.Duration) {
	n := p.state().limit
	for range int(n) {
		p.succeeded(now, admitted, rt, 0, int(n))
	}
}

func TestPacerSlowStartDoublesPerRound(t *testing.T) {
	p := newPacer(2, 2, 64, half)
	now := t0
	var limits []float64
	for range 5 {
		now = now.Add(5 * ms)
		round(p, now, now.Add(-5*ms), 5*ms)
		limits = append(limits, p.state().limit)
	}
	want := []float64{4, 8, 16, 32, 64}
	for i := range want {
		if limits[i] != want[i] {
			t.Fatalf("limits after each round %v, want %v", limits, want)
		}
	}
}

func TestPacerDoesNotGrowWhenItIsNotTheConstraint(t *testing.T) {
	p := newPacer(2, 4, 64, half)
	for i := range 100 {
		p.succeeded(t0.Add(time.Duration(i)*ms), t0, 5*ms, 0, 1) // one connect at a time
	}
	if got := p.state().limit; got != 4 {
		t.Errorf("limit %v after 100 lone connects, want 4: a limit that was not used says nothing", got)
	}
}

func TestPacerShrinksOncePerRoundWhenResponseTimeRises(t *testing.T) {
	p := newPacer(2, 16, 64, half)
	round(p, t0, t0, 5*ms) // baseline 5ms
	before := p.state().limit
	// The server slows: 18ms answers, a queue under twice the target. The
	// moving average crosses 10ms on the third of them; the limit falls
	// once for the round.
	admitted := t0.Add(10 * ms)
	now := t0.Add(50 * ms)
	shrunk := 0
	for range 8 {
		if p.succeeded(now, admitted, 18*ms, 0, int(before)) {
			shrunk++
		}
	}
	st := p.state()
	if shrunk != 1 || st.decreases != 1 {
		t.Fatalf("%d decreases in one round (state %+v), want 1", shrunk, st)
	}
	if st.limit >= before || st.limit < before/2 {
		t.Errorf("limit %v after one decrease from %v, want in [%v, %v)", st.limit, before, before/2, before)
	}
	// Establishments admitted after the decrease see the slow server too:
	// the next round decreases again.
	if !p.succeeded(now.Add(50*ms), now.Add(ms), 18*ms, 0, int(st.limit)) {
		t.Error("a later round did not decrease")
	}
	if st := p.state(); st.baseline != 5*ms {
		t.Errorf("baseline %v, want the smallest response time, 5ms", st.baseline)
	}
}

func TestPacerCutsADeepQueueAtEveryAnswer(t *testing.T) {
	p := newPacer(2, 32, 64, half)
	round(p, t0, t0, 5*ms) // baseline 5ms, target 10ms
	// Answers of one round come back from a queue of 40 times the target:
	// each cuts, down to a fraction of one establishment in flight.
	admitted, now := t0.Add(10*ms), t0.Add(500*ms)
	// The first answer raises the average to 104ms, ten times the target:
	// a cut by the most, 1/8.
	before := p.state().limit
	p.succeeded(now, admitted, 400*ms, 0, 32)
	if got := p.state().limit; got != before/8 {
		t.Fatalf("limit %v after an answer ten times the target, want %v/8", got, before)
	}
	for i := range 16 {
		p.succeeded(now.Add(time.Duration(i)*ms), admitted, 400*ms, 0, 32)
	}
	st := p.state()
	if st.limit >= 1 || st.decreases < 8 {
		t.Fatalf("after 16 answers from a deep queue: %+v, want a limit below 1", st)
	}
	// Below 1 the pacer has one establishment in flight the share l of
	// the time: after an answer that took rt it waits (1/l − 1) × rt, with
	// rt no more than allowed (10ms here), not the 400ms the queue took.
	last := now.Add(15 * ms)
	want := last.Add(time.Duration(float64(10*ms) * (1/st.limit - 1)))
	if got := p.admitAt(); !got.Equal(want) {
		t.Errorf("next admission at %v after the answer, want %v", got.Sub(last), want.Sub(last))
	}
	// Once the queue is gone, each answer within allowed adds subOneStep,
	// and the pause follows the answer's time, 8ms.
	l := st.limit
	answer := want.Add(8 * ms)
	p.succeeded(answer, want, 8*ms, 0, 1)
	if got := p.state().limit; got != l+subOneStep {
		t.Errorf("limit %v after an answer within allowed, want %v", got, l+subOneStep)
	}
	l += subOneStep
	if got, want := p.admitAt(), answer.Add(time.Duration(float64(8*ms)*(1/l-1))); !got.Equal(want) {
		t.Errorf("next admission at %v after an 8ms answer, want %v", got.Sub(answer), want.Sub(answer))
	}
}

// The server's facts bound the first byte (a round trip and the forks);
// what comes after it, authentication and the backend's start-up, is no
// queue, and a server that forks fast does not make it shorter.
func TestPacerBaselineBoundAddsTheStartUpAfterTheFirstByte(t *testing.T) {
	p := newPacer(2, 8, 64, half)
	// An idle server: 4.6ms a connect, 4ms of it after the first byte.
	for i := range 8 {
		at := t0.Add(time.Duration(i) * 10 * ms)
		p.succeeded(at.Add(4600*time.Microsecond), at, 4600*time.Microsecond, 4*ms, 1)
	}
	// It forks 1,400 backends a second: two forks are 1.43ms.
	p.capBaseline(t0.Add(time.Second), 1430*time.Microsecond)
	if st := p.state(); st.baseline != 4600*time.Microsecond || st.decreases != 0 {
		t.Errorf("state %+v after the facts, want the 4.6ms baseline kept (bound 1.43ms + 4ms of start-up) and no decrease", st)
	}
	// A storm's queue is still one: 600ms, of which 4ms after the byte.
	q := newPacer(2, 8, 64, half)
	for range 8 {
		q.succeeded(t0.Add(600*ms), t0, 600*ms, 4*ms, 8)
	}
	q.capBaseline(t0.Add(time.Second), 1430*time.Microsecond)
	if st := q.state(); st.baseline != 5430*time.Microsecond || st.decreases != 1 {
		t.Errorf("state %+v after the facts, want the baseline capped at 5.43ms and a cut", st)
	}
}

func TestPacerBaselineCappedByTheServersFacts(t *testing.T) {
	p := newPacer(2, 8, 64, half)
	// The first answers came from inside a storm: a 600ms baseline.
	round(p, t0, t0, 600*ms)
	if st := p.state(); st.baseline != 600*ms || st.decreases != 0 {
		t.Fatalf("state %+v", st)
	}
	// The server says it forks 40 backends a second: an idle answer takes
	// 50ms or less, and 600ms is a queue, deeper than twice the 100ms
	// target: the pacer cuts at once, by allowed ÷ smoothed (1/6), rather
	// than a queue's length later.
	before := p.state().limit
	p.capBaseline(t0.Add(600*ms), 50*ms)
	if st := p.state(); st.baseline != 50*ms || st.decreases != 1 || math.Abs(st.limit-before/6) > 1e-9 {
		t.Fatalf("state %+v after the cap, want baseline 50ms, limit %v/6 after one decrease", st, before)
	}
	if !p.succeeded(t0.Add(time.Second), t0.Add(700*ms), 600*ms, 0, 8) {
		t.Error("a 600ms answer against a 50ms baseline did not decrease the limit")
	}
	// A smaller answer still lowers it.
	p.succeeded(t0.Add(2*time.Second), t0.Add(1900*ms), 20*ms, 0, 1)
	if got := p.state().baseline; got != 20*ms {
		t.Errorf("baseline %v after a 20ms answer, want 20ms", got)
	}
	// A pacer that knows a smaller baseline keeps it, and its limit.
	kept := p.state()
	p.capBaseline(t0.Add(3*time.Second), 50*ms)
	if got := p.state(); got != kept {
		t.Errorf("state %+v after a cap above the baseline, want %+v", got, kept)
	}
}

// On a loopback server answering in half a millisecond, a response time
// within pacerSlack of the baseline is no queue, even at twice the
// baseline; past the slack it is.
func TestPacerToleratesASlackAboveASubMillisecondBaseline(t *testing.T) {
	us := time.Microsecond
	p := newPacer(2, 16, 64, half)
	round(p, t0, t0, 500*us) // baseline 0.5ms
	before := p.state().limit
	admitted, now := t0.Add(10*ms), t0.Add(20*ms)
	for range 8 {
		p.succeeded(now, admitted, 2400*us, 0, int(before)) // 4.8× the baseline, within 2ms of it
	}
	if st := p.state(); st.decreases != 0 || st.limit < before {
		t.Fatalf("2.4ms answers against a 0.5ms baseline: %+v, want no decrease from %v", st, before)
	}
	for range 8 {
		p.succeeded(now, admitted, 4*ms, 0, int(before))
	}
	if st := p.state(); st.decreases != 1 {
		t.Errorf("4ms answers against a 0.5ms baseline: %d decreases, want 1", st.decreases)
	}
}

// A slow first answer (a process's first connect) is no queue once a faster
// one shows the idle response time.
func TestPacerNewBaselineForgetsSlowerFirstAnswers(t *testing.T) {
	p := newPacer(2, 4, 64, half)
	p.succeeded(t0, t0, 10*ms, 0, 1)
	for i := range 3 {
		p.succeeded(t0.Add(time.Duration(i+1)*ms), t0.Add(time.Duration(i+1)*ms), 2*ms, 0, 2)
	}
	if st := p.state(); st.decreases != 0 || st.baseline != 2*ms {
		t.Errorf("after a 10ms answer and three of 2ms: %+v, want baseline 2ms and no decrease", st)
	}
}

func TestPacerProbesAfterAFailureAndKeepsItsBaseline(t *testing.T) {
	p := newPacer(2, 2, 64, half)
	now := t0
	for range 3 {
		now = now.Add(5 * ms)
		round(p, now, now.Add(-5*ms), 5*ms)
	}
	if !p.failed(now) {
		t.Fatal("a failure did not decrease the limit")
	}
	st := p.state()
	if st.limit != 1 || st.baseline != 5*ms {
		t.Fatalf("after a failure: limit %v, baseline %v; want one prober and the 5ms baseline kept", st.limit, st.baseline)
	}
	// The prober succeeds: slow start from one, doubling per round up to
	// half the limit before the failure (8), then one per round.
	var limits []float64
	for range 5 {
		now = now.Add(5 * ms)
		round(p, now, now.Add(-ms), 5*ms)
		limits = append(limits, p.state().limit)
	}
	if limits[0] != 2 || limits[1] != 4 || limits[2] != 8 || limits[3] >= 10 || limits[4] >= 11 {
		t.Errorf("limits after the failure %v, want 2, 4, 8, then about one more per round", limits)
	}
}

func TestPacerOffKeepsItsLimit(t *testing.T) {
	p := newPacer(0, 2, 7, half)
	if p.succeeded(t0, t0, 500*ms, 0, 7) || p.failed(t0) || p.state().limit != 7 {
		t.Errorf("a pacer that is off changed: %+v", p.state())
	}
}

func TestPacerSlotsFirstComeFirstServed(t *testing.T) {
	p := newPacer(2, 1, 4, half)
	if ok, n := p.tryTake(); !ok || n != 1 {
		t.Fatalf("tryTake on a free pacer = %v, %d", ok, n)
	}
	if ok, _ := p.tryTake(); ok {
		t.Fatal("took a second slot with a limit of one")
	}
	order := make(chan int, 3)
	for i := range 3 {
		go func() {
			if _, err := p.take(context.Background()); err == nil {
				order <- i
			}
		}()
		for waiting(p) != i+1 {
			time.Sleep(ms) // until the goroutine queues: nothing else to wait on
		}
	}
	for want := range 3 {
		p.give()
		if got := <-order; got != want {
			t.Fatalf("slot %d went to waiter %d", want, got)
		}
	}
	// A waiter that gives up leaves no trace; one whose slot was granted
	// as it gave up passes the slot on.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.take(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("take with an ended context: %v", err)
	}
	if waiting(p) != 0 || p.state().limit != 1 {
		t.Errorf("waiters %d after a cancelled take", waiting(p))
	}
}

func waiting(p *pacer) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waiters.Len()
}

func TestPacerGrowthAdmitsWaiters(t *testing.T) {
	p := newPacer(2, 1, 4, half)
	p.tryTake()
	got := make(chan int, 1)
	go func() {
		n, _ := p.take(context.Background())
		got <- n
	}()
	for waiting(p) != 1 {
		time.Sleep(ms)
	}
	p.succeeded(t0, t0, 5*ms, 0, 1) // the limit grows to two: the waiter gets the new slot
	if n := <-got; n != 2 {
		t.Errorf("waiter admitted with %d slots in use, want 2", n)
	}
}

// simServer is a postmaster that forks on workers cores: each connect takes
// service of one core's time, first come first served.
type simServer struct {
	service time.Duration
	free    []time.Time // when each core is next free
}

func newSimServer(cores int, service time.Duration) *simServer {
	return &simServer{service: service, free: make([]time.Time, cores)}
}

// serve returns when a connect arriving at t is answered.
func (s *simServer) serve(t time.Time) time.Time {
	first := 0
	for i := range s.free {
		if s.free[i].Before(s.free[first]) {
			first = i
		}
	}
	if t.After(s.free[first]) {
		s.free[first] = t
	}
	s.free[first] = s.free[first].Add(s.service)
	return s.free[first]
}

// simulate runs backlogged clients from start, each always connecting as
// much as its pacer allows, when it allows (a pacer below one in flight
// spaces its admissions), against srv until until. It returns each
// client's limit after every answer it got, and every response time.
func simulate(srv *simServer, pacers []*pacer, start, until time.Time) (limits [][]float64, rts []time.Duration) {
	type pending struct {
		client   int
		admitted time.Time
		done     time.Time
		inUse    int
	}
	var queue, spaced []pending // at the server; holding a slot, to be admitted at admitted
	held := make([]bool, len(pacers))
	now := start
	limits = make([][]float64, len(pacers))
	for now.Before(until) {
		for c, p := range pacers {
			for !held[c] {
				p.wake(now)
				ok, n := p.tryTake()
				if !ok {
					break
				}
				if at := p.admitAt(); at.After(now) {
					spaced, held[c] = append(spaced, pending{client: c, admitted: at, inUse: n}), true
					break
				}
				queue = append(queue, pending{c, now, srv.serve(now), n})
			}
		}
		sort.Slice(queue, func(i, j int) bool { return queue[i].done.Before(queue[j].done) })
		sort.Slice(spaced, func(i, j int) bool { return spaced[i].admitted.Before(spaced[j].admitted) })
		if len(spaced) > 0 && (len(queue) == 0 || spaced[0].admitted.Before(queue[0].done)) {
			s := spaced[0]
			spaced, held[s.client], now = spaced[1:], false, s.admitted
			queue = append(queue, pending{s.client, now, srv.serve(now), s.inUse})
			continue
		}
		next := queue[0]
		queue = queue[1:]
		now = next.done
		p := pacers[next.client]
		rt := next.done.Sub(next.admitted)
		rts = append(rts, rt)
		p.succeeded(now, next.admitted, rt, 0, next.inUse)
		p.give()
		limits[next.client] = append(limits[next.client], p.state().limit)
	}
	// What is still in flight is answered, as a real server would.
	for _, q := range append(queue, spaced...) {
		pacers[q.client].give()
	}
	return limits, rts
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

func median(ds []time.Duration) time.Duration {
	ds = append([]time.Duration(nil), ds...)
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds[len(ds)/2]
}

// Pacers on a simulated 4-core server: one alone keeps the server's queue
// near the target and still uses every core; two that start together share
// the server about evenly, with the queue still near the target.
func TestPacersConvergeAndShareFairly(t *testing.T) {
	const cores, service = 4, 4 * ms
	srv := newSimServer(cores, service)
	a := newPacer(2, 2, 32, half)
	limits, rts := simulate(srv, []*pacer{a}, t0, t0.Add(5*time.Second))
	if med := median(rts[len(rts)/2:]); med > 2*service+service/2 {
		t.Errorf("one pacer: median response time %v, want near the 2 × 4ms target", med)
	}
	// A queue of about one connect per core: every core stays busy.
	if m := mean(limits[0][len(limits[0])/2:]); m < cores {
		t.Errorf("one pacer: mean limit %.2f, want at least one connect per core (%d)", m, cores)
	}

	srv = newSimServer(cores, service)
	a, b := newPacer(2, 2, 32, half), newPacer(2, 2, 32, half)
	limits, rts = simulate(srv, []*pacer{a, b}, t0, t0.Add(20*time.Second))
	ma, mb := mean(limits[0][len(limits[0])/2:]), mean(limits[1][len(limits[1])/2:])
	if r := math.Max(ma, mb) / math.Min(ma, mb); r > 1.5 {
		t.Errorf("mean limits %.2f and %.2f: one pacer got %.1f× the other's share", ma, mb, r)
	}
	if med := median(rts[len(rts)/2:]); med > 2*service+service/2 {
		t.Errorf("two pacers: median response time %v, want near the 2 × 4ms target", med)
	}
}

// A pacer that starts while another holds the server's queue at the target
// first learns a baseline that includes that queue (about twice the idle
// response time). Its baseline probe, alone in flight while the first one
// has backed off, finds the idle response time, and the queue returns to the
// target.
func TestPacerStartedUnderLoadFindsTheIdleBaselineByProbing(t *testing.T) {
	const cores, service = 4, 4 * ms
	srv := newSimServer(cores, service)
	a, b := newPacer(2, 2, 32, half), newPacer(2, 2, 32, half)
	simulate(srv, []*pacer{a}, t0, t0.Add(5*time.Second))
	start := t0.Add(5 * time.Second)
	limits, rts := simulate(srv, []*pacer{a, b}, start, start.Add(20*time.Second))
	if got := b.state().baseline; got != service {
		t.Errorf("late pacer's baseline %v after 20s, want the idle 4ms", got)
	}
	last := rts[len(rts)*3/4:]
	if med := median(last); med > 2*service+service/2 {
		t.Errorf("median response time %v once the late pacer probed, want near the 2 × 4ms target", med)
	}
	t.Logf("mean limits over the last quarter: first %.1f, late %.1f; median response time %v",
		mean(limits[0][len(limits[0])*3/4:]), mean(limits[1][len(limits[1])*3/4:]), median(last))
}

// A fleet of pacers sharing one postmaster, each knowing the idle
// baseline from the server's facts (8ms: two 4ms forks): below one connect
// in flight each, they keep its queue within twice their target of 16ms,
// where forty pacers holding one connect each would keep forty in it
// (160ms), and the server stays busy.
func TestPacersBelowOneInFlightKeepAFleetsQueueShort(t *testing.T) {
	const fleet, service = 40, 4 * ms
	srv := newSimServer(1, service)
	pacers := make([]*pacer, fleet)
	for i := range pacers {
		pacers[i] = newPacer(2, 1, 32, half)
		pacers[i].capBaseline(t0, 2*service)
	}
	const run = 60 * time.Second
	limits, rts := simulate(srv, pacers, t0, t0.Add(run))
	last := rts[len(rts)/2:]
	if med := median(last); med > 8*service {
		t.Errorf("median response time %v over the later half, want at most twice the 16ms target", med)
	}
	var total float64
	for _, l := range limits {
		total += l[len(l)-1]
	}
	if total >= fleet/4 {
		t.Errorf("the fleet's limits sum to %.1f connects in flight, want far below one per pacer (%d)", total, fleet)
	}
	if got, most := float64(len(rts)), float64(run/service); got < 0.7*most {
		t.Errorf("%v answers in %v, want at least 70%% of the %v the server could give", got, run, most)
	}
	t.Logf("median response time %v; limits sum to %.2f; %d answers of %d possible", median(last), total, len(rts), run/service)
}

// Below a limit of 1 a pacer learns only from its own answers: one that
// has admitted nothing for a while, past its own pause, comes back to one
// prober with no pause, its baseline kept, and the prober's answer starts
// the moving average afresh. Within the pause, or with an establishment in
// flight, nothing changes.
func TestPacerBelowOneWakesToAProberAfterAQuietSpell(t *testing.T) {
	p := newPacer(2, 1, 32, half)
	now := t0.Add(5 * ms)
	p.succeeded(now, t0, 5*ms, 0, 1) // baseline 5ms, allowed 10ms
	// A storm: answers of 400ms cut the limit to its floor.
	for p.state().limit > minLimit {
		admitted := now
		now = now.Add(400 * ms)
		p.succeeded(now, admitted, 400*ms, 0, 1)
	}
	pause := p.admitAt()
	if want := now.Add(time.Duration(float64(10*ms) * (1/minLimit - 1))); !pause.Equal(want) {
		t.Fatalf("next admission %v after the last answer, want %v", pause.Sub(now), want.Sub(now))
	}
	p.wake(pause.Add(staleAfter - ms))
	if got := p.state().limit; got != minLimit {
		t.Fatalf("limit %v woken %v past its pause, want %v kept until %v past it", got, staleAfter-ms, minLimit, staleAfter)
	}
	quiet := pause.Add(staleAfter)
	if ok, _ := p.tryTake(); !ok {
		t.Fatal("no slot")
	}
	p.wake(quiet)
	if got := p.state().limit; got != minLimit {
		t.Fatalf("limit %v woken with an establishment in flight, want %v kept", got, minLimit)
	}
	p.give()
	p.wake(quiet)
	st := p.state()
	if st.limit != 1 || st.baseline != 5*ms || !p.admitAt().IsZero() {
		t.Fatalf("after a quiet spell: limit %v, baseline %v, next admission %v; want one prober at once, the 5ms baseline kept",
			st.limit, st.baseline, p.admitAt())
	}
	// The prober's 6ms answer is within allowed: it is the average now,
	// not a quarter of the way down from the storm's, and the limit grows.
	p.succeeded(quiet.Add(6*ms), quiet, 6*ms, 0, 1)
	if st := p.state(); st.limit != 2 {
		t.Errorf("limit %v after the prober's 6ms answer, want 2: the storm's average is forgotten", st.limit)
	}
}

// A pool's establishments after its first wait until the pool has read
// the server's facts on that first connection: until then a pacer inside a
// storm's queue cannot tell the queue from its baseline. Nothing waits
// before the first answer, nor after the first facts, nor in a pool that
// does not read them.
func TestPacerFactsWaitHoldsAfterTheFirstAnswerUntilTheFirstFacts(t *testing.T) {
	p := newPacer(2, 1, 32, half)
	p.holdForFacts()
	if ch := p.factsWait(); ch != nil {
		t.Fatal("the first establishment waits for facts no connection could have read")
	}
	p.succeeded(t0.Add(5*ms), t0, 5*ms, 0, 1)
	ch := p.factsWait()
	if ch == nil {
		t.Fatal("the second establishment does not wait for the facts")
	}
	select {
	case <-ch:
		t.Fatal("the wait ended before the facts came")
	default:
	}
	p.capBaseline(t0.Add(6*ms), 0) // facts with no rate in them end it too
	select {
	case <-ch:
	default:
		t.Fatal("the wait did not end when the facts came")
	}
	if p.factsWait() != nil {
		t.Error("establishments still wait after the facts came")
	}

	q := newPacer(2, 1, 32, half) // a single-connection pool's: no facts awaited
	q.succeeded(t0.Add(5*ms), t0, 5*ms, 0, 1)
	if q.factsWait() != nil {
		t.Error("a pacer that awaits no facts makes establishments wait")
	}

	r := newPacer(2, 1, 32, half) // a read that failed ends the wait
	r.holdForFacts()
	r.succeeded(t0.Add(5*ms), t0, 5*ms, 0, 1)
	ch = r.factsWait()
	r.factsRead()
	select {
	case <-ch:
	default:
		t.Error("a failed read did not end the wait")
	}
}
