package node

import (
	"strings"
	"testing"

	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/kpnode/kpnode/protocol"
)

// FuzzMismatchedTag: protocol IDs a peer advertises in identify are
// hostile input; reading a constants tag from them never panics, and a
// mismatch is only ever reported for another tag of this network name.
func FuzzMismatchedTag(f *testing.F) {
	ours := protocol.DefaultConstants().Tag()
	f.Add("/kpnode/net/s8-off-l7776000/fetch/1.0.0")
	f.Add("/kpnode/net/" + ours + "/sync/1.0.0")
	f.Add("/kpnode//x/fetch/")
	f.Fuzz(func(t *testing.T, id string) {
		tag, ok := mismatchedTag("net", ours, []p2pprotocol.ID{p2pprotocol.ID(id)})
		if ok && (tag == "" || tag == ours || !strings.HasPrefix(id, "/kpnode/net/"+tag+"/")) {
			t.Fatalf("%q: mismatch with tag %q", id, tag)
		}
		_ = describeTag(tag)
		_ = describeTag(id)
	})
}
