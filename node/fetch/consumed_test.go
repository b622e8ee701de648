package fetch

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch/fetchtest"
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

// A hostile holder's consume notices: those of another device and
// undecodable ones are dropped, and no more than MaxConsumed of the rest
// reach the hook; NOT_HOLDER and BUSY answers deliver none.
func TestFetchClientBoundsTheConsumeNotices(t *testing.T) {
	asked, other := nodetest.SeedKey(31), nodetest.SeedKey(32)
	b := protocol.SignBundle(asked, nowMS(), []byte("kp"))
	var resp pb.FetchResponse
	resp.Status = pb.FetchResponse_STATUS_OK
	resp.Bundles = []*pb.Bundle{pb.FromBundle(&b)}
	for i := range 40 {
		key := asked
		if i%2 == 1 {
			key = other
		}
		n := protocol.SignConsume(key, nowMS()-uint64(i), []protocol.Ref{{byte(i)}})
		resp.Consumed = append(resp.Consumed, pb.FromConsume(&n))
	}
	resp.Consumed = append([]*pb.ConsumeNotice{{DeviceId: []byte{1}}}, resp.Consumed...)
	var status atomic.Int32
	status.Store(int32(pb.FetchResponse_STATUS_OK))
	pipes := fetchtest.New(clientID)
	pipes.Handle(holderID, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		readRequest(s)
		r := proto.Clone(&resp).(*pb.FetchResponse)
		r.Status = pb.FetchResponse_Status(status.Load())
		_ = pbio.NewDelimitedWriter(s).WriteMsg(r)
	})
	t.Cleanup(pipes.Wait)
	sink := &consumeSink{}
	c, err := NewClient(ClientConfig{Protocol: testProto, Opener: pipes, Validator: PolicyValidator{Policy: testPolicy()},
		Consumed: sink.deliver})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.FetchLatest(t.Context(), holderID, b.DeviceID); err != nil {
		t.Fatal(err)
	}
	ns := sink.take()
	if len(ns) == 0 || len(ns) > MaxConsumed {
		t.Fatalf("%d notices delivered, want 1..%d", len(ns), MaxConsumed)
	}
	for _, n := range ns {
		if n.DeviceID != b.DeviceID {
			t.Fatalf("a notice of device %s delivered for %s", n.DeviceID, b.DeviceID)
		}
	}
	for _, st := range []pb.FetchResponse_Status{pb.FetchResponse_STATUS_NOT_HOLDER, pb.FetchResponse_STATUS_BUSY} {
		status.Store(int32(st))
		if _, err := c.FetchLatest(t.Context(), holderID, b.DeviceID); err == nil {
			t.Fatalf("%v answered no error", st)
		}
		if ns := sink.take(); ns != nil {
			t.Fatalf("a %v answer delivered %d notices", st, len(ns))
		}
	}
}
