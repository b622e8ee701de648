package node

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// lightNode starts a light node with no bootstrap peer (no holder reachable).
func lightNode(t testing.TB, mutate func(*Config)) (*Node, string) {
	return testNode(t, func(c *Config) {
		c.Light = true
		c.Shards = protocol.NoShards(protocol.DefaultShardCount)
		if mutate != nil {
			mutate(c)
		}
	})
}

// fullNodes starts two full nodes, the second bootstrapping from the first,
// both also dialling extra (e.g. a light node).
func fullNodes(t testing.TB, extra []string) (*Node, *Node) {
	t.Helper()
	a, _ := testNode(t, func(c *Config) { c.Bootstrap = extra })
	aAddrs, err := a.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := testNode(t, func(c *Config) { c.Bootstrap = append(append([]string(nil), aAddrs...), extra...) })
	return a, b
}

// submitAccountTo posts a to every node directly (a node that already got
// it by gossip answers ErrStale), so a test need not wait for gossip or sync
// between nodes that have only just met.
func submitAccountTo(t testing.TB, a *protocol.AccountBundle, nodes ...*Node) {
	t.Helper()
	for _, n := range nodes {
		if err := n.SubmitAccount(context.Background(), a); err != nil && !errors.Is(err, storage.ErrStale) {
			t.Fatal(err)
		}
	}
}

// A lookup that reaches no holder is a 503 with a JSON error, not a 404,
// and is not remembered: the first GET once a holder is reachable finds the
// record. A real miss stays a 404.
func TestUnreachableNetworkIs503NotCachedMiss(t *testing.T) {
	light, base := lightNode(t, nil)
	acct := nodetest.SeedKey(41)
	a := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil))
	url := base + "/v0/account/" + a.AccountPub.String()

	start := time.Now()
	r := do(t, "GET", url, "", "")
	httpapitest.Expect(t, r, 503, `{"error":"registry network unreachable, try again"}`)
	if d := time.Since(start); d > DefaultLookupTimeout+time.Second {
		t.Fatalf("the 503 took %v", d)
	}
	if _, err := light.Account(context.Background(), a.AccountPub); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Account: %v, want ErrUnavailable", err)
	}

	// The network comes back: two holders dial the light node.
	addrs, err := light.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	h1, h2 := fullNodes(t, addrs)
	submitAccountTo(t, &a, h1, h2)
	nodetest.WaitFor(t, "holders ready", 30*time.Second, func() bool {
		return h1.Provided() && h2.Provided() && light.DHTPeers() > 0
	})
	r = do(t, "GET", url, "", "")
	if r.Code != 200 {
		t.Fatalf("first GET after the network came back: %d %s (an outage must not be negatively cached)", r.Code, r.Body)
	}
	// A key the holders answer NOT_FOUND for is a real miss: 404, remembered.
	var unknown protocol.Key
	unknown[0] = 7
	httpapitest.Expect(t, do(t, "GET", base+"/v0/account/"+unknown.String(), "", ""), 404, `{"error":"no account bundle for account_pub"}`)
	if _, err := light.Account(context.Background(), unknown); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("Account of an unknown key: %v, want ErrNotFound", err)
	}
}
