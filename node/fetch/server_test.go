package fetch

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/ed25519strict"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// notAPoint returns 32 bytes that do not decode as an Ed25519 point.
func notAPoint(t testing.TB) []byte {
	t.Helper()
	for range 1000 {
		k := make([]byte, 32)
		rand.Read(k)
		if _, err := ed25519strict.DecodePoint(k); err != nil {
			return k
		}
	}
	t.Fatal("no non-point found")
	return nil
}

// Every request the spec names gets the status the spec gives it
// (protocol/README.md, "Fetch"), over the real server and client.
func TestFetchStatusesFollowTheSpec(t *testing.T) {
	held := true
	r := newRig(t, func(sc *ServerConfig, _ *ClientConfig) {
		sc.Holds = func(protocol.Key) bool { return held }
	})
	ctx := t.Context()
	b := protocol.SignBundle(nodetest.SeedKey(1), nowMS(), []byte("kp"))
	putBundle(t, r.store, &b)
	unknown, _, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name    string
		req     *pb.FetchRequest
		notHeld bool
		want    pb.FetchResponse_Status
	}{
		{"latest", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]}, false, pb.FetchResponse_STATUS_OK},
		{"all", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: b.DeviceID[:]}, false, pb.FetchResponse_STATUS_OK},
		{"unknown device", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: unknown}, false, pb.FetchResponse_STATUS_NOT_FOUND},
		{"unknown account", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: unknown}, false, pb.FetchResponse_STATUS_NOT_FOUND},
		{"unknown device of a shard not held", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: unknown}, true, pb.FetchResponse_STATUS_NOT_HOLDER},
		{"KIND_UNSPECIFIED", &pb.FetchRequest{Key: b.DeviceID[:]}, false, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"unknown kind", &pb.FetchRequest{Kind: 42, Key: b.DeviceID[:]}, false, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"empty request", &pb.FetchRequest{}, false, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"short key", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:31]}, false, pb.FetchResponse_STATUS_BAD_REQUEST},
		{"key not a point (no record can have it)", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: notAPoint(t)}, false, pb.FetchResponse_STATUS_NOT_FOUND},
		{"account key not a point", &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: notAPoint(t)}, false, pb.FetchResponse_STATUS_NOT_FOUND},
	} {
		held = !tc.notHeld
		got := r.raw(t, delimited(t, tc.req))
		length, k := binary.Uvarint(got)
		if k <= 0 || int(length) != len(got)-k {
			t.Fatalf("%s: %d bytes are not one length-prefixed response", tc.name, len(got))
		}
		var resp pb.FetchResponse
		if err := proto.Unmarshal(got[k:], &resp); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if resp.Status != tc.want {
			t.Errorf("%s: status %v (%q), want %v", tc.name, resp.Status, resp.Error, tc.want)
		}
	}
	held = true

	// The client maps the statuses to its sentinels.
	if _, err := r.cli.FetchLatest(ctx, holderID, protocol.Key(unknown)); !errors.Is(err, ErrNoRecord) {
		t.Errorf("client, NOT_FOUND: %v, want ErrNoRecord", err)
	}
	held = false
	if _, err := r.cli.FetchAccount(ctx, holderID, protocol.Key(unknown)); !errors.Is(err, ErrNotHeld) {
		t.Errorf("client, NOT_HOLDER: %v, want ErrNotHeld", err)
	}
	held = true

	// An empty request is a zero length prefix: answered BAD_REQUEST.
	if got := r.raw(t, []byte{0}); !bytes.Equal(got, delimited(t, &pb.FetchResponse{Status: pb.FetchResponse_STATUS_BAD_REQUEST, Error: "unknown request kind"})) {
		t.Errorf("zero-length request: answer %x", got)
	}
	// No request at all (the requester closes at once): no answer.
	before := r.servedCount("bad_request")
	local, remote := net.Pipe()
	local.Close()
	r.srv.Handle(remote, clientID)
	if r.servedCount("bad_request") != before+1 {
		t.Errorf("no request: not counted as a bad request")
	}

	// A non-minimal length prefix (36 as 0xa4 0x00) ends the stream unanswered.
	latest := &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]}
	m, _ := proto.Marshal(latest)
	if got := r.raw(t, append([]byte{byte(len(m)) | 0x80, 0}, m...)); len(got) != 0 {
		t.Errorf("non-minimal prefix: answered %d bytes", len(got))
	}

	// Two requests on one stream: the first is answered, the second is
	// discarded unread, and the stream ends after one response.
	got := r.raw(t, delimited(t, latest, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ACCOUNT, Key: unknown}))
	length, k := binary.Uvarint(got)
	if k <= 0 || int(length) != len(got)-k {
		t.Fatalf("two requests: %d bytes are not exactly one response", len(got))
	}
	var resp pb.FetchResponse
	if err := proto.Unmarshal(got[k:], &resp); err != nil || resp.Status != pb.FetchResponse_STATUS_OK || len(resp.Bundles) != 1 {
		t.Fatalf("two requests: first answer %v, %v", resp.Status, err)
	}

	// The 256-byte cap counts the request message, not its length prefix:
	// 256 bytes (padded with an unknown field) are answered, 257 are not.
	padded := func(size int) []byte {
		m, _ := proto.Marshal(latest)
		pad := size - len(m) - 3 // field 15, bytes: 1-byte tag, 2-byte length
		m = append(m, 15<<3|2)
		m = binary.AppendUvarint(m, uint64(pad))
		m = append(m, make([]byte, pad)...)
		if len(m) != size {
			t.Fatalf("padded request of %d bytes, want %d", len(m), size)
		}
		return append(binary.AppendUvarint(nil, uint64(size)), m...)
	}
	if got := r.raw(t, padded(MaxRequest)); len(got) == 0 {
		t.Errorf("request of exactly %d bytes: no answer", MaxRequest)
	}
	if got := r.raw(t, padded(MaxRequest+1)); len(got) != 0 {
		t.Errorf("request of %d bytes: answered %d bytes", MaxRequest+1, len(got))
	}
}

// The honest exchanges: the latest bundle, all of a device's bundles
// (newest first) and an account bundle come back as stored, verified.
func TestFetchHonestLatestAllAccount(t *testing.T) {
	r := newRig(t, nil)
	ctx := t.Context()
	dev := nodetest.SeedKey(2)
	var bs []protocol.Bundle
	for i := range 3 {
		b := protocol.SignBundle(dev, nowMS()-uint64(3-i)*1000, []byte{'k', byte(i)})
		putBundle(t, r.store, &b)
		bs = append(bs, b)
	}
	got, err := r.cli.FetchLatest(ctx, holderID, bs[0].DeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Payload, bs[2].Payload) || got.Signature != bs[2].Signature || got.TimestampMS == 0 {
		t.Fatalf("latest: got ts %d, want the newest bundle", got.TimestampMS)
	}
	all, err := r.cli.Request(ctx, holderID, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: bs[0].DeviceID[:]})
	if err != nil {
		t.Fatal(err)
	}
	if len(all.Bundles) != 3 || all.Error != "" {
		t.Fatalf("all: %d bundles, error %q", len(all.Bundles), all.Error)
	}
	for i, m := range all.Bundles {
		if !bytes.Equal(m.Payload, bs[2-i].Payload) {
			t.Fatalf("all: bundle %d is not the %d-th newest", i, i+1)
		}
	}
	a := protocol.SignAccount(nodetest.SeedKey(3), protocol.EncodeAccountPayload(7, []protocol.Key{bs[0].DeviceID}))
	putAccount(t, r.store, &a)
	acct, err := r.cli.FetchAccount(ctx, holderID, a.AccountPub)
	if err != nil {
		t.Fatal(err)
	}
	if acct.Lamport != 7 || !bytes.Equal(acct.Payload, a.Payload) || acct.Signature != a.Signature || acct.UpdatedAtMS <= 0 {
		t.Fatalf("account: lamport %d updated %d", acct.Lamport, acct.UpdatedAtMS)
	}
	if n := r.servedCount("ok"); n != 3 {
		t.Fatalf("kpnode_fetch_served_total{status=ok} = %v, want 3", n)
	}
}

// storeLargeBundles stores count bundles of size-byte payloads for one new
// device, oldest first.
func storeLargeBundles(t testing.TB, r *rig, count, size int) (protocol.Key, []protocol.Bundle) {
	t.Helper()
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	start := nowMS() - uint64(count)*1000
	var out []protocol.Bundle
	for i := range count {
		kp := make([]byte, size-protocol.TimestampSize)
		rand.Read(kp)
		b := protocol.SignBundle(dev, start+uint64(i)*1000, kp)
		putBundle(t, r.store, &b)
		out = append(out, b)
	}
	return out[0].DeviceID, out
}

// KIND_ALL for a device with 100 bundles of 60 KB answers the newest that
// fit in 1 MiB, says it cut the rest, and the client reads it whole.
func TestFetchAllIsCutAtTheResponseCap(t *testing.T) {
	r := newRig(t, nil)
	dev, bundles := storeLargeBundles(t, r, 100, 60_000)
	got := r.raw(t, delimited(t, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: dev[:]}))
	length, k := binary.Uvarint(got)
	if k <= 0 || int(length) != len(got)-k || int(length) > MaxResponse {
		t.Fatalf("%d bytes: not one response within the %d-byte cap", len(got), MaxResponse)
	}
	var resp pb.FetchResponse
	if err := proto.Unmarshal(got[k:], &resp); err != nil || resp.Status != pb.FetchResponse_STATUS_OK {
		t.Fatalf("status %v, %v", resp.Status, err)
	}
	want := (MaxResponse - ResponseReserve) / (60_000 + 110)
	if len(resp.Bundles) != want || !strings.HasPrefix(resp.Error, "truncated: 17 ") {
		t.Fatalf("%d bundles, error %q; want %d and a truncation note", len(resp.Bundles), resp.Error, want)
	}
	for i, b := range resp.Bundles {
		if !bytes.Equal(b.Payload, bundles[len(bundles)-1-i].Payload) {
			t.Fatalf("bundle %d is not the %d-th newest", i, i+1)
		}
	}
	all, err := r.cli.Request(t.Context(), holderID, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: dev[:]})
	if err != nil || len(all.Bundles) != want {
		t.Fatalf("client: %v, %d bundles", err, len(all.Bundles))
	}
}

// A spent budget is answered BUSY at once (the client says ErrBusy), for
// each budget on its own: a spent bulk budget leaves point requests
// served, and the budget comes back once released.
func TestFetchBusyWhenTheBudgetIsSpent(t *testing.T) {
	r := newRig(t, nil)
	ctx := t.Context()
	b := protocol.SignBundle(nodetest.SeedKey(4), nowMS(), []byte("kp"))
	putBundle(t, r.store, &b)
	all := &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: b.DeviceID[:]}

	bulk := int64(max(DefaultBulkBudget, AllWeight))
	releaseBulk, ok := r.srv.acquire(r.srv.bulk, bulk)
	if !ok {
		t.Fatal("could not take the bulk budget")
	}
	if _, err := r.cli.Request(ctx, holderID, all); !errors.Is(err, ErrBusy) {
		t.Fatalf("KIND_ALL with the bulk budget spent: %v, want ErrBusy", err)
	}
	if _, err := r.cli.FetchLatest(ctx, holderID, b.DeviceID); err != nil {
		t.Fatalf("LATEST with only the bulk budget spent: %v", err)
	}
	nodetest.WaitFor(t, "the served request to release its budget", 10*time.Second, func() bool { return r.srv.Inflight() == bulk })
	releasePoint, ok := r.srv.acquire(r.srv.point, DefaultPointBudget)
	if !ok {
		t.Fatal("could not take the point budget")
	}
	if _, err := r.cli.FetchLatest(ctx, holderID, b.DeviceID); !errors.Is(err, ErrBusy) {
		t.Fatalf("LATEST with the point budget spent: %v, want ErrBusy", err)
	}
	if r.servedCount("busy") != 2 {
		t.Fatalf("kpnode_fetch_served_total{status=busy} = %v, want 2", r.servedCount("busy"))
	}
	releaseBulk()
	releasePoint()
	if _, err := r.cli.Request(ctx, holderID, all); err != nil {
		t.Fatalf("KIND_ALL once the budget is back: %v", err)
	}
	nodetest.WaitFor(t, "every reservation released", 10*time.Second, func() bool { return r.srv.Inflight() == 0 })
}

// A flood of concurrent KIND_ALL requests for a device with 100 large
// bundles never holds more response bytes than the budget: requests beyond
// it are answered BUSY, and point fetches keep being answered OK.
func TestFetchFloodStaysWithinTheBudget(t *testing.T) {
	r := newRig(t, nil)
	ctx := t.Context()
	dev, _ := storeLargeBundles(t, r, 100, 60_000)
	honest := protocol.SignBundle(nodetest.SeedKey(5), nowMS(), []byte("honest"))
	putBundle(t, r.store, &honest)

	const workers, requests = 16, 96
	var mu sync.Mutex
	counts := map[string]int{}
	var wg sync.WaitGroup
	jobs := make(chan struct{}, requests)
	for range requests {
		jobs <- struct{}{}
	}
	close(jobs)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				_, err := r.cli.Request(ctx, holderID, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: dev[:]})
				mu.Lock()
				switch {
				case err == nil:
					counts["ok"]++
				case errors.Is(err, ErrBusy):
					counts["busy"]++
				default:
					counts[err.Error()]++
				}
				mu.Unlock()
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	honestOK := 0
	for flooding := true; flooding; {
		select {
		case <-done:
			flooding = false
		default:
			if _, err := r.cli.FetchLatest(ctx, holderID, honest.DeviceID); err != nil {
				t.Fatalf("honest fetch during the flood: %v", err)
			}
			honestOK++
		}
	}
	budget := int64(max(DefaultBulkBudget, AllWeight))
	t.Logf("results %v; honest fetches %d; peak in flight %d bytes of a %d-byte bulk budget", counts, honestOK, r.srv.peak.Load(), budget)
	if r.srv.peak.Load() > budget+DefaultPointBudget {
		t.Fatalf("peak %d bytes in flight, over the budget", r.srv.peak.Load())
	}
	if counts["busy"] == 0 || counts["ok"] == 0 || counts["ok"]+counts["busy"] != requests {
		t.Fatalf("results %v: want only OK and BUSY, some of each", counts)
	}
	// Handlers release their reservation once their answer is written.
	nodetest.WaitFor(t, "every reservation released after the flood", 10*time.Second, func() bool { return r.srv.Inflight() == 0 })
}

// A hostile requester is refused within its budget: a request whose prefix
// promises more than MaxRequest bytes is dropped unread, and one that never
// finishes is cut at the stream timeout, in milliseconds here.
func TestFetchServerRefusesHostileRequests(t *testing.T) {
	const timeout = 30 * time.Millisecond
	r := newRig(t, func(sc *ServerConfig, _ *ClientConfig) { sc.StreamTimeout = timeout })

	huge := binary.AppendUvarint(nil, 1<<30)
	within(t, time.Second, "refusing a 1 GiB request", func() {
		if got := r.raw(t, append(huge, make([]byte, 1024)...)); len(got) != 0 {
			t.Errorf("huge request: answered %d bytes", len(got))
		}
	})
	if r.servedCount("bad_request") != 1 {
		t.Errorf("huge request: bad_request count %v", r.servedCount("bad_request"))
	}

	// Slow: a prefix promising 16 bytes, then nothing. The server ends the
	// stream at its timeout without answering.
	local, remote := net.Pipe()
	defer local.Close()
	handled := make(chan struct{})
	go func() { defer close(handled); r.srv.Handle(remote, clientID) }()
	d := within(t, 20*timeout, "cutting a slow request", func() {
		if _, err := local.Write([]byte{0x10}); err != nil {
			t.Fatal(err)
		}
		_ = local.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := local.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("slow request: read %d bytes, %v; want the stream closed", n, err)
		}
		<-handled
	})
	if d < timeout {
		t.Fatalf("slow request cut after %v, before the %v timeout", d, timeout)
	}
}

// Close ends handlers blocked on a requester that never sends its request
// long before their stream timeout, and waits for them.
func TestFetchCloseEndsHandlersInFlight(t *testing.T) {
	r := newRig(t, func(sc *ServerConfig, _ *ClientConfig) { sc.StreamTimeout = time.Minute })
	local, remote := net.Pipe()
	defer local.Close()
	handled := make(chan struct{})
	go func() { defer close(handled); r.srv.Handle(remote, clientID) }()
	if _, err := local.Write([]byte{0x10}); err != nil { // the handler has the stream
		t.Fatal(err)
	}
	within(t, time.Second, "Close with a handler in flight", func() {
		if err := r.srv.Close(); err != nil {
			t.Fatal(err)
		}
	})
	select {
	case <-handled:
	default:
		t.Fatal("Close returned before the handler")
	}
	// After Close a stream is refused at once.
	l2, r2 := net.Pipe()
	defer l2.Close()
	go r.srv.Handle(r2, clientID)
	_ = l2.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := io.ReadAll(l2); err != nil {
		t.Fatalf("stream after Close: %v, want it closed at once", err)
	}
}

// A panicking store ends the one stream, never the process, and the server
// keeps serving.
func TestFetchHandlerPanicEndsOnlyTheStream(t *testing.T) {
	r := newRig(t, func(sc *ServerConfig, _ *ClientConfig) {
		sc.Store = panicStore{sc.Store}
	})
	b := protocol.SignBundle(nodetest.SeedKey(6), nowMS(), []byte("kp"))
	putBundle(t, r.store, &b)
	if got := r.raw(t, delimited(t, &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: b.DeviceID[:]})); len(got) != 0 {
		t.Fatalf("answered %d bytes after a panic", len(got))
	}
	if _, err := r.cli.FetchAccount(t.Context(), holderID, b.DeviceID); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("after a panic: %v, want the server still answering", err)
	}
}

type panicStore struct{ Store }

func (panicStore) LatestBundle(context.Context, protocol.Key) (*storage.Bundle, error) {
	panic("hostile input")
}

// The server's metrics keep their names: dashboards and the README use them.
func TestFetchMetricNames(t *testing.T) {
	r := newRig(t, nil)
	r.raw(t, []byte{0})
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	for _, want := range []string{"kpnode_fetch_served_total", "kpnode_fetch_inflight_bytes"} {
		if !names[want] {
			t.Errorf("metric %s not registered (have %v)", want, names)
		}
	}
}
