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
//   - [Uniform] spreads first connections of a fleet over a window.
//   - [Full] is "full jitter" (uniform over [0, min(limit, base·2^n))), the
//     backoff that best breaks up synchronized retries.
//   - [Decorrelated] grows from the previous delay instead of the attempt
//     count.
//
// The functions are safe for concurrent use; [Rand] values must be too if
// shared.
package jitter
