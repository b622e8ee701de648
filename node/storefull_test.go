package node

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/kpnode/kpnode/protocol"
)

// A write that the store budget has no room for is a 507 with a JSON
// error, changes nothing, and reads keep being served.
func TestStoreFullIs507AndReadsGoOn(t *testing.T) {
	_, base := testNode(t, func(c *Config) { c.MaxStoreBytes = 3000 })
	now := nowMS()
	held := protocol.SignBundle(seedKey(1), now, bytes.Repeat([]byte{'a'}, 2000))
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(held)), 204, "")
	// Older than everything held: nothing may be evicted for it.
	older := protocol.SignBundle(seedKey(2), now-60_000, bytes.Repeat([]byte{'b'}, 2000))
	expect(t, postJSON(t, base+"/v0/keypackage", bundleJSON(older)), 507, `{"error":"registry store is full, try again later"}`)
	expect(t, do(t, "GET", base+"/v0/keypackage/"+older.DeviceID.String(), "", ""), 404, `{"error":"no keypackage for device"}`)
	want := fmt.Sprintf(`{"payload":"%s","signature":"%s"}`, b64.EncodeToString(held.Payload), b64.EncodeToString(held.Signature[:]))
	expect(t, do(t, "GET", base+"/v0/keypackage/"+held.DeviceID.String(), "", ""), 200, want)
}
