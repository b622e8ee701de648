// Package pause waits for a duration unless a context ends first: the
// back-off and pacing loops of the node and its services share it.
package pause

import (
	"context"
	"time"
)

// For waits for d or until ctx ends; it reports whether d passed.
func For(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
