package main

import (
	"fmt"
	"slices"
	"time"
)

// quantile returns the q-quantile (nearest rank) of ds.
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

// report prints a figure against its ceiling: p50 and p99 of both and the
// ratio of the p50s.
func report(name string, got, ceiling []time.Duration) {
	g50, g99 := quantile(got, 0.5), quantile(got, 0.99)
	c50, c99 := quantile(ceiling, 0.5), quantile(ceiling, 0.99)
	fmt.Printf("%s: p50 %v p99 %v | ceiling p50 %v p99 %v | p50 ratio %.2f× (n=%d)\n",
		name, g50.Round(time.Microsecond), g99.Round(time.Microsecond), c50.Round(time.Microsecond), c99.Round(time.Microsecond),
		float64(g50)/float64(c50), len(got))
}
