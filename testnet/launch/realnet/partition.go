package realnet

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/big"
	"slices"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
)

// PartitionOptions configure a partition/heal run.
type PartitionOptions struct {
	Bin, Dir string
	Network  string
	// Half is the number of nodes on each side (3 for the 6 nodes).
	Half int
	// Bundles is how many bundles each side publishes.
	Bundles int
	// Accounts is how many accounts both sides update; Updates is the most
	// account bundles one side publishes per account.
	Accounts, Updates int
	// Converge bounds the wait after the heal.
	Converge time.Duration
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// PartitionResult are the figures of a run.
type PartitionResult struct {
	Nodes                 int
	BundlesA, BundlesB    int // acknowledged on each side
	AccountPosts          int // acknowledged account bundles, both sides
	WinnersFromA          int // accounts whose winner was published on side A
	HealRestart           time.Duration
	Converged             time.Duration // from the healed node's restart to every node equal
	Counts                []Status      // every node's status after convergence
	MissingBundles        []int         // acknowledged bundles not served, per node
	WrongAccounts         []int         // accounts whose served version is not the winner, per node
	PeersAcrossBeforeHeal int           // connections between the halves before the heal (must be 0)
}

// Partition starts two halves of opts.Half nodes that bootstrap only within
// their half, publishes bundles and account bundles on both sides (the same
// accounts, with lamports that make either side win, and equal lamports
// that the payload hash must decide), then heals the split by restarting
// the last node of half B (SIGTERM, same data dir and ports) with half A's
// first node added to its --bootstrap list. It waits until every node holds
// every acknowledged bundle and serves the winning version of every
// account, and returns the figures.
func Partition(ctx context.Context, o PartitionOptions) (*PartitionResult, error) {
	if o.Half < 2 || o.Bundles < 1 || o.Accounts < 1 || o.Updates < 1 {
		return nil, errors.New("partition: half ≥ 2, bundles, accounts and updates ≥ 1")
	}
	logf := func(format string, args ...any) {
		if o.Log != nil {
			fmt.Fprintf(o.Log, format+"\n", args...)
		}
	}
	c := NewCluster(o.Bin, o.Dir, o.Network)
	defer c.Close()
	var sides [2][]*Node
	for s := range sides {
		for i := 0; i < o.Half; i++ {
			var boot []string
			if i > 0 {
				boot = []string{sides[s][0].Addr}
			}
			n, err := c.Add(ctx, boot)
			if err != nil {
				return nil, err
			}
			sides[s] = append(sides[s], n)
		}
	}
	for _, n := range c.Nodes {
		if _, err := n.WaitStatus(ctx, 60*time.Second, func(s Status) bool { return s.Ready }); err != nil {
			return nil, fmt.Errorf("not ready: %w", err)
		}
	}
	logf("partition: %d nodes up, halves A = nodes 1-%d, B = nodes %d-%d", len(c.Nodes), o.Half, o.Half+1, 2*o.Half)
	res := &PartitionResult{Nodes: len(c.Nodes)}

	// Records of each side. Account j gets up to Updates versions per side;
	// every third account ends with both sides at the same lamport, so the
	// payload hash decides.
	var acked [2][]*protocol.Bundle
	winners := make([]*protocol.AccountBundle, o.Accounts)
	winnerSide := make([]int, o.Accounts)
	accountKeys := make([]ed25519.PrivateKey, o.Accounts)
	for j := range accountKeys {
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		accountKeys[j] = k
	}
	for s := range sides {
		bundles, err := NewBundles(ctx, o.Bundles)
		if err != nil {
			return nil, err
		}
		for i := range bundles {
			n := sides[s][randN(len(sides[s]))]
			if err := n.Client.PublishBundle(ctx, &bundles[i]); err != nil {
				return nil, fmt.Errorf("publish bundle on node %d: %w", n.Index, err)
			}
			acked[s] = append(acked[s], &bundles[i])
		}
		for j, k := range accountKeys {
			top := 1 + (j+s)%o.Updates
			if j%3 == 0 {
				top = o.Updates
			}
			for l := 1; l <= top; l++ {
				// Each side names its own devices, so equal lamports still
				// differ in payload.
				devs := []protocol.Key{bundles[(j+l)%len(bundles)].DeviceID}
				a := protocol.SignAccount(k, protocol.EncodeAccountPayload(uint64(l), devs))
				n := sides[s][randN(len(sides[s]))]
				if err := n.Client.PublishAccount(ctx, &a); err != nil {
					return nil, fmt.Errorf("publish account on node %d: %w", n.Index, err)
				}
				res.AccountPosts++
				if winners[j] == nil || Wins(&a, winners[j]) {
					winners[j], winnerSide[j] = &a, s
				}
			}
		}
	}
	res.BundlesA, res.BundlesB = len(acked[0]), len(acked[1])
	for _, s := range winnerSide {
		if s == 0 {
			res.WinnersFromA++
		}
	}
	// Each half settles on its own records first.
	for s := range sides {
		for _, n := range sides[s] {
			if _, err := n.WaitStatus(ctx, o.Converge, func(st Status) bool {
				return st.Bundles == int64(o.Bundles) && st.Accounts == int64(o.Accounts)
			}); err != nil {
				return nil, fmt.Errorf("half %c did not settle: %w", 'A'+s, err)
			}
		}
	}
	// The halves must not know each other.
	ids := map[string]int{}
	for s := range sides {
		for _, n := range sides[s] {
			ids[n.PeerID] = s
		}
	}
	for s := range sides {
		for _, n := range sides[s] {
			st, err := n.Status(ctx)
			if err != nil {
				return nil, err
			}
			for _, p := range st.Peers {
				if side, ok := ids[p]; ok && side != s {
					res.PeersAcrossBeforeHeal++
				}
			}
		}
	}
	logf("partition: each half holds its own %d bundles and %d accounts; %d connections across", o.Bundles, o.Accounts, res.PeersAcrossBeforeHeal)

	// Heal: the last node of B restarts knowing A's first node as well.
	healed := sides[1][len(sides[1])-1]
	if err := healed.Stop(); err != nil {
		return nil, err
	}
	healed.Bootstrap = append(slices.Clone(healed.Bootstrap), sides[0][0].Addr)
	start := time.Now()
	if err := healed.Start(ctx); err != nil {
		return nil, err
	}
	res.HealRestart = time.Since(start)
	logf("partition: node %d restarted with --bootstrap of node 1 (API up after %v); waiting for convergence", healed.Index, res.HealRestart.Round(time.Millisecond))

	total := int64(2 * o.Bundles)
	all := append(slices.Clone(acked[0]), acked[1]...)
	deadline, cancel := context.WithTimeout(ctx, o.Converge)
	defer cancel()
	for _, n := range c.Nodes {
		if _, err := n.WaitStatus(deadline, o.Converge, func(st Status) bool {
			return st.Bundles >= total && st.Accounts == int64(o.Accounts)
		}); err != nil {
			return res, fmt.Errorf("no convergence within %v: %w", o.Converge, err)
		}
	}
	// Counts agree; now every account's served version must be the winner.
	for {
		wrong := 0
		for _, n := range c.Nodes {
			w, err := wrongAccounts(deadline, n.Client, winners)
			if err != nil {
				return res, err
			}
			wrong += w
		}
		if wrong == 0 {
			break
		}
		select {
		case <-deadline.Done():
			return res, fmt.Errorf("no convergence within %v: %d (node, account) pairs still serve a losing version", o.Converge, wrong)
		case <-time.After(100 * time.Millisecond):
		}
	}
	res.Converged = time.Since(start)
	for _, n := range c.Nodes {
		st, err := n.Status(ctx)
		if err != nil {
			return res, err
		}
		res.Counts = append(res.Counts, st)
		miss, err := Missing(ctx, n.Client, all)
		if err != nil {
			return res, err
		}
		res.MissingBundles = append(res.MissingBundles, miss)
		wrong, err := wrongAccounts(ctx, n.Client, winners)
		if err != nil {
			return res, err
		}
		res.WrongAccounts = append(res.WrongAccounts, wrong)
	}
	return res, nil
}

// wrongAccounts counts the accounts for which client does not serve want's
// payload.
func wrongAccounts(ctx context.Context, client *httpapi.Client, want []*protocol.AccountBundle) (int, error) {
	wrong := 0
	for _, a := range want {
		got, err := client.FetchAccount(ctx, a.AccountPub)
		var se *httpapi.StatusError
		switch {
		case err == nil && bytes.Equal(got.Payload, a.Payload):
		case err == nil, errors.As(err, &se) && se.Code == 404:
			wrong++
		default:
			return wrong, err
		}
	}
	return wrong, nil
}

func randN(n int) int {
	v, err := rand.Int(rand.Reader, big.NewInt(int64(n)))
	if err != nil {
		panic(err)
	}
	return int(v.Int64())
}

// Print writes the figures of a partition run.
func (r *PartitionResult) Print(w io.Writer) {
	fmt.Fprintf(w, "partition/heal, %d real kpnode processes (two halves of %d)\n", r.Nodes, r.Nodes/2)
	fmt.Fprintf(w, "  published: %d bundles on A, %d on B, %d account bundles (%d accounts won by A's version); %d connections across before the heal\n",
		r.BundlesA, r.BundlesB, r.AccountPosts, r.WinnersFromA, r.PeersAcrossBeforeHeal)
	fmt.Fprintf(w, "  heal: node %d restarted (API up in %v); every node equal %v after the restart\n", r.Nodes, r.HealRestart.Round(time.Millisecond), r.Converged.Round(time.Millisecond))
	fmt.Fprintf(w, "  %-5s %-8s %-8s %-16s %-14s\n", "node", "bundles", "accounts", "missing acked", "wrong account")
	for i, st := range r.Counts {
		fmt.Fprintf(w, "  %-5d %-8d %-8d %-16d %-14d\n", i+1, st.Bundles, st.Accounts, r.MissingBundles[i], r.WrongAccounts[i])
	}
}
