package sync

import (
	"testing"
	"time"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// A holder that consumed a bundle pulls the bundle set from a peer that
// still has it (offline during the consume, or over its consume budget):
// ingest answers storage.ErrConsumed for it, and the initiator remembers
// it as refused and goes on (it pulls the other bundle), instead of ending
// every bundle-set session on it.
func TestConsumedBundleRefusedSessionContinues(t *testing.T) {
	a, b := newSide(t, 5*time.Second), newSide(t, 5*time.Second)
	dev := keyIn(0)
	now := uint64(time.Now().UnixMilli())
	used := protocol.SignBundle(dev, now-1000, []byte("used"))
	other := protocol.SignBundle(dev, now-2000, []byte("other"))
	a.putBundles(t, used)
	b.putBundles(t, used, other)
	a.putConsume(t, protocol.SignConsume(dev, now, []protocol.Ref{refOf(t, used)}))
	for i := 0; i < 2; i++ {
		in := NewInitiator(a.local, "responder", 0, pb.SyncRequest_SET_BUNDLES)
		inErr, rsErr := session(t.Context(), in, NewResponder(b.local, "initiator"))
		if inErr != nil || rsErr != nil {
			t.Fatalf("session %d: initiator err %v, responder err %v", i, inErr, rsErr)
		}
		if want := 1 - i; in.Pulled() != want { // the other bundle, once
			t.Errorf("session %d pulled %d bundles, want %d", i, in.Pulled(), want)
		}
		if a.local.Refused.Len() != 1 {
			t.Errorf("session %d: %d refused remembered, want the consumed bundle's 1", i, a.local.Refused.Len())
		}
		if p := append(a.pen.list(), b.pen.list()...); len(p) != 0 {
			t.Errorf("session %d penalised: %v", i, p)
		}
	}
}
