package node

import (
	"net/http"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
)

// nodeFrame matches a stack frame in any of the node package's files: Close
// joins every goroutine they start (node lifetime, sync loops and sessions,
// fetch handlers, gossip drains and watchers, the DHT's provide loop).
var nodeFrame = regexp.MustCompile(`/node/((fetch|lookup|discovery|sync)/[a-z_]+|node|network|registry|lookup|outbox|peerguard|metrics|host|sync|fetch|constants|gossip/[a-z_]+)\.go:`)

// goroutines returns the stacks of every goroutine but the caller's.
func goroutines() []string {
	return strings.Split(nodetest.Stacks(), "\n\n")[1:] // the first is this goroutine
}

// trafficRound starts two full nodes and a light node, publishes through
// the light node's outbox, looks records up over the network (a hit, a
// miss, a background refresh), and closes every node. It returns the
// stacks of goroutines still running code of the node package right after
// the last Close.
func trafficRound(t *testing.T) []string {
	t.Helper()
	var skew atomic.Int64 // added to the light node's clock
	light, base := lightNode(t, func(c *Config) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	})
	addrs, err := light.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	h1, h2 := fullNodes(t, addrs)
	b := protocol.SignBundle(nodetest.SeedKey(71), nowMS(), []byte("an opaque keypackage"))
	a := protocol.SignAccount(nodetest.SeedKey(72), protocol.EncodeAccountPayload(1, nil))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)), 204, "")
	submitAccountTo(t, &a, h1, h2)
	nodetest.WaitFor(t, "the outbox to deliver", 30*time.Second, func() bool {
		return light.outbox.Len() == 0 && h1.Provided() && h2.Provided() && light.DHTPeers() > 0
	})
	httpapitest.Expect(t, do(t, "GET", base+"/v0/account/"+a.AccountPub.String(), "", ""), 200, "*")
	var unknown protocol.Key
	unknown[0] = 3
	httpapitest.Expect(t, do(t, "GET", base+"/v0/account/"+unknown.String(), "", ""), 404, "*")
	// A hit on an old entry refreshes it in the background; Close must wait
	// for that refresh too.
	skew.Store(int64(2 * DefaultCacheRefresh))
	httpapitest.Expect(t, do(t, "GET", base+"/v0/account/"+a.AccountPub.String(), "", ""), 200, "*")
	for _, n := range []*Node{light, h1, h2} {
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
	}
	var left []string
	for _, s := range goroutines() {
		if nodeFrame.MatchString(s) {
			left = append(left, s)
		}
	}
	return left
}

// Close joins every goroutine the node started: right after it returns
// none runs the node's code, and once libp2p has wound down the goroutine
// count is back where it was before the nodes started.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	// A first round starts what lives for the whole process (libp2p's and
	// the runtime's own workers), so that the baseline includes it.
	trafficRound(t)
	http.DefaultClient.CloseIdleConnections()
	settle := func(limit int) (int, bool) {
		deadline := time.Now().Add(15 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= limit || time.Now().After(deadline) {
				return n, n <= limit
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// The baseline: the count once it has not changed for a second.
	baseline, since := runtime.NumGoroutine(), time.Now()
	for deadline := time.Now().Add(15 * time.Second); time.Since(since) < time.Second && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		if n := runtime.NumGoroutine(); n != baseline {
			baseline, since = n, time.Now()
		}
	}

	if left := trafficRound(t); len(left) > 0 {
		t.Fatalf("%d goroutines run node code after Close:\n\n%s", len(left), strings.Join(left, "\n\n"))
	}
	http.DefaultClient.CloseIdleConnections()
	if n, ok := settle(baseline); !ok {
		t.Fatalf("%d goroutines 15 s after Close, %d before the nodes started:\n\n%s", n, baseline, strings.Join(goroutines(), "\n\n"))
	}
}
