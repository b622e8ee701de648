package fetch

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch/fetchtest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

const testProto = "/kpnode/test/fetch/1.0.0"

var (
	clientID = peer.ID("client")
	holderID = peer.ID("holder")
)

func testPolicy() protocol.Policy {
	p := protocol.DefaultPolicy()
	p.MLS = protocol.MLSOff
	return p
}

func nowMS() uint64 { return uint64(time.Now().UnixMilli()) }

// putBundle validates b and stores it, as the node's ingest path does.
func putBundle(t testing.TB, st *storage.Store, b *protocol.Bundle) {
	t.Helper()
	info, err := testPolicy().ValidateBundle(b, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.PutBundle(context.Background(), &storage.Bundle{Bundle: *b, BundleInfo: info}); err != nil {
		t.Fatal(err)
	}
}

func putAccount(t testing.TB, st *storage.Store, a *protocol.AccountBundle) {
	t.Helper()
	lamport, err := testPolicy().ValidateAccount(a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.PutAccount(context.Background(), &storage.Account{AccountBundle: *a, Lamport: lamport}, storage.AccountConverge); err != nil {
		t.Fatal(err)
	}
}

// rig is a fetch Server and Client connected by net.Pipe: the client's
// streams to holderID reach the server.
type rig struct {
	store  *storage.Store
	srv    *Server
	cli    *Client
	pipes  *fetchtest.Pipes
	reg    *prometheus.Registry
	served *prometheus.CounterVec
}

func newRig(t testing.TB, mutate func(*ServerConfig, *ClientConfig)) *rig {
	t.Helper()
	r := &rig{store: nodetest.OpenStore(t, storage.Options{}), pipes: fetchtest.New(clientID), reg: prometheus.NewRegistry()}
	sc := ServerConfig{Protocol: testProto, Store: r.store, Holds: func(protocol.Key) bool { return true },
		Logger: nodetest.QuietLogger(), Registerer: r.reg}
	cc := ClientConfig{Protocol: testProto, Opener: r.pipes, Validator: PolicyValidator{Policy: testPolicy()}}
	if mutate != nil {
		mutate(&sc, &cc)
	}
	var err error
	if r.srv, err = NewServer(sc); err != nil {
		t.Fatal(err)
	}
	if err := r.srv.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.srv.Close(); r.pipes.Wait() })
	r.served = r.srv.served
	r.pipes.Handle(holderID, func(s network.Stream, from peer.ID) { r.srv.Handle(s, from) })
	if r.cli, err = NewClient(cc); err != nil {
		t.Fatal(err)
	}
	return r
}

// raw sends req as a whole stream's request to the rig's server and
// returns every byte it answered before it ended the stream.
func (r *rig) raw(t testing.TB, req []byte) []byte {
	t.Helper()
	local, remote := net.Pipe()
	done := make(chan struct{})
	go func() { defer close(done); r.srv.Handle(remote, clientID) }()
	go func() { _, _ = local.Write(req) }()
	_ = local.SetDeadline(time.Now().Add(10 * time.Second))
	got, _ := io.ReadAll(local)
	local.Close()
	<-done
	return got
}

func (r *rig) servedCount(status string) float64 {
	return nodetest.Value(r.served.WithLabelValues(status))
}

func delimited(t testing.TB, msgs ...proto.Message) []byte {
	t.Helper()
	var out []byte
	for _, m := range msgs {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out = binary.AppendUvarint(out, uint64(len(b)))
		out = append(out, b...)
	}
	return out
}

// within fails t unless f returns within limit of wall time.
func within(t testing.TB, limit time.Duration, what string, f func()) time.Duration {
	t.Helper()
	start := time.Now()
	f()
	d := time.Since(start)
	if d > limit {
		t.Fatalf("%s took %v, want under %v", what, d, limit)
	}
	return d
}
