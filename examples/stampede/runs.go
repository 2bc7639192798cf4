package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"
)

// eachRun runs o's runs (-runs) and returns their results in order, each
// announced by the line announce gives; run runs one, showing
// its progress with show (nil: not shown) on a terminal line of its own
// when progress is set.
//
// Against a real server the runs go one after another, each once the
// server is quiet (waitQuiet). On simulated time (o.srv.sideBySide) each
// goes in a bubble of its own, against a simulated server of its own,
// GOMAXPROCS of them at once and the rest as those end: the runs share
// nothing but the process, so each finds what it would alone, on a clock
// of its own, and the machine's cores share their work instead of taking
// turns, at the cost of holding their memory at once.
func eachRun[R any](ctx context.Context, out io.Writer, o options, idle time.Duration, progress bool,
	announce func(runConfig) string, run func(rc runConfig, show func(string)) (R, error)) ([]R, error) {
	if _, err := allRuns(o); err != nil {
		return nil, err
	}
	names := strings.Split(o.runs, ",")
	results := make([]R, len(names))
	errs := make([]error, len(names))
	if o.srv.sideBySide == nil {
		for i, name := range names {
			// Each run on a quiet server: the capacity measurement,
			// or the run before, leaves a backlog that the
			// bystander's first connects would otherwise wait in.
			if err := waitQuiet(ctx, o.srv, idle); err != nil {
				return nil, err
			}
			rc := runOn(o, name, o.srv)
			fmt.Fprintln(out, announce(rc))
			b := newBoard(progress, 1)
			results[i], errs[i] = run(rc, b.line(0))
			b.clear()
			if errs[i] != nil {
				return nil, errs[i]
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
		}
		return results, nil
	}
	for _, name := range names {
		fmt.Fprintln(out, announce(runOn(o, name, o.srv)))
	}
	b := newBoard(progress, len(names))
	slots := runtime.GOMAXPROCS(0)
	waits := make([]func(), len(names))
	for i, name := range names {
		if i >= slots {
			waits[i-slots]()
		}
		waits[i] = o.srv.sideBySide(func(srv *server) {
			results[i], errs[i] = run(runOn(o, name, srv), b.line(i))
		})
	}
	for _, wait := range waits[max(0, len(names)-slots):] {
		wait()
	}
	b.clear()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return results, nil
}

// runOn is the run called name (see allRuns) against srv.
func runOn(o options, name string, srv *server) runConfig {
	o.runs, o.srv = name, srv
	runs, _ := allRuns(o) // name is one of them: eachRun checked
	rc := runs[0]
	rc.srv = srv
	return rc
}

// board shows the runs' progress on a terminal, a line for each,
// rewritten in place.
type board struct {
	w io.Writer

	mu    sync.Mutex
	lines []string // guarded by mu
	drawn bool     // guarded by mu: the lines are on the terminal
}

// newBoard is a board of n lines on standard error, or nil without
// progress.
func newBoard(progress bool, n int) *board {
	if !progress {
		return nil
	}
	return &board{w: os.Stderr, lines: make([]string, n)}
}

// line is the show function of line i; nil for a nil board.
func (b *board) line(i int) func(string) {
	if b == nil {
		return nil
	}
	return func(s string) {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.lines[i] = s
		var sb strings.Builder
		sb.WriteString(b.top())
		for i, l := range b.lines {
			if i > 0 {
				sb.WriteString("\n")
			}
			sb.WriteString("\033[K" + l)
		}
		b.drawn = true
		_, _ = io.WriteString(b.w, sb.String())
	}
}

// top moves the cursor to the start of the first line; b.mu is held.
func (b *board) top() string {
	if !b.drawn || len(b.lines) == 1 {
		return "\r"
	}
	return fmt.Sprintf("\r\033[%dA", len(b.lines)-1)
}

// clear erases the lines.
func (b *board) clear() {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.drawn {
		_, _ = io.WriteString(b.w, b.top()+"\033[J")
		b.drawn = false
	}
}
