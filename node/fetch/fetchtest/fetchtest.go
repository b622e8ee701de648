// Package fetchtest runs fetch exchanges without sockets: Pipes is a
// fetch.StreamOpener whose streams are net.Pipe ends, each answered in
// process by the handler registered for the peer asked (a real
// fetch.Server, or a hostile one a test writes).
package fetchtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
)

// ErrNoRoute: no handler is registered for the peer asked (a holder that
// is down).
var ErrNoRoute = errors.New("fetchtest: no route to peer")

// Handler serves one stream from peer from. It owns s and must close it.
type Handler func(s network.Stream, from peer.ID)

// Pipes routes streams to handlers by peer. The zero value is not usable;
// call New.
type Pipes struct {
	self     peer.ID
	mu       sync.Mutex
	handlers map[peer.ID]Handler
	wg       sync.WaitGroup
	opened   atomic.Int64
}

// New returns Pipes whose streams come from peer self.
func New(self peer.ID) *Pipes {
	return &Pipes{self: self, handlers: map[peer.ID]Handler{}}
}

// Handle routes streams to p to h; a nil h makes p unreachable.
func (n *Pipes) Handle(p peer.ID, h Handler) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if h == nil {
		delete(n.handlers, p)
		return
	}
	n.handlers[p] = h
}

// Opened returns how many streams NewStream opened.
func (n *Pipes) Opened() int64 { return n.opened.Load() }

// Wait returns once every handler started has returned.
func (n *Pipes) Wait() { n.wg.Wait() }

// NewStream opens a pipe to p and runs p's handler on the other end in a
// goroutine (Wait joins it). Unknown peers are ErrNoRoute.
func (n *Pipes) NewStream(ctx context.Context, p peer.ID, pids ...p2pprotocol.ID) (network.Stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n.mu.Lock()
	h, ok := n.handlers[p]
	n.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w %s", ErrNoRoute, p)
	}
	var proto p2pprotocol.ID
	if len(pids) > 0 {
		proto = pids[0]
	}
	n.opened.Add(1)
	local, remote := net.Pipe()
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		h(&Stream{pipe: remote, proto: proto}, n.self)
	}()
	return &Stream{pipe: local, proto: proto}, nil
}

// Stream is a network.Stream over one end of net.Pipe. A pipe has no half
// close: CloseWrite and CloseRead do nothing, and Reset closes.
type Stream struct {
	pipe
	proto p2pprotocol.ID
}

// pipe is the embedded net.Conn, named so Stream's Conn method is free.
type pipe = net.Conn

var _ network.Stream = (*Stream)(nil)

// CloseWrite does nothing: a pipe cannot be half closed.
func (s *Stream) CloseWrite() error { return nil }

// CloseRead does nothing: a pipe cannot be half closed.
func (s *Stream) CloseRead() error { return nil }

// Reset closes the pipe.
func (s *Stream) Reset() error { return s.pipe.Close() }

// ResetWithError closes the pipe.
func (s *Stream) ResetWithError(network.StreamErrorCode) error { return s.pipe.Close() }

// ID is the pipe's local address.
func (s *Stream) ID() string { return fmt.Sprintf("%p", s) }

// Protocol is the protocol the stream was opened for.
func (s *Stream) Protocol() p2pprotocol.ID { return s.proto }

// SetProtocol sets the stream's protocol.
func (s *Stream) SetProtocol(id p2pprotocol.ID) error { s.proto = id; return nil }

// Stat reports nothing.
func (s *Stream) Stat() network.Stats { return network.Stats{} }

// Conn is nil: a pipe has no libp2p connection.
func (s *Stream) Conn() network.Conn { return nil }

// Scope is the null scope.
func (s *Stream) Scope() network.StreamScope { return &network.NullScope{} }
