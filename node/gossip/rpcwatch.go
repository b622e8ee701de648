package gossip

import (
	"context"
	"errors"
	"log/slog"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio"
)

// rpcWatch is gossipsub's RPC logger. gossipsub refuses an inbound RPC
// over MaxRPC (before reading it), an RPC whose control part is over its
// control cap, and an RPC that does not decode, by resetting the stream
// and logging; it has no other hook for them. No honest peer sends any of
// these (it splits RPCs to the same cap), so rpcWatch cuts the sender off
// (the Guard: banned, graylisted, disconnected) and counts it. Records it
// does not act on go to next when next logs their level, except the
// per-RPC "received" and "sent" traces.
type rpcWatch struct {
	guard   Guard
	metrics *metrics
	next    slog.Handler
}

// Messages of go-libp2p-pubsub v0.19's comm.go that rpcWatch acts on.
const (
	rpcReadError      = "error reading rpc"
	rpcBogus          = "bogus rpc from"
	rpcControlTooBig  = "RPC's control message is too large"
	rpcReceivedTrace  = "received"
	rpcSentTrace      = "sent"
	reasonRPCTooLarge = "rpc_too_large"
)

func (w *rpcWatch) Enabled(context.Context, slog.Level) bool { return true }

func (w *rpcWatch) Handle(ctx context.Context, r slog.Record) error {
	var from peer.ID
	var cause error
	r.Attrs(func(a slog.Attr) bool {
		switch v := a.Value.Any().(type) {
		case peer.ID:
			from = v
		case error:
			cause = v
		}
		return true
	})
	reason := ""
	switch {
	case r.Message == rpcReadError && errors.Is(cause, msgio.ErrMsgTooLarge):
		reason = reasonRPCTooLarge
	case strings.HasPrefix(r.Message, rpcControlTooBig):
		reason = "control_too_large"
	case r.Message == rpcBogus:
		reason = "rpc_malformed"
	case r.Message == rpcReceivedTrace || r.Message == rpcSentTrace:
		return nil
	}
	if reason != "" && from != "" {
		w.metrics.rpcRefused(reason)
		w.guard.Penalize(from, "gossip", reason)
		return nil
	}
	if w.next.Enabled(ctx, r.Level) {
		return w.next.Handle(ctx, r)
	}
	return nil
}

func (w *rpcWatch) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &rpcWatch{guard: w.guard, metrics: w.metrics, next: w.next.WithAttrs(attrs)}
}

func (w *rpcWatch) WithGroup(name string) slog.Handler {
	return &rpcWatch{guard: w.guard, metrics: w.metrics, next: w.next.WithGroup(name)}
}
