package testnet

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// syncBytes reads kpnode_sync_bytes_total (in + out) from a node's metrics.
func syncBytes(t *testing.T, n *node.Node) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	n.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	total := 0.0
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "kpnode_sync_bytes_total{") {
			v, _ := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			total += v
		}
	}
	return total
}

// A node that was offline while bundles and account bundles were published
// catches up by sync when it comes back, without anyone re-publishing.
func TestOfflineNodeCatchesUp(t *testing.T) {
	c := startCluster(t, 3, func(_ int, cfg *node.Config) { cfg.Policy.MLS = protocol.MLSOff })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Some history everyone has.
	for i := 0; i < 50; i++ {
		b := opaqueBundle(t)
		if err := c.Nodes[0].SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range c.Nodes {
		if err := eventually(ctx, func() bool { return n.Status(ctx).Bundles == 50 }); err != nil {
			t.Fatal("history did not spread")
		}
	}
	cfg := Config(c.opts, 2)
	cfg.Policy.MLS = protocol.MLSOff
	cfg.Bootstrap = c.Bootstrap()
	if err := c.Nodes[2].Close(); err != nil {
		t.Fatal(err)
	}
	c.Nodes = c.Nodes[:2]

	const missed = 300
	var accounts []protocol.AccountBundle
	for i := 0; i < missed; i++ {
		b := opaqueBundle(t)
		if err := c.Nodes[i%2].SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
		if i%10 == 0 {
			_, acct, _ := ed25519.GenerateKey(rand.Reader)
			a := protocol.SignAccount(acct, protocol.EncodeAccountPayload(uint64(i), []protocol.Key{b.DeviceID}))
			if err := c.Nodes[0].SubmitAccount(ctx, &a); err != nil {
				t.Fatal(err)
			}
			accounts = append(accounts, a)
		}
	}
	n, err := c.startNode(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	want := int64(50 + missed)
	if err := eventually(ctx, func() bool {
		st := n.Status(ctx)
		return st.Bundles == want && st.Accounts == int64(len(accounts))
	}); err != nil {
		st := n.Status(ctx)
		t.Fatalf("restarted node holds %d/%d bundles and %d/%d accounts", st.Bundles, want, st.Accounts, len(accounts))
	}
	for _, a := range accounts {
		if _, err := n.Account(ctx, a.AccountPub); err != nil {
			t.Fatalf("account %s missing after catch-up: %v", a.AccountPub, err)
		}
	}
	t.Logf("caught up on %d bundles and %d accounts in %v, %.0f sync bytes", missed, len(accounts), time.Since(start).Round(time.Millisecond), syncBytes(t, n))
}

// Sync's cost follows the difference, not the size: two nodes that agree on
// 2,000 bundles but one reconcile a single missing bundle with a few KB.
func TestSyncBytesFollowTheDifference(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		nw := startSim(t, simnet.Options{Full: 2, ShardCount: protocol.DefaultShardCount, MLS: protocol.MLSOff,
			NodeConfig: func(_ int, cfg *node.Config) {
				cfg.Shards, _ = protocol.ParseShardSet("0", protocol.DefaultShardCount)
				cfg.SyncInterval = time.Hour // only the sessions this test starts
			}})
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		a, b := nw.Nodes[0].Node, nw.Nodes[1].Node
		for i := 0; i < 2000; i++ {
			bd := opaqueBundleIn(t, 0)
			if err := a.SubmitBundle(ctx, &bd); err != nil {
				t.Fatal(err)
			}
		}
		if err := eventually(ctx, func() bool { return b.Status(ctx).Bundles == 2000 }); err != nil {
			t.Fatalf("gossip delivered %d of 2000", b.Status(ctx).Bundles)
		}
		// One bundle only a has: stored directly, not gossiped.
		extra := opaqueBundleIn(t, 0)
		if _, err := a.Ingest(ctx, &extra); err != nil {
			t.Fatal(err)
		}
		before := syncBytes(t, b)
		pulled, err := b.SyncNow(ctx, a.PeerID(), 0)
		if err != nil || pulled != 1 {
			t.Fatalf("sync pulled %d, err %v; want 1", pulled, err)
		}
		moved := syncBytes(t, b) - before
		full := float64(2001 * (len(extra.Payload) + 96))
		t.Logf("reconciling 1 of 2,001 bundles moved %.0f bytes (the whole set is %.0f)", moved, full)
		if moved > full/20 {
			t.Fatalf("sync moved %.0f bytes for one missing bundle of a %.0f-byte set", moved, full)
		}
		// Agreeing nodes exchange almost nothing.
		before = syncBytes(t, b)
		if pulled, err := b.SyncNow(ctx, a.PeerID(), 0); err != nil || pulled != 0 {
			t.Fatalf("second sync pulled %d, err %v", pulled, err)
		}
		if moved := syncBytes(t, b) - before; moved > 1000 {
			t.Fatalf("in-sync nodes moved %.0f bytes", moved)
		}
	})
}

func opaqueBundle(t *testing.T) protocol.Bundle {
	t.Helper()
	_, dev, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kp := make([]byte, 600)
	rand.Read(kp)
	return protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
}

func opaqueBundleIn(t *testing.T, shard int) protocol.Bundle {
	t.Helper()
	return opaqueBundleOf(deviceInShard(t, shard, protocol.DefaultShardCount))
}

// opaqueBundleOf is a bundle of dev with a random 600-byte opaque
// KeyPackage, signed now.
func opaqueBundleOf(dev ed25519.PrivateKey) protocol.Bundle {
	kp := make([]byte, 600)
	rand.Read(kp)
	return protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
}

// One device's bundles share its whole key, so no prefix separates them: a
// device with more bundles than a listing threshold still reconciles.
func TestSyncDeviceWithManyBundles(t *testing.T) {
	synctest.Test(t, func(t *testing.T) { syncDeviceWithManyBundles(t) })
}

func syncDeviceWithManyBundles(t *testing.T) {
	nw := startSim(t, simnet.Options{Full: 2, ShardCount: protocol.DefaultShardCount, MLS: protocol.MLSOff,
		NodeConfig: func(_ int, cfg *node.Config) {
			cfg.Shards = protocol.AllShards(protocol.DefaultShardCount)
			cfg.SyncInterval = time.Hour
		}})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, b := nw.Nodes[0].Node, nw.Nodes[1].Node
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	now := uint64(time.Now().UnixMilli())
	for i := 0; i < 80; i++ {
		kp := make([]byte, 300)
		rand.Read(kp)
		bd := protocol.SignBundle(dev, now-uint64(i), kp)
		if _, err := a.Ingest(ctx, &bd); err != nil { // stored, not gossiped
			t.Fatal(err)
		}
	}
	var key protocol.Key
	copy(key[:], dev.Public().(ed25519.PublicKey))
	pulled, err := b.SyncNow(ctx, a.PeerID(), protocol.Shard(key, protocol.DefaultShardCount))
	if err != nil || pulled != 80 {
		t.Fatalf("pulled %d of 80 bundles of one device: %v", pulled, err)
	}
	if got, _ := b.Bundles(ctx, key); len(got) != 80 {
		t.Fatalf("b holds %d", len(got))
	}
}
