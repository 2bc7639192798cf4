package engine

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgconn"
)

// hostHealth backs off the addresses of a multi-host connection string
// (host=a,b) whose dials fail, or that accept a connection and send nothing
// until pgconn gives up on them (connect_timeout applies per host). pgconn
// tries the hosts in order on every connect, so without it a dead first
// host would be dialed, or waited on, before every connection to the live
// one. While some other address is not backed off, a
// backed-off address is skipped without a dial, and pgconn goes on to the
// next host; when every address is backed off, each is dialed as usual and
// the gate's recovery delay paces the attempts. Each address backs off with
// a policy of its own from the Gate's, reset by a successful dial.
// Addresses are grouped by the connection string's host list (see
// [hostGroup]), so that configurations sharing a Gate do not skip each
// other's hosts, and repeated connects of one configuration share their state.
//
// It is safe for concurrent use.
type hostHealth struct {
	newBackOff func() backoff.BackOff

	mu     sync.Mutex
	groups map[string]map[string]*hostState // by host list, then by network and address; guarded by mu
}

type hostState struct {
	until   time.Time       // not dialed before this while another host is up; zero when healthy
	policy  backoff.BackOff // nil while healthy
	lastErr error           // the failed dial's error
}

func newHostHealth(newBackOff func() backoff.BackOff) *hostHealth {
	return &hostHealth{newBackOff: newBackOff, groups: map[string]map[string]*hostState{}}
}

// hostGroup names cfg's host list: its host:port and its fallbacks', in
// order.
func hostGroup(cfg *pgconn.Config) string {
	var b strings.Builder
	b.WriteString(net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))))
	for _, fb := range cfg.Fallbacks {
		b.WriteByte(',')
		b.WriteString(net.JoinHostPort(fb.Host, strconv.Itoa(int(fb.Port))))
	}
	return b.String()
}

// state returns the state of addr in group, and the group's addresses,
// adding addr if it is new; h.mu is held.
func (h *hostHealth) state(group, network, addr string) (*hostState, map[string]*hostState) {
	hosts := h.groups[group]
	if hosts == nil {
		hosts = map[string]*hostState{}
		h.groups[group] = hosts
	}
	key := network + " " + addr
	s := hosts[key]
	if s == nil {
		s = &hostState{}
		hosts[key] = s
	}
	return s, hosts
}

// skip returns an error if addr is backed off and another address of group
// seen so far is not; nil means dial it.
func (h *hostHealth) skip(group, network, addr string, now time.Time) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, hosts := h.state(group, network, addr)
	if !now.Before(s.until) {
		return nil
	}
	for _, o := range hosts {
		if o != s && !now.Before(o.until) {
			return &hostBackedOffError{addr: addr, left: s.until.Sub(now), last: s.lastErr}
		}
	}
	return nil
}

// record notes the result of a dial to addr. Failures the caller caused
// (its context ended) say nothing of the host and are not recorded.
func (h *hostHealth) record(group, network, addr string, err error, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, _ := h.state(group, network, addr)
	if err == nil {
		*s = hostState{}
		return
	}
	if s.policy == nil {
		s.policy = h.newBackOff()
	}
	wait := s.policy.NextBackOff()
	if wait == backoff.Stop {
		s.policy.Reset()
		wait = max(s.policy.NextBackOff(), 0)
	}
	s.until, s.lastErr = now.Add(wait), err
}

// errHostSilent is what a host is recorded as when it accepted a connection
// but sent nothing before pgconn gave up on it and went on to the next.
var errHostSilent = errors.New("accepted the connection but sent nothing before connect_timeout")

// hostBackedOffError is a dial pgstagger did not make: the host's last dial
// failed, and another host of the connection string is up. It classifies
// as transient (it wraps syscall.ECONNREFUSED, as the host would answer).
type hostBackedOffError struct {
	addr string
	left time.Duration
	last error
}

func (e *hostBackedOffError) Error() string {
	return fmt.Sprintf("pgstagger: %s not dialed: backed off for another %v after its last dial failed (%v); trying the next host",
		e.addr, e.left.Round(time.Millisecond), e.last)
}

func (e *hostBackedOffError) Unwrap() error { return syscall.ECONNREFUSED }
