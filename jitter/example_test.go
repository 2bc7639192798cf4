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
