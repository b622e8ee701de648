package fetch

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch/fetchtest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// hostileClient is a Client whose streams to holderID reach h, with a
// short timeout so that a stalling peer is cut in milliseconds.
func hostileClient(t testing.TB, timeout time.Duration, h fetchtest.Handler) *Client {
	t.Helper()
	pipes := fetchtest.New(clientID)
	pipes.Handle(holderID, h)
	t.Cleanup(pipes.Wait)
	c, err := NewClient(ClientConfig{Protocol: testProto, Opener: pipes, Validator: PolicyValidator{Policy: testPolicy()}, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// readRequest reads the client's request, as an honest server would.
func readRequest(s network.Stream) *pb.FetchRequest {
	var req pb.FetchRequest
	if err := pbio.NewDelimitedReader(s, MaxRequest).ReadMsg(&req); err != nil {
		return nil
	}
	return &req
}

// A server that cuts its answer short (a prefix promising more bytes than
// follow) is an error at once, not a record.
func TestFetchClientTruncatingServer(t *testing.T) {
	b := protocol.SignBundle(nodetest.SeedKey(10), nowMS(), []byte("kp"))
	c := hostileClient(t, time.Second, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		readRequest(s)
		full := delimited(t, &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{pb.FromBundle(&b)}})
		_, _ = s.Write(full[:len(full)/2])
	})
	within(t, 200*time.Millisecond, "a truncated answer", func() {
		got, err := c.FetchLatest(t.Context(), holderID, b.DeviceID)
		if err == nil || got != nil {
			t.Fatalf("truncated answer: %v, %v; want an error and no record", got, err)
		}
	})
}

// A server that reads the request and never answers is cut at the
// client's timeout: the wall time is pinned to milliseconds.
func TestFetchClientStallingServer(t *testing.T) {
	const timeout = 30 * time.Millisecond
	c := hostileClient(t, timeout, func(s network.Stream, _ peer.ID) {
		defer s.Close()
		readRequest(s)
		_, _ = io.Copy(io.Discard, s) // until the client gives up
	})
	d := within(t, 20*timeout, "a stalling server", func() {
		if got, err := c.FetchAccount(t.Context(), holderID, protocol.Key{1}); err == nil || got != nil {
			t.Fatalf("stalling server: %v, %v; want an error", got, err)
		}
	})
	if d < timeout {
		t.Fatalf("gave up after %v, before the %v timeout", d, timeout)
	}
	// The caller's context ends it sooner.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Millisecond)
	defer cancel()
	within(t, 10*timeout, "a stalling server with a short context", func() {
		if _, err := c.FetchAccount(ctx, holderID, protocol.Key{1}); err == nil {
			t.Fatal("stalling server: no error")
		}
	})
}

// A lying server's answers are errors and yield no record: a bundle of
// another device, a bad signature, an account of another key, two bundles
// for a latest request, a response over the size cap. Each is refused in
// milliseconds.
func TestFetchClientLyingServer(t *testing.T) {
	asked := protocol.SignBundle(nodetest.SeedKey(11), nowMS(), []byte("kp"))
	other := protocol.SignBundle(nodetest.SeedKey(12), nowMS(), []byte("kp"))
	badSig := asked
	badSig.Signature[0] ^= 1
	acct := protocol.SignAccount(nodetest.SeedKey(13), protocol.EncodeAccountPayload(1, nil))
	otherAcct := protocol.SignAccount(nodetest.SeedKey(14), protocol.EncodeAccountPayload(9, nil))
	answer := func(resp *pb.FetchResponse) fetchtest.Handler {
		return func(s network.Stream, _ peer.ID) {
			defer s.Close()
			readRequest(s)
			_ = pbio.NewDelimitedWriter(s).WriteMsg(resp)
		}
	}
	ok := func(bs ...*protocol.Bundle) *pb.FetchResponse {
		resp := &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK}
		for _, b := range bs {
			resp.Bundles = append(resp.Bundles, pb.FromBundle(b))
		}
		return resp
	}
	for _, tc := range []struct {
		name      string
		h         fetchtest.Handler
		account   bool
		malformed bool // protocol.ErrMalformed, else a validation error or a read error
	}{
		{"bundle of another device", answer(ok(&other)), false, true},
		{"bad signature", answer(ok(&badSig)), false, false},
		{"two bundles for latest", answer(ok(&asked, &asked)), false, true},
		{"no bundle for latest", answer(ok()), false, true},
		{"account of another key", answer(&pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Account: pb.FromAccount(&otherAcct)}), true, true},
		{"OK without an account", answer(ok()), true, true},
		{"oversized response", func(s network.Stream, _ peer.ID) {
			defer s.Close()
			readRequest(s)
			_, _ = s.Write(binary.AppendUvarint(nil, MaxResponse+1))
			_, _ = s.Write(make([]byte, 4096))
		}, false, false},
	} {
		c := hostileClient(t, time.Second, tc.h)
		within(t, 200*time.Millisecond, tc.name, func() {
			var err error
			var rec any
			if tc.account {
				var a *storage.Account
				a, err = c.FetchAccount(t.Context(), holderID, acct.AccountPub)
				if a != nil {
					rec = a
				}
			} else {
				var b *storage.Bundle
				b, err = c.FetchLatest(t.Context(), holderID, asked.DeviceID)
				if b != nil {
					rec = b
				}
			}
			if err == nil || rec != nil {
				t.Fatalf("%s: %v, %v; want an error and no record", tc.name, rec, err)
			}
			if tc.malformed && !errors.Is(err, protocol.ErrMalformed) {
				t.Fatalf("%s: %v, want protocol.ErrMalformed", tc.name, err)
			}
			var ve *protocol.ValidationError
			if tc.name == "bad signature" && !errors.As(err, &ve) {
				t.Fatalf("%s: %v, want a validation error", tc.name, err)
			}
		})
	}
}

// A holder that cannot be reached is an error naming it, not a miss.
func TestFetchClientUnreachablePeer(t *testing.T) {
	c := hostileClient(t, time.Second, func(s network.Stream, _ peer.ID) { s.Close() })
	_, err := c.FetchLatest(t.Context(), peer.ID("nobody"), protocol.Key{})
	if !errors.Is(err, fetchtest.ErrNoRoute) || errors.Is(err, ErrNoRecord) {
		t.Fatalf("unreachable peer: %v", err)
	}
}
