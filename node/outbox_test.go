package node

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
)

func pendingPublications(t testing.TB, base string) int {
	t.Helper()
	r := do(t, "GET", base+"/v1/status", "", "")
	var st Status
	if err := json.Unmarshal([]byte(r.Body), &st); err != nil {
		t.Fatal(err)
	}
	return st.PendingPublications
}

func outboxGauge(t testing.TB, n *Node) string {
	t.Helper()
	rec := httptest.NewRecorder()
	n.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if strings.HasPrefix(line, "kpnode_outbox_pending ") {
			return strings.TrimPrefix(line, "kpnode_outbox_pending ")
		}
	}
	return ""
}

// A light node that reaches no holder acknowledges a POST, is restarted,
// and once a holder comes up the bundle and the account bundle reach it:
// an acknowledged publication survives an outage and a restart.
func TestOutboxDeliversAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := func(c *Config) { c.DataDir = dir }
	light, base := lightNode(t, cfg)
	dev, acct := nodetest.SeedKey(51), nodetest.SeedKey(52)
	b := protocol.SignBundle(dev, nowMS(), []byte("an opaque keypackage"))
	a := protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, []protocol.Key{b.DeviceID}))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)), 204, "")
	httpapitest.Expect(t, postJSON(t, base+"/v0/account", httpapitest.AccountJSON(a)), 204, "")
	// Posting the same bundle again queues it once.
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(b)), 204, "")
	if got := pendingPublications(t, base); got != 2 {
		t.Fatalf("pending_publications %d, want 2", got)
	}
	if got := outboxGauge(t, light); got != "2" {
		t.Fatalf("kpnode_outbox_pending %q, want 2", got)
	}
	if err := light.Close(); err != nil {
		t.Fatal(err)
	}

	light, base = lightNode(t, cfg)
	if got := pendingPublications(t, base); got != 2 {
		t.Fatalf("after restart: pending_publications %d, want 2", got)
	}
	addrs, err := light.P2PAddrs()
	if err != nil {
		t.Fatal(err)
	}
	h1, h2 := fullNodes(t, addrs)
	ctx := context.Background()
	// The outbox lets go once a holder serves a record back; sync (not
	// under test here) spreads it to the other holders.
	held := func(h *Node) (bundle, account bool) {
		got, err := h.store.LatestBundle(ctx, b.DeviceID)
		_, aerr := h.store.Account(ctx, a.AccountPub)
		return err == nil && bytes.Equal(got.Payload, b.Payload), aerr == nil
	}
	nodetest.WaitFor(t, "the publications to reach a holder and leave the outbox", 30*time.Second, func() bool {
		b1, a1 := held(h1)
		b2, a2 := held(h2)
		return (b1 || b2) && (a1 || a2) && light.outbox.Len() == 0
	})
	if got := pendingPublications(t, base); got != 0 {
		t.Fatalf("pending_publications %d after delivery", got)
	}
}

// A full outbox refuses a POST with 503 rather than acknowledging a
// publication it could lose; a shard the node holds needs no outbox.
func TestOutboxFullIs503(t *testing.T) {
	_, base := testNode(t, func(c *Config) {
		c.Shards, _ = protocol.ParseShardSet("0", protocol.DefaultShardCount)
		c.OutboxMax = 1
	})
	var foreign []protocol.Bundle
	var held *protocol.Bundle
	for i := byte(60); len(foreign) < 2 || held == nil; i++ {
		b := protocol.SignBundle(nodetest.SeedKey(i), nowMS(), []byte("an opaque keypackage"))
		if protocol.Shard(b.DeviceID, protocol.DefaultShardCount) == 0 {
			if held == nil {
				held = &b
			}
		} else if len(foreign) < 2 {
			foreign = append(foreign, b)
		}
	}
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(foreign[0])), 204, "")
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(foreign[1])), 503,
		`{"error":"too many publications waiting for the registry network, try again"}`)
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(*held)), 204, "")
	if got := pendingPublications(t, base); got != 1 {
		t.Fatalf("pending_publications %d, want 1", got)
	}
}
