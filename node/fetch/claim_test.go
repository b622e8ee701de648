package fetch

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// retryErr is a Claimer's rate-limit refusal.
type retryErr time.Duration

func (e retryErr) Error() string             { return "over the limit" }
func (e retryErr) RetryAfter() time.Duration { return time.Duration(e) }

// fakeClaimer answers claims with what a test sets, and records requests.
type fakeClaimer struct {
	mu         sync.Mutex
	bundle     *storage.Bundle
	lastResort bool
	notice     *protocol.ClaimNotice
	err        error
	counts     storage.ClaimCounts
	calls      []string // requester, ownedOnly, suite
	taken      []*protocol.ClaimNotice
	refs       []protocol.Ref // of the last request
}

func (f *fakeClaimer) ServeClaim(_ context.Context, req ClaimRequest) (ClaimAnswer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "peer:"+req.Peer.String())
	if req.OwnedOnly {
		f.calls = append(f.calls, "owned")
	}
	if req.Suite != 0 {
		f.calls = append(f.calls, "suite")
	}
	f.refs = req.Refs
	return ClaimAnswer{Bundle: f.bundle, LastResort: f.lastResort, Notice: f.notice, Taken: f.taken}, f.err
}

func (f *fakeClaimer) Count(context.Context, protocol.Key) (storage.ClaimCounts, error) {
	return f.counts, f.err
}

// claimed returns a signed bundle (key_package with an MLS header of
// suite) and a node's claim notice of it.
func claimed(t testing.TB, seed byte, suite uint16) (*storage.Bundle, *protocol.ClaimNotice) {
	t.Helper()
	kp := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, 1), suite)
	b := protocol.SignBundle(nodetest.SeedKey(seed), nowMS(), append(kp, 'k', 'p', seed))
	info, err := testPolicy().ValidateBundle(&b, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	n := protocol.SignClaim(nodetest.SeedKey(99), nowMS(), b.DeviceID, info.Ref)
	return &storage.Bundle{Bundle: b, BundleInfo: info}, &n
}

// KIND_CLAIM and KIND_COUNT over the real server and client: the bundle
// with its notice, the last-resort flag, the owner-only flag and the suite
// reach the Claimer; NOT_FOUND, RATE_LIMITED (with retry_after_ms) and
// NOT_HOLDER come back as the client's errors; a server without a Claimer
// does not know the kinds.
func TestFetchClaimAndCount(t *testing.T) {
	fc := &fakeClaimer{}
	held := true
	r := newRig(t, func(sc *ServerConfig, _ *ClientConfig) {
		sc.Claimer = fc
		sc.Holds = func(protocol.Key) bool { return held }
	})
	ctx := t.Context()
	b, n := claimed(t, 1, 3)
	fc.bundle, fc.notice, fc.lastResort = b, n, true
	got, lastResort, gn, err := r.cli.Claim(ctx, holderID, b.DeviceID, 3, true)
	if err != nil || got.Ref != b.Ref || !lastResort || gn == nil || string(gn.Payload) != string(n.Payload) {
		t.Fatalf("claim: %v, %v, %v; want the bundle, flagged, with its notice", got, lastResort, err)
	}
	if want := []string{"peer:" + clientID.String(), "owned", "suite"}; len(fc.calls) != 3 || fc.calls[0] != want[0] || fc.calls[1] != want[1] || fc.calls[2] != want[2] {
		t.Fatalf("the claimer saw %q; want %q", fc.calls, want)
	}

	fc.counts = storage.ClaimCounts{OneTime: 7, LastResort: 1, LastResortHandedOut: 3}
	if c, err := r.cli.Count(ctx, holderID, b.DeviceID); err != nil || c != fc.counts {
		t.Fatalf("count: %+v, %v; want %+v", c, err, fc.counts)
	}

	fc.err = storage.ErrNotFound
	if _, _, _, err := r.cli.Claim(ctx, holderID, b.DeviceID, 0, false); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("claim of nothing: %v; want ErrNoRecord", err)
	}
	fc.err = retryErr(1500 * time.Millisecond)
	_, _, _, err = r.cli.Claim(ctx, holderID, b.DeviceID, 0, false)
	var rl *RateLimitError
	if !errors.As(err, &rl) || !errors.Is(err, ErrRateLimited) || rl.RetryAfter() != 1500*time.Millisecond {
		t.Fatalf("limited claim: %v; want a RateLimitError retrying after 1.5 s", err)
	}
	fc.err = retryErr(time.Hour) // capped
	if _, _, _, err = r.cli.Claim(ctx, holderID, b.DeviceID, 0, false); !errors.As(err, &rl) || rl.RetryAfter() != MaxRetryAfter {
		t.Fatalf("limited claim for an hour: %v; want the retry capped at %v", err, MaxRetryAfter)
	}
	if r.servedCount("rate_limited") != 2 {
		t.Fatalf("served rate_limited %v times, want 2", r.servedCount("rate_limited"))
	}
	fc.err = errors.New("store on fire")
	if _, _, _, err := r.cli.Claim(ctx, holderID, b.DeviceID, 0, false); err == nil || errors.Is(err, ErrNoRecord) {
		t.Fatalf("failing claimer: %v; want an INTERNAL error", err)
	}
	fc.err = nil
	held = false
	calls := len(fc.calls)
	for _, kind := range []pb.FetchRequest_Kind{pb.FetchRequest_KIND_CLAIM, pb.FetchRequest_KIND_COUNT} {
		if _, err := r.cli.Request(ctx, holderID, &pb.FetchRequest{Kind: kind, Key: b.DeviceID[:]}); !errors.Is(err, ErrNotHeld) {
			t.Fatalf("%v for a shard not held: %v; want NOT_HOLDER", kind, err)
		}
	}
	if len(fc.calls) != calls {
		t.Fatal("a claim for a shard not held reached the claimer (a node claims only for shards it holds)")
	}
	held = true
	if _, err := r.cli.Request(ctx, holderID, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_CLAIM, Key: b.DeviceID[:], CipherSuite: 1 << 16}); err == nil {
		t.Fatal("a cipher suite over 16 bits was served")
	}

	plain := newRig(t, nil)
	if _, _, _, err := plain.cli.Claim(ctx, holderID, b.DeviceID, 0, false); err == nil || plain.servedCount("bad_request") != 1 {
		t.Fatalf("claim at a server without a claimer: %v; want BAD_REQUEST", err)
	}
}

// The client refuses a claim answer whose bundle or notice does not fit
// the request: another device's bundle, a bundle of another suite, no
// notice, a notice naming another ref or device, two bundles.
func TestFetchClaimClientRefusesMismatches(t *testing.T) {
	b, n := claimed(t, 2, 3)
	other, otherN := claimed(t, 3, 3)
	wrongRef := protocol.SignClaim(nodetest.SeedKey(99), nowMS(), b.DeviceID, other.Ref)
	for _, tc := range []struct {
		name  string
		resp  *pb.FetchResponse
		suite uint16
	}{
		{"another device's bundle", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&other.Bundle)}, Claim: pb.FromClaim(otherN)}, 0},
		{"another suite", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}, Claim: pb.FromClaim(n)}, 4},
		{"no notice", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}}, 0},
		{"a notice of another ref", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}, Claim: pb.FromClaim(&wrongRef)}, 0},
		{"a notice of another device", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}, Claim: pb.FromClaim(otherN)}, 0},
		{"two bundles", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle), pb.FromBundle(&b.Bundle)}, Claim: pb.FromClaim(n)}, 0},
		{"a forged bundle", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{forged(&b.Bundle)}, Claim: pb.FromClaim(n)}, 0},
	} {
		c := hostileClient(t, time.Second, func(s network.Stream, _ peer.ID) {
			defer s.Close()
			readRequest(s)
			_, _ = s.Write(delimited(t, tc.resp))
		})
		if got, _, _, err := c.Claim(t.Context(), holderID, b.DeviceID, tc.suite, false); err == nil {
			t.Errorf("%s: accepted %v", tc.name, got.Ref)
		}
	}
	// The honest answer passes (the rig is right).
	c := hostileClient(t, time.Second, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		readRequest(s)
		_, _ = s.Write(delimited(t, &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}, Claim: pb.FromClaim(n)}))
	})
	if _, _, _, err := c.Claim(t.Context(), holderID, b.DeviceID, 3, false); err != nil {
		t.Fatalf("honest answer: %v", err)
	}
}

func forged(b *protocol.Bundle) *pb.Bundle {
	m := pb.FromBundle(b)
	m.Signature = append([]byte(nil), m.Signature...)
	m.Signature[0] ^= 1
	return m
}

// Mutations of a valid claim answer (bytes changed, cut, appended) never
// stall the client and never make it return a claim that does not fit
// the request.
func TestFetchClaimClientMutatedAnswers(t *testing.T) {
	b, n := claimed(t, 24, 1)
	ok, _ := proto.Marshal(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b.Bundle)}, LastResort: true, Claim: pb.FromClaim(n)})
	seed := append(binary.AppendUvarint(nil, uint64(len(ok))), ok...)
	var answer atomic.Pointer[[]byte]
	c := hostileClient(t, time.Second, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		readRequest(s)
		_, _ = s.Write(*answer.Load())
	})
	policy := testPolicy()
	rng := rand.New(rand.NewPCG(1, 2))
	accepted := 0
	for i := range 3000 {
		data := append([]byte(nil), seed...)
		for range 1 + rng.IntN(3) {
			switch rng.IntN(3) {
			case 0:
				data[rng.IntN(len(data))] = byte(rng.IntN(256))
			case 1:
				data = data[:rng.IntN(len(data))+1]
			case 2:
				data = append(data, byte(rng.IntN(256)))
			}
		}
		answer.Store(&data)
		start := time.Now()
		got, _, notice, err := c.Claim(t.Context(), holderID, b.DeviceID, 0, false)
		if err == nil {
			accepted++
			info, verr := policy.ValidateBundle(&got.Bundle, time.Now())
			_, dev, ref, nerr := protocol.DecodeClaimPayload(notice.Payload)
			if verr != nil || got.DeviceID != b.DeviceID || nerr != nil || dev != b.DeviceID || ref != info.Ref {
				t.Fatalf("input %d: returned a claim that does not fit the request: %v, %v", i, verr, nerr)
			}
		}
		_, _ = c.Count(t.Context(), holderID, b.DeviceID)
		if d := time.Since(start); d > 900*time.Millisecond {
			t.Fatalf("input %d (%x) took %v", i, data, d)
		}
	}
	if accepted == 0 {
		t.Fatal("no mutation was accepted: the seed is not a valid answer")
	}
}

// An owner request names refs: they reach the Claimer in order, and the
// notices proving refs taken come back with OK and NOT_FOUND alike; the
// server refuses refs that break the limits (more than MaxOwnerRefs, not
// 32 bytes, repeated, or outside an owner request) as BAD_REQUEST.
func TestFetchOwnerClaimNamesRefsAndCarriesProof(t *testing.T) {
	fc := &fakeClaimer{}
	r := newRig(t, func(sc *ServerConfig, _ *ClientConfig) {
		sc.Claimer = fc
		sc.Holds = func(protocol.Key) bool { return true }
	})
	ctx := t.Context()
	b, n := claimed(t, 4, 0)
	dev := b.DeviceID
	var refs []protocol.Ref
	var taken []*protocol.ClaimNotice
	for i := range 3 {
		ref := protocol.Ref{byte(i + 1)}
		refs = append(refs, ref)
		tn := protocol.SignClaim(nodetest.SeedKey(98), nowMS(), dev, ref)
		taken = append(taken, &tn)
	}
	refs = append(refs, b.Ref)
	fc.bundle, fc.notice, fc.taken = b, n, taken
	a, err := r.cli.OwnerClaim(ctx, holderID, dev, 0, refs)
	if err != nil || a.Bundle.Ref != b.Ref || len(a.Taken) != 3 {
		t.Fatalf("owner claim: %+v, %v; want the bundle and 3 proofs", a, err)
	}
	if len(fc.refs) != len(refs) || fc.refs[0] != refs[0] || fc.refs[3] != b.Ref {
		t.Fatalf("the claimer saw refs %v; want %v in order", fc.refs, refs)
	}
	fc.err = storage.ErrNotFound
	a, err = r.cli.OwnerClaim(ctx, holderID, dev, 0, refs)
	if !errors.Is(err, ErrNoRecord) || len(a.Taken) != 3 || a.Bundle != nil {
		t.Fatalf("owner claim of nothing free: %+v, %v; want ErrNoRecord with 3 proofs", a, err)
	}
	fc.err = nil

	ref32 := func(i int) []byte { return bytes.Repeat([]byte{byte(i)}, 32) }
	var many [][]byte
	for i := range MaxOwnerRefs + 1 {
		many = append(many, ref32(i))
	}
	calls := len(fc.calls)
	for name, req := range map[string]*pb.FetchRequest{
		"too many refs":      {Kind: pb.FetchRequest_KIND_CLAIM, Key: dev[:], OwnedOnly: true, Refs: many},
		"a short ref":        {Kind: pb.FetchRequest_KIND_CLAIM, Key: dev[:], OwnedOnly: true, Refs: [][]byte{ref32(1)[:31]}},
		"a repeated ref":     {Kind: pb.FetchRequest_KIND_CLAIM, Key: dev[:], OwnedOnly: true, Refs: [][]byte{ref32(1), ref32(1)}},
		"refs, not an owner": {Kind: pb.FetchRequest_KIND_CLAIM, Key: dev[:], Refs: [][]byte{ref32(1)}},
		"refs on a lookup":   {Kind: pb.FetchRequest_KIND_LATEST, Key: dev[:], Refs: [][]byte{ref32(1)}},
	} {
		if _, err := r.cli.Request(ctx, holderID, req); err == nil || !strings.Contains(err.Error(), "BAD_REQUEST") {
			t.Errorf("%s: %v; want BAD_REQUEST", name, err)
		}
	}
	if len(fc.calls) != calls {
		t.Fatal("a request with bad refs reached the claimer")
	}
	// MaxOwnerRefs refs and the largest suite fit in MaxRequest (the
	// answer, of suite 0, is then refused by the client).
	var full []protocol.Ref
	for i := range MaxOwnerRefs {
		full = append(full, protocol.Ref(ref32(i+1)))
	}
	if _, err := r.cli.OwnerClaim(ctx, holderID, dev, 0xffff, full); err == nil {
		t.Fatal("accepted a bundle of another suite and ref")
	}
	if len(fc.refs) != MaxOwnerRefs {
		t.Fatalf("a request of %d refs did not reach the claimer (MaxRequest %d too small?)", MaxOwnerRefs, MaxRequest)
	}
}

// The client refuses an owner's answer that does not fit the request: a
// bundle of a ref not named, the last-resort flag, a proof of a ref not
// named or of another device, a proof twice, more proofs than refs, or
// a NOT_FOUND with a bundle.
func TestFetchOwnerClaimClientRefusesMismatches(t *testing.T) {
	b, n := claimed(t, 5, 0)
	other, otherN := claimed(t, 6, 0)
	dev := b.DeviceID
	named := protocol.Ref{7}
	proof := func(d protocol.Key, ref protocol.Ref) *pb.ClaimNotice {
		c := protocol.SignClaim(nodetest.SeedKey(97), nowMS(), d, ref)
		return pb.FromClaim(&c)
	}
	ok := func(m *pb.FetchResponse) *pb.FetchResponse {
		m.Bundles, m.Claim = []*pb.Bundle{pb.FromBundle(&b.Bundle)}, pb.FromClaim(n)
		return m
	}
	refs := []protocol.Ref{named, b.Ref}
	for _, tc := range []struct {
		name string
		resp *pb.FetchResponse
		refs []protocol.Ref
	}{
		{"a ref not named", ok(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK}), []protocol.Ref{named}},
		{"the last-resort flag", ok(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, LastResort: true}), refs},
		{"a proof of a ref not named", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND, Taken: []*pb.ClaimNotice{proof(dev, other.Ref)}}, refs},
		{"a proof of another device", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND, Taken: []*pb.ClaimNotice{proof(other.DeviceID, named)}}, refs},
		{"a proof twice", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND, Taken: []*pb.ClaimNotice{proof(dev, named), proof(dev, named)}}, refs},
		{"more proofs than refs", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND, Taken: []*pb.ClaimNotice{proof(dev, named), proof(dev, b.Ref), proof(dev, other.Ref)}}, refs},
		{"the handed-out ref proven taken", ok(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Taken: []*pb.ClaimNotice{proof(dev, b.Ref)}}), refs},
		{"NOT_FOUND with a bundle", &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND, Bundles: []*pb.Bundle{pb.FromBundle(&other.Bundle)}, Claim: pb.FromClaim(otherN)}, refs},
	} {
		c := hostileClient(t, time.Second, func(s network.Stream, _ peer.ID) {
			defer s.Close()
			readRequest(s)
			_, _ = s.Write(delimited(t, tc.resp))
		})
		if a, err := c.OwnerClaim(t.Context(), holderID, dev, 0, tc.refs); err == nil || (errors.Is(err, ErrNoRecord) && len(a.Taken) > 0) {
			t.Errorf("%s: accepted (%+v, %v)", tc.name, a, err)
		}
	}
	// The honest answers pass (the rig is right).
	for _, resp := range []*pb.FetchResponse{
		ok(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Taken: []*pb.ClaimNotice{proof(dev, named)}}),
		{Status: pb.FetchResponse_STATUS_NOT_FOUND, Taken: []*pb.ClaimNotice{proof(dev, named)}},
	} {
		c := hostileClient(t, time.Second, func(s network.Stream, _ peer.ID) {
			defer s.Close()
			readRequest(s)
			_, _ = s.Write(delimited(t, resp))
		})
		if a, err := c.OwnerClaim(t.Context(), holderID, dev, 0, refs); (err != nil && !errors.Is(err, ErrNoRecord)) || len(a.Taken) != 1 {
			t.Fatalf("honest answer %v: %+v, %v", resp.Status, a, err)
		}
	}
}
