package simnet

import (
	"cmp"
	"fmt"
	"slices"
	"sync"
	"time"
)

// Kind names what an Event records.
type Kind string

// Kinds of Event.
const (
	// KindStep: a scenario step began (Key is its name, Node is -1).
	KindStep Kind = "step"
	// KindBundleStored: a node newly stored (or refreshed) a bundle, from
	// any source (node.Config.OnBundleStored); Key is the device key.
	KindBundleStored Kind = "bundle_stored"
)

// Event is one entry of the network's event log.
type Event struct {
	// At is the virtual time since New.
	At time.Duration
	// Step is the scenario step the event happened in (0 before the first
	// Step call).
	Step int
	// Node is the node's index, -1 for a step.
	Node int
	Kind Kind
	Key  string
}

func (e Event) String() string {
	if e.Kind == KindStep {
		return fmt.Sprintf("step %d %s", e.Step, e.Key)
	}
	return fmt.Sprintf("step %d node %d %s %s", e.Step, e.Node, e.Kind, e.Key)
}

type eventLog struct {
	start time.Time
	mu    sync.Mutex
	step  int
	log   []Event
}

func (l *eventLog) add(node int, kind Kind, key string) {
	at := time.Since(l.start)
	l.mu.Lock()
	defer l.mu.Unlock()
	if kind == KindStep {
		l.step++
	}
	l.log = append(l.log, Event{At: at, Step: l.step, Node: node, Kind: kind, Key: key})
}

// Step marks the start of a scenario step named name: events from now on
// belong to it (see Log).
func (nw *Network) Step(name string) { nw.events.add(-1, KindStep, name) }

// Events returns the raw event log in the order events were recorded, with
// their virtual times. It is NOT deterministic across runs of one seed:
// gossipsub (mesh choices, message IDs' arrival order) and QUIC
// (connection IDs, pacing) draw from math/rand's global source, which
// cannot be seeded, and the runtime schedules a bubble's goroutines in no
// fixed order; so which node stores a bundle first, over which path, at
// which virtual microsecond, varies. Use Log to compare runs.
func (nw *Network) Events() []Event {
	nw.events.mu.Lock()
	defer nw.events.mu.Unlock()
	return slices.Clone(nw.events.log)
}

// Log returns the deterministic form of the event log, one line per
// entry: for each scenario step in order, the step's line, then the SET of
// (node, kind, key) that happened during the step, sorted by node, kind and
// key, each once, whatever its order, time or repetitions within the step.
//
// "Same event order" means: Log is equal across runs with the same Seed
// and scenario. That holds when the scenario is itself deterministic —
// each step's inputs derive from the seed (NewBundle, fixed node indexes)
// and each step ends by waiting for a condition of the network's state
// (every holder stores the bundle, both sides converged) rather than a
// fixed time — because then what each node has stored by the end of each
// step is fixed by the protocol's guarantees, while only the path and the
// timing, which Log leaves out, depend on unseeded randomness. A scenario
// step that ends before the network has settled (a fixed sleep) makes Log
// depend on timing again.
func (nw *Network) Log() []string {
	evs := nw.Events()
	type entry struct {
		node int
		kind Kind
		key  string
	}
	var out []string
	flush := func(set map[entry]bool) {
		es := make([]entry, 0, len(set))
		for e := range set {
			es = append(es, e)
		}
		slices.SortFunc(es, func(a, b entry) int {
			return cmp.Or(cmp.Compare(a.node, b.node), cmp.Compare(a.kind, b.kind), cmp.Compare(a.key, b.key))
		})
		for _, e := range es {
			out = append(out, fmt.Sprintf("  node %d %s %s", e.node, e.kind, e.key))
		}
	}
	set := map[entry]bool{}
	for _, e := range evs {
		if e.Kind == KindStep {
			flush(set)
			set = map[entry]bool{}
			out = append(out, e.String())
			continue
		}
		set[entry{e.Node, e.Kind, e.Key}] = true
	}
	flush(set)
	return out
}
