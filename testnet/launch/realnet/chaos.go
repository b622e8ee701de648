package realnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// ChaosOptions configure a SIGKILL chaos run.
type ChaosOptions struct {
	Bin, Dir string
	Network  string
	Nodes    int
	// Duration of the paced publish; Rate bundles per second, at most
	// Duration×Rate bundles in all.
	Duration time.Duration
	Rate     int
	// KillEvery is the mean time between kills (±25 %); DownFor how long a
	// killed node stays down before it restarts on the same data dir.
	KillEvery, DownFor time.Duration
	// Converge bounds the wait after the publish for every node to hold
	// every acknowledged bundle.
	Converge time.Duration
	Log      io.Writer
}

// ChaosResult are the figures of a run.
type ChaosResult struct {
	Nodes      int
	Posted     int // POST attempts
	Acked      int // 204s
	Failed     int // refused or cut by a kill (not acknowledged, not counted as lost)
	Kills      []Kill
	Published  time.Duration
	StayedUp   []int // node indexes never killed
	LostAtEnd  int   // acked bundles missing on some stayed-up node right after the publish
	LostUp     int   // acked bundles missing on some stayed-up node after convergence (must be 0)
	LostOnAck  int   // acked bundles missing on the node that acknowledged them (must be 0)
	LostAll    int   // acked bundles missing on some node after convergence (must be 0)
	Converged  time.Duration
	ConvergeOK bool
	Counts     []int64
}

// Kill is one SIGKILL of the run.
type Kill struct {
	Node     int
	At, Down time.Duration // since the start; until the API answered again
}

type ack struct {
	b    *protocol.Bundle
	node int
}

// Chaos runs a paced publish to random live nodes while a chaos loop
// SIGKILLs a random non-bootstrap node and restarts it on the same data dir;
// then it waits for convergence and counts acknowledged bundles lost.
func Chaos(ctx context.Context, o ChaosOptions) (*ChaosResult, error) {
	total := int(o.Duration.Seconds() * float64(o.Rate))
	if o.Nodes < 3 || o.Rate < 1 || total < 1 || o.KillEvery <= 0 || o.DownFor <= 0 {
		return nil, errors.New("chaos: nodes ≥ 3, rate ≥ 1, duration, kill-every and down-for > 0")
	}
	logf := func(format string, args ...any) {
		if o.Log != nil {
			fmt.Fprintf(o.Log, format+"\n", args...)
		}
	}
	c := NewCluster(o.Bin, o.Dir, o.Network)
	defer c.Close()
	for i := 0; i < o.Nodes; i++ {
		var boot []string
		if i > 0 {
			boot = []string{c.Nodes[0].Addr}
		}
		if _, err := c.Add(ctx, boot); err != nil {
			return nil, err
		}
	}
	for _, n := range c.Nodes {
		if _, err := n.WaitStatus(ctx, 60*time.Second, func(s Status) bool { return s.Ready }); err != nil {
			return nil, fmt.Errorf("not ready: %w", err)
		}
	}
	logf("chaos: %d nodes ready; generating %d KeyPackages", o.Nodes, total)
	bundles, err := NewBundles(ctx, total)
	if err != nil {
		return nil, err
	}
	res := &ChaosResult{Nodes: o.Nodes}

	// live is the set of nodes the publisher may pick; the chaos loop takes
	// a node out before it kills it and puts it back once it answers.
	var mu sync.Mutex
	live := make([]bool, o.Nodes)
	for i := range live {
		live[i] = true
	}
	pick := func() *Node {
		mu.Lock()
		defer mu.Unlock()
		var up []int
		for i, l := range live {
			if l {
				up = append(up, i)
			}
		}
		return c.Nodes[up[randN(len(up))]]
	}
	killed := map[int]bool{}

	start := time.Now()
	pubCtx, stopPub := context.WithTimeout(ctx, o.Duration)
	defer stopPub()
	chaosDone := make(chan error, 1)
	go func() {
		var err error
		defer func() { chaosDone <- err }()
		last := time.Now()
		for {
			// Kill to kill, not restart to kill: the period includes the
			// time the node was down and starting.
			wait := o.KillEvery*3/4 + time.Duration(randN(int(o.KillEvery/2)+1)) - time.Since(last)
			select {
			case <-pubCtx.Done():
				return
			case <-time.After(max(wait, 0)):
			}
			last = time.Now()
			n := c.Nodes[1+randN(o.Nodes-1)]
			mu.Lock()
			live[n.Index-1] = false
			killed[n.Index] = true
			mu.Unlock()
			at := time.Since(start)
			if err = n.Kill(); err != nil {
				return
			}
			select {
			case <-ctx.Done():
				err = ctx.Err()
				return
			case <-time.After(o.DownFor):
			}
			if err = n.Start(ctx); err != nil {
				return
			}
			mu.Lock()
			live[n.Index-1] = true
			res.Kills = append(res.Kills, Kill{Node: n.Index, At: at, Down: time.Since(start) - at})
			mu.Unlock()
			logf("chaos: node %d SIGKILLed at %v, back after %v", n.Index, at.Round(time.Millisecond), (time.Since(start) - at).Round(time.Millisecond))
		}
	}()

	// The paced publisher: one bundle per tick, each POST in its own
	// goroutine (at most 32 in flight), to a random live node.
	var acks []ack
	var failed int
	var wg sync.WaitGroup
	inflight := make(chan struct{}, 32)
	tick := time.NewTicker(time.Second / time.Duration(o.Rate))
	posted := 0
publish:
	for posted < total {
		select {
		case <-pubCtx.Done():
			break publish
		case <-tick.C:
		}
		select {
		case inflight <- struct{}{}:
		case <-pubCtx.Done():
			break publish
		}
		b, n := &bundles[posted], pick()
		posted++
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-inflight }()
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := n.Client.PublishBundle(pctx, b)
			cancel()
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				return
			}
			acks = append(acks, ack{b: b, node: n.Index})
		}()
	}
	tick.Stop()
	wg.Wait()
	stopPub()
	if err := <-chaosDone; err != nil {
		return res, fmt.Errorf("chaos loop: %w", err)
	}
	res.Published = time.Since(start)
	res.Posted, res.Acked, res.Failed = posted, len(acks), failed
	for _, n := range c.Nodes {
		if !killed[n.Index] {
			res.StayedUp = append(res.StayedUp, n.Index)
		}
	}
	logf("chaos: published %d of %d (%d acknowledged) in %v with %d kills; nodes never killed: %v",
		posted, total, len(acks), res.Published.Round(time.Millisecond), len(res.Kills), res.StayedUp)

	ackd := make([]*protocol.Bundle, len(acks))
	byNode := map[int][]*protocol.Bundle{}
	for i, a := range acks {
		ackd[i] = a.b
		byNode[a.node] = append(byNode[a.node], a.b)
	}
	lostOn := func(nodes []int) (int, error) {
		lost := map[protocol.Key]bool{}
		for _, i := range nodes {
			miss, err := missingKeys(ctx, c.Nodes[i-1], ackd)
			if err != nil {
				return 0, err
			}
			for _, k := range miss {
				lost[k] = true
			}
		}
		return len(lost), nil
	}
	if res.LostAtEnd, err = lostOn(res.StayedUp); err != nil {
		return res, err
	}
	// Convergence: every node's count reaches the acknowledged count and
	// every node serves every acknowledged bundle.
	convStart := time.Now()
	cctx, cancel := context.WithTimeout(ctx, o.Converge)
	defer cancel()
	all := make([]int, o.Nodes)
	for i := range all {
		all[i] = i + 1
	}
	for {
		ok := true
		for _, n := range c.Nodes {
			st, err := n.Status(cctx)
			if err != nil || st.Bundles < int64(len(acks)) {
				ok = false
				break
			}
		}
		if ok {
			lost, err := lostOn(all)
			if err != nil {
				return res, err
			}
			if lost == 0 {
				res.ConvergeOK = true
				break
			}
		}
		select {
		case <-cctx.Done():
		case <-time.After(200 * time.Millisecond):
			continue
		}
		break
	}
	res.Converged = time.Since(convStart)
	for i, n := range c.Nodes {
		miss, err := missingKeys(ctx, n, byNode[i+1])
		if err != nil {
			return res, err
		}
		res.LostOnAck += len(miss)
		st, err := n.Status(ctx)
		if err != nil {
			return res, err
		}
		res.Counts = append(res.Counts, st.Bundles)
	}
	if res.LostUp, err = lostOn(res.StayedUp); err != nil {
		return res, err
	}
	if res.LostAll, err = lostOn(all); err != nil {
		return res, err
	}
	return res, nil
}

// missingKeys returns the devices of want whose bundle n does not serve.
func missingKeys(ctx context.Context, n *Node, want []*protocol.Bundle) ([]protocol.Key, error) {
	var out []protocol.Key
	for _, b := range want {
		miss, err := Missing(ctx, n.Client, []*protocol.Bundle{b})
		if err != nil {
			return nil, fmt.Errorf("node %d: %w", n.Index, err)
		}
		if miss > 0 {
			out = append(out, b.DeviceID)
		}
	}
	return out, nil
}

// Print writes the figures of a chaos run.
func (r *ChaosResult) Print(w io.Writer) {
	fmt.Fprintf(w, "SIGKILL chaos, %d real kpnode processes, paced publish for %v\n", r.Nodes, r.Published.Round(time.Second))
	fmt.Fprintf(w, "  posted %d bundles, %d acknowledged (204), %d not acknowledged (node killed mid-request)\n", r.Posted, r.Acked, r.Failed)
	var ks []string
	for _, k := range r.Kills {
		ks = append(ks, fmt.Sprintf("node %d at %v (down %v)", k.Node, k.At.Round(time.Second), k.Down.Round(100*time.Millisecond)))
	}
	fmt.Fprintf(w, "  %d SIGKILLs: %v\n", len(r.Kills), ks)
	fmt.Fprintf(w, "  nodes never killed: %v\n", slices.Clone(r.StayedUp))
	fmt.Fprintf(w, "  acknowledged bundles lost on the nodes that stayed up: %d right after the publish, %d after convergence (target 0)\n", r.LostAtEnd, r.LostUp)
	fmt.Fprintf(w, "  acknowledged bundles lost on the node that acknowledged them: %d (target 0)\n", r.LostOnAck)
	fmt.Fprintf(w, "  acknowledged bundles lost on any node after convergence: %d (target 0)\n", r.LostAll)
	state := "converged"
	if !r.ConvergeOK {
		state = "NOT converged"
	}
	fmt.Fprintf(w, "  %s %v after the publish ended (every node holds every acknowledged bundle); bundle counts per node: %v\n", state, r.Converged.Round(time.Millisecond), r.Counts)
}
