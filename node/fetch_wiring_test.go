package node

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// The node wires the fetch protocol on its host: another node fetches a
// bundle of a shard it holds (verified), a miss of a held shard is
// NOT_FOUND and a key of a shard it does not hold NOT_HOLDER. (The protocol
// itself is tested in node/fetch without sockets.)
func TestFetchIsWiredOnTheHost(t *testing.T) {
	n, _ := testNode(t, func(c *Config) {
		c.Shards, _ = protocol.ParseShardSet("0", protocol.DefaultShardCount)
	})
	other, _ := testNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := other.host.Connect(ctx, peer.AddrInfo{ID: n.PeerID(), Addrs: n.host.Addrs()}); err != nil {
		t.Fatal(err)
	}
	var held, missing, foreign *protocol.Bundle
	for i := byte(80); held == nil || missing == nil || foreign == nil; i++ {
		b := protocol.SignBundle(nodetest.SeedKey(i), nowMS(), []byte("an opaque keypackage"))
		switch {
		case protocol.Shard(b.DeviceID, protocol.DefaultShardCount) != 0:
			if foreign == nil {
				foreign = &b
			}
		case held == nil:
			held = &b
		case missing == nil:
			missing = &b
		}
	}
	if _, err := n.Ingest(ctx, held); err != nil {
		t.Fatal(err)
	}
	got, err := other.FetchLatest(ctx, n.PeerID(), held.DeviceID)
	if err != nil || string(got.Payload) != string(held.Payload) {
		t.Fatalf("FetchLatest of a held shard: %v", err)
	}
	if _, err := other.fetchClient.Request(ctx, n.PeerID(), &pb.FetchRequest{Kind: pb.FetchRequest_KIND_LATEST, Key: missing.DeviceID[:]}); !errors.Is(err, fetch.ErrNoRecord) {
		t.Fatalf("miss of a held shard: %v, want ErrNoRecord", err)
	}
	if _, err := other.FetchLatest(ctx, n.PeerID(), foreign.DeviceID); !errors.Is(err, fetch.ErrNotHeld) {
		t.Fatalf("key of a shard not held: %v, want ErrNotHeld", err)
	}
}
