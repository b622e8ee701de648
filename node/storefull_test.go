package node

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
)

// A write that the store budget has no room for is a 507 with a JSON
// error, changes nothing, and reads keep being served.
func TestStoreFullIs507AndReadsGoOn(t *testing.T) {
	_, base := testNode(t, func(c *Config) { c.MaxStoreBytes = 3000 })
	now := nowMS()
	held := protocol.SignBundle(nodetest.SeedKey(1), now, bytes.Repeat([]byte{'a'}, 2000))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(held)), 204, "")
	// Older than everything held: nothing may be evicted for it.
	older := protocol.SignBundle(nodetest.SeedKey(2), now-60_000, bytes.Repeat([]byte{'b'}, 2000))
	httpapitest.Expect(t, postJSON(t, base+"/v0/keypackage", httpapitest.BundleJSON(older)), 507, `{"error":"registry store is full, try again later"}`)
	httpapitest.Expect(t, do(t, "GET", base+"/v0/keypackage/"+older.DeviceID.String(), "", ""), 404, `{"error":"no keypackage for device"}`)
	want := fmt.Sprintf(`{"payload":"%s","signature":"%s"}`, b64.EncodeToString(held.Payload), b64.EncodeToString(held.Signature[:]))
	httpapitest.Expect(t, do(t, "GET", base+"/v0/keypackage/"+held.DeviceID.String(), "", ""), 200, want)
}

// A data dir is bound to the network ID it was written under: restarting
// it with other network constants is refused with a message saying what to
// do, and the same settings start again.
func TestDataDirKeepsItsNetwork(t *testing.T) {
	dir := t.TempDir()
	n, _ := testNode(t, func(c *Config) { c.DataDir = dir })
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.DataDir = dir
	cfg.Policy.MLS = protocol.MLSStrict // testNode runs with MLS off
	_, err := New(cfg)
	if !errors.Is(err, ErrDataDirNetwork) || !strings.Contains(err.Error(), "--mls-validation") {
		t.Fatalf("restart with another MLS mode: %v", err)
	}
	again, _ := testNode(t, func(c *Config) { c.DataDir = dir })
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
}
