package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kpnode/kpnode/testnet/launch/realnet"
)

// kpnodeBinary builds ./cmd/kpnode once per test into a temp dir.
func kpnodeBinary(t *testing.T, ctx context.Context) string {
	t.Helper()
	bin, err := realnet.Build(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// Six real kpnode processes in two halves of three that never meet publish
// bundles and competing account versions apart; after one node of B
// restarts with A's bootstrap address, every node holds every acknowledged
// bundle and serves the winning version (greater lamport, then smaller
// payload hash) of every account.
func TestPartitionHeals(t *testing.T) {
	if testing.Short() {
		t.Skip("builds kpnode and runs six processes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	bin := kpnodeBinary(t, ctx)
	var log strings.Builder
	res, err := realnet.Partition(ctx, realnet.PartitionOptions{Bin: bin, Dir: t.TempDir(), Network: "partition-test",
		// Usually converged within 2 s of the heal (sync on every new
		// connection); a shard session skipped because another was running
		// waits for the periodic sync (30 s + up to 6 s jitter), rarely twice.
		Half: 3, Bundles: 12, Accounts: 6, Updates: 3, Converge: 100 * time.Second, Log: &log})
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	res.Print(&log)
	t.Log(log.String())
	if res.PeersAcrossBeforeHeal != 0 {
		t.Fatalf("%d connections between the halves before the heal", res.PeersAcrossBeforeHeal)
	}
	if res.WinnersFromA == 0 || res.WinnersFromA == 6 {
		t.Fatalf("the run should make both sides win some accounts; A won %d of 6", res.WinnersFromA)
	}
	for i, st := range res.Counts {
		if st.Bundles != 24 || st.Accounts != 6 || res.MissingBundles[i] != 0 || res.WrongAccounts[i] != 0 {
			t.Fatalf("node %d after the heal: %d bundles, %d accounts, %d acknowledged missing, %d accounts not at the winner",
				i+1, st.Bundles, st.Accounts, res.MissingBundles[i], res.WrongAccounts[i])
		}
	}
}

// A paced publish to random live nodes of five real processes while one
// non-bootstrap node after another is SIGKILLed and restarted: no
// acknowledged bundle is lost, on the nodes that stayed up, on the node
// that acknowledged it, or anywhere after convergence.
func TestChaosLosesNoAcknowledgedBundle(t *testing.T) {
	if testing.Short() {
		t.Skip("builds kpnode and runs five processes for 20 s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	bin := kpnodeBinary(t, ctx)
	var log strings.Builder
	res, err := realnet.Chaos(ctx, realnet.ChaosOptions{Bin: bin, Dir: t.TempDir(), Network: "chaos-test", Nodes: 5,
		Duration: 20 * time.Second, Rate: 10, KillEvery: 5 * time.Second, DownFor: time.Second, Converge: 100 * time.Second, Log: &log})
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	res.Print(&log)
	t.Log(log.String())
	if len(res.Kills) < 2 || res.Acked < 100 {
		t.Fatalf("too little chaos to show anything: %d kills, %d acknowledged", len(res.Kills), res.Acked)
	}
	if res.LostUp != 0 || res.LostOnAck != 0 || res.LostAll != 0 || !res.ConvergeOK {
		t.Fatalf("acknowledged bundles lost: %d on nodes that stayed up, %d on the acknowledging node, %d anywhere (converged: %v)",
			res.LostUp, res.LostOnAck, res.LostAll, res.ConvergeOK)
	}
}
