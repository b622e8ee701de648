package fetch

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// putConsume validates n and stores it, as the node's ingest path does.
func putConsume(t testing.TB, st *storage.Store, n protocol.ConsumeNotice) {
	t.Helper()
	info, err := testPolicy().ValidateConsume(&n, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.PutConsume(context.Background(), &n, info); err != nil {
		t.Fatal(err)
	}
}

// consumeSink records what the client hands to ClientConfig.Consumed.
type consumeSink struct {
	mu  sync.Mutex
	got [][]*protocol.ConsumeNotice
}

func (s *consumeSink) deliver(_ context.Context, _ peer.ID, ns []*protocol.ConsumeNotice) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, ns)
}

func (s *consumeSink) take() []*protocol.ConsumeNotice {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.got) == 0 {
		return nil
	}
	last := s.got[len(s.got)-1]
	s.got = nil
	return last
}

// KIND_LATEST, KIND_ALL and KIND_CLAIM answers, OK and NOT_FOUND, carry the
// device's consume notices the server holds (at most MaxConsumed, newest
// first), and the client hands them to its Consumed hook before it returns;
// KIND_ACCOUNT answers and other devices' notices carry none.
func TestFetchAnswersCarryTheDevicesConsumeNotices(t *testing.T) {
	fc := &fakeClaimer{}
	sink := &consumeSink{}
	r := newRig(t, func(sc *ServerConfig, cc *ClientConfig) {
		sc.Claimer = fc
		cc.Consumed = sink.deliver
	})
	key := nodetest.SeedKey(7)
	now := nowMS()
	b1 := protocol.SignBundle(key, now-2000, []byte("kp1"))
	b2 := protocol.SignBundle(key, now-1000, []byte("kp2"))
	putBundle(t, r.store, &b1)
	putBundle(t, r.store, &b2)
	info2, _ := testPolicy().ValidateBundle(&b2, time.Now())
	info1, _ := testPolicy().ValidateBundle(&b1, time.Now())
	// 20 older notices naming refs never held, then the one consuming b2.
	for i := range 20 {
		putConsume(t, r.store, protocol.SignConsume(key, now-uint64(100+i), []protocol.Ref{{byte(i + 1)}}))
	}
	putConsume(t, r.store, protocol.SignConsume(key, now, []protocol.Ref{info2.Ref}))
	other := nodetest.SeedKey(8)
	putConsume(t, r.store, protocol.SignConsume(other, now+5, []protocol.Ref{{0xee}}))

	check := func(what string) {
		t.Helper()
		ns := sink.take()
		if len(ns) != MaxConsumed {
			t.Fatalf("%s: %d consume notices delivered, want %d", what, len(ns), MaxConsumed)
		}
		for i, n := range ns {
			ts, refs, err := protocol.DecodeConsumePayload(n.Payload)
			if err != nil || n.DeviceID != b1.DeviceID {
				t.Fatalf("%s: notice %d of device %s (%v)", what, i, n.DeviceID, err)
			}
			if i == 0 && (ts != now || refs[0] != info2.Ref) {
				t.Fatalf("%s: the first notice is not the newest (the one consuming b2)", what)
			}
		}
	}
	got, err := r.cli.FetchLatest(t.Context(), holderID, b1.DeviceID)
	if err != nil || got.Ref != info1.Ref {
		t.Fatalf("latest: %v", err)
	}
	check("latest")
	all, err := r.cli.Request(t.Context(), holderID, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: b1.DeviceID[:]})
	if err != nil || len(all.Bundles) != 1 {
		t.Fatalf("all: %v", err)
	}
	check("all")
	fc.bundle, fc.notice = &storage.Bundle{Bundle: b1, BundleInfo: info1}, func() *protocol.ClaimNotice {
		n := protocol.SignClaim(nodetest.SeedKey(99), now, b1.DeviceID, info1.Ref)
		return &n
	}()
	if _, _, _, err := r.cli.Claim(t.Context(), holderID, b1.DeviceID, 0, false); err != nil {
		t.Fatalf("claim: %v", err)
	}
	check("claim")
	fc.err = storage.ErrNotFound
	if _, _, _, err := r.cli.Claim(t.Context(), holderID, b1.DeviceID, 0, false); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("claim of nothing: %v", err)
	}
	check("claim not found")

	// Every bundle consumed: NOT_FOUND still carries the notices.
	putConsume(t, r.store, protocol.SignConsume(key, now+1, []protocol.Ref{info1.Ref}))
	if _, err := r.cli.FetchLatest(t.Context(), holderID, b1.DeviceID); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("latest of a consumed pool: %v", err)
	}
	if ns := sink.take(); len(ns) != MaxConsumed {
		t.Fatalf("not found: %d notices delivered, want %d", len(ns), MaxConsumed)
	} else if ts, _, _ := protocol.DecodeConsumePayload(ns[0].Payload); ts != now+1 {
		t.Fatalf("not found: the first notice has ts %d, want the newest %d", ts, now+1)
	}
	if _, err := r.cli.FetchAccount(t.Context(), holderID, b1.DeviceID); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("account: %v", err)
	}
	if ns := sink.take(); ns != nil {
		t.Fatalf("an account answer delivered %d consume notices", len(ns))
	}
}
