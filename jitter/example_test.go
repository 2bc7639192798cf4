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

// Member i of a fleet of n starts at (i + ½)/n of the fleet's order; the
// gaps grow as the fleet fills.
func ExampleDecelerating() {
	window := 30 * time.Second
	const n = 4
	for i := range n {
		fmt.Println(jitter.Decelerating(window, (float64(i)+0.5)/n).Round(time.Millisecond))
	}
	// Output:
	// 2.656s
	// 8.906s
	// 16.406s
	// 25.156s
}

// Five processes whose backends were forked one after another take places
// in a reconnect cycle from their backends' process IDs: sorted, 0.215,
// 0.361, 0.597, 0.743 and 0.979, gaps of only two sizes (0.146 and 0.236
// of the cycle), where five draws could land anywhere.
func ExampleWeyl() {
	for pid := uint64(4200); pid < 4205; pid++ {
		fmt.Printf("%.3f\n", jitter.Weyl(pid))
	}
	// Output:
	// 0.743
	// 0.361
	// 0.979
	// 0.597
	// 0.215
}
