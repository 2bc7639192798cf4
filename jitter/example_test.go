package jitter_test

import (
	"fmt"
	"time"

	"github.com/pgstagger/pgstagger/jitter"
)

// A fleet spreads its first connections over a window; the draw decides where
// in the window this process lands.
func ExampleUniform() {
	window := 750 * time.Millisecond
	for _, r := range []float64{0, 0.5, 0.999} {
		fmt.Println(jitter.Uniform(window, r))
	}
	// Output:
	// 0s
	// 375ms
	// 749.25ms
}

// Full jitter draws each retry's delay from [0, min(limit, base·2^attempt)).
func ExampleFull() {
	for attempt := range 5 {
		fmt.Println(jitter.Full(100*time.Millisecond, time.Second, attempt, 0.5))
	}
	// Output:
	// 50ms
	// 100ms
	// 200ms
	// 400ms
	// 500ms
}
