// Package jitter is the delay math behind pgstagger's startup spreading and
// retry backoff: pure functions of a duration and a random draw, plus a
// context-aware [Sleep].
//
// Every function takes its random draw r ∈ [0, 1) as a parameter instead of
// reading a generator, in the style of backoff's getRandomValueFromInterval,
// so that callers (and tests) decide where randomness comes from. Pass
// [Float64] for the default generator.
//
// All arithmetic is done in float64 nanoseconds: a 750ms window yields delays
// anywhere in [0, 750ms), never truncated to whole seconds the way pgxpool
// truncates MaxConnLifetimeJitter.
//
// [Uniform] spreads a process's first connections over a window, and each
// retry's wait over [0, interval) (full jitter, through dialer.FullJitter).
// [Decelerating] places a fleet's members in a window so that the fleet
// connects more slowly as the server fills, and [Phase] keeps each member's
// place in a wall-clock cycle when the fleet reconnects after a failure.
// [Weyl] turns a number a process knows, distinct from its fleet's and
// nearly consecutive with theirs (a backend's process ID), into such a
// place, evenly spread with no coordination.
//
// The functions are safe for concurrent use; [Rand] values must be too if
// shared.
package jitter
