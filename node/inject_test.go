package node

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/protocol"
)

// injectedHost builds a loopback host the way a caller of Config.Host
// does: HostOptions with a Gater.
func injectedHost(t *testing.T, cfg Config, g *Gater) host.Host {
	t.Helper()
	opts, err := HostOptions(cfg, g)
	if err != nil {
		t.Fatal(err)
	}
	h, err := libp2p.New(append(opts, libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableMetrics())...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// A node with an injected host, an in-memory store and no API address
// writes no file, opens no HTTP listener, serves its API through Handler,
// enforces its bans through the Gater, and leaves the host to its owner.
func TestInjectedHostInMemoryNoAPI(t *testing.T) {
	t.Chdir(t.TempDir())
	cfg := DefaultConfig()
	cfg.DataDir, cfg.APIAddr, cfg.Listen = "", "", nil
	cfg.InMemory = true
	cfg.Policy.MLS = protocol.MLSOff
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	g := NewGater()
	h := injectedHost(t, cfg, g)
	cfg.Host, cfg.Gater = h, g
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n.APIAddr() != nil || n.PeerID() != h.ID() {
		t.Fatalf("API address %v, peer %s; want none and the injected host's %s", n.APIAddr(), n.PeerID(), h.ID())
	}
	rec := httptest.NewRecorder()
	n.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/v1/status", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /v1/status through Handler: %d", rec.Code)
	}

	other := injectedHost(t, cfg, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	self := peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}
	if err := other.Connect(ctx, self); err != nil {
		t.Fatal(err)
	}
	n.guard.penalize(other.ID(), "sync", "test")
	if g.InterceptPeerDial(other.ID()) || g.InterceptSecured(0, other.ID(), nil) {
		t.Fatal("the injected host's gater lets a banned peer through")
	}
	for h.Network().Connectedness(other.ID()) == network.Connected {
		select {
		case <-ctx.Done():
			t.Fatal("the banned peer's connection was not closed")
		case <-time.After(10 * time.Millisecond):
		}
	}
	if err := h.Connect(ctx, peer.AddrInfo{ID: other.ID(), Addrs: other.Addrs()}); err == nil {
		t.Fatal("the injected host dialled a banned peer")
	}

	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	third := injectedHost(t, cfg, nil)
	if err := third.Connect(ctx, self); err != nil {
		t.Fatalf("the node closed the host it was given: %v", err)
	}
	if ents, _ := os.ReadDir("."); len(ents) != 0 {
		t.Fatalf("the node wrote %d files, want none", len(ents))
	}
}

// A Gater serves one node.
func TestGaterServesOneNode(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DataDir, cfg.APIAddr, cfg.Listen = "", "", nil
	cfg.InMemory = true
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	g := NewGater()
	cfg.Host, cfg.Gater = injectedHost(t, cfg, g), g
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if n2, err := New(cfg); err == nil {
		n2.Close()
		t.Fatal("a second node took a gater that serves another")
	}
}

// Without a host, Listen and a data dir stay required; an empty API
// address is allowed.
func TestConfigValidateInjected(t *testing.T) {
	cfg := DefaultConfig()
	cfg.APIAddr = ""
	if err := cfg.Validate(); err != nil {
		t.Fatalf("empty API address: %v", err)
	}
	cfg.InMemory = true
	cfg.DataDir = ""
	if err := cfg.Validate(); err == nil {
		t.Fatal("in memory without a host: accepted without a data dir (the identity lives there)")
	}
	cfg.DataDir = "x"
	cfg.Listen = nil
	if err := cfg.Validate(); err == nil {
		t.Fatal("no listen address and no host: accepted")
	}
}

// A failed start is final: a second Start is refused even once the cause
// is gone, and Close returns (a retried Start used to succeed with every
// goroutine refused, and Close then waited forever for its HTTP server).
func TestFailedStartIsFinal(t *testing.T) {
	busy, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.APIAddr = "127.0.0.1:0"
	// Taken: the libp2p host cannot listen, so the network does not start.
	cfg.Listen = []string{fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", busy.Addr().(*net.TCPAddr).Port)}
	cfg.NoSync = true
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	n, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err == nil {
		t.Fatal("Start on a taken listen address succeeded")
	}
	busy.Close()
	if err := n.Start(context.Background()); err == nil {
		t.Fatal("a second Start after a failed one succeeded")
	}
	done := make(chan error, 1)
	go func() { done <- n.Close() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Close after a failed start did not return")
	}
}
