package node

import (
	"context"
	"crypto/ed25519"
	"math"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
)

// A light node's outbox consume entry is not confirmed by the one holder
// it reaches that never had the named bundles (its KIND_ALL lists none of
// the refs, proving nothing of the notice): it stays and is published
// again; a second distinct holder listing none of them confirms it.
func TestOutboxConsumeNotConfirmedByOneHolderWithoutTheBundles(t *testing.T) {
	light, _ := lightNode(t, nil)
	devKey := nodetest.SeedKey(73)
	dev := protocol.Key(devKey.Public().(ed25519.PublicKey))
	used := protocol.SignBundle(devKey, nowMS(), []byte("a keypackage no holder had"))
	ref := refOf(t, light, used)
	notice := protocol.SignConsume(devKey, nowMS(), []protocol.Ref{ref})
	ctx := context.Background()
	if err := light.SubmitConsume(ctx, &notice); err != nil {
		t.Fatal(err)
	}
	addrs, err := light.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	h1, _ := testNode(t, func(c *Config) { c.Bootstrap = addrs })
	attempts := func() (uint32, bool) {
		es, _, err := light.outbox.Due(ctx, math.MaxInt64, 10, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(es) == 0 {
			return 0, false
		}
		return es[0].Attempts, true
	}
	nodetest.WaitFor(t, "a check of the entry at the holder", 60*time.Second, func() bool {
		a, ok := attempts()
		return !ok || a >= 2
	})
	if _, ok := attempts(); !ok {
		t.Fatalf("one holder that never had the bundles confirmed the consume entry (confirmed %v)",
			nodetest.Counter(t, light.registry, "kpnode_outbox_done_total", "result", "confirmed"))
	}
	if !consumedOn(t, h1, dev, ref) {
		t.Error("the holder did not get the notice from the outbox's publication")
	}
	h1Addrs, err := h1.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	testNode(t, func(c *Config) { c.Bootstrap = append(append([]string(nil), addrs...), h1Addrs...) })
	nodetest.WaitFor(t, "two holders to confirm the entry", 60*time.Second, func() bool { return light.outbox.Len() == 0 })
	if got := nodetest.Counter(t, light.registry, "kpnode_outbox_done_total", "result", "confirmed"); got != 1 {
		t.Errorf("kpnode_outbox_done_total{result=confirmed} = %v, want 1", got)
	}
}
