package node

import (
	"testing"
	"time"

	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/kpnode/kpnode/protocol"
)

// A peer's protocols reveal its network constants: the watcher finds a
// kpnode fetch or sync protocol of this network name with another tag,
// and spells both tags out.
func TestMismatchedTagFromProtocols(t *testing.T) {
	ours := protocol.DefaultConstants()
	off := ours
	off.MLS = protocol.MLSOff
	short := ours
	short.MaxKeyPackageLifetime = 30 * 24 * time.Hour
	id := func(c protocol.Constants, network string) []p2pprotocol.ID {
		n := c.NetworkID(network)
		return []p2pprotocol.ID{"/ipfs/id/1.0.0", "/meshsub/1.1.0", p2pprotocol.ID(protocol.DHTPrefix(n) + "/kad/1.0.0"),
			p2pprotocol.ID(protocol.FetchProtocol(n)), p2pprotocol.ID(protocol.SyncProtocol(n))}
	}
	for _, tc := range []struct {
		name   string
		protos []p2pprotocol.ID
		want   string
	}{
		{"same constants", id(ours, "net"), ""},
		{"mls off", id(off, "net"), off.Tag()},
		{"shorter lifetime cap", id(short, "net"), short.Tag()},
		{"other network name", id(off, "other"), ""},
		{"not kpnode", []p2pprotocol.ID{"/ipfs/id/1.0.0", "/kpnode/net"}, ""},
		{"garbage", []p2pprotocol.ID{"/kpnode//x/fetch/1.0.0", "/kpnode/net/fetch/1.0.0"}, ""},
	} {
		got, ok := mismatchedTag("net", ours.Tag(), tc.protos)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("%s: %q %v, want %q", tc.name, got, ok, tc.want)
		}
	}
	if got, want := describeTag(off.Tag()), "shards=8 mls=off max_kp_lifetime=2160h0m0s (s8-off-l7776000)"; got != want {
		t.Errorf("describeTag: %q, want %q", got, want)
	}
	if got := describeTag("weird"); got != "weird" {
		t.Errorf("describeTag of an unknown tag: %q", got)
	}
}
