package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"fmt"
	"time"

	"github.com/ipfs/go-cid"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/node/discovery"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/testnet/launch/realnet"
)

// liar is a hostile holder: a DHT server that provides every shard and
// answers fetches of an account with the old, correctly signed version.
type liar struct {
	h   host.Host
	dht *dht.IpfsDHT
}

func (l *liar) close() { l.dht.Close(); l.h.Close() }

func startLiar(ctx context.Context, netID string, old map[protocol.Key]*protocol.AccountBundle, peers []peer.AddrInfo) (*liar, error) {
	h, err := newHost()
	if err != nil {
		return nil, err
	}
	d, err := dht.New(h, dht.Mode(dht.ModeServer), dht.ProtocolPrefix(p2pprotocol.ID(protocol.DHTPrefix(netID))))
	if err != nil {
		h.Close()
		return nil, err
	}
	l := &liar{h: h, dht: d}
	h.SetStreamHandler(p2pprotocol.ID(protocol.FetchProtocol(netID)), func(s network.Stream) {
		defer s.Close()
		s.SetDeadline(time.Now().Add(10 * time.Second))
		var req pb.FetchRequest
		if err := pbio.NewDelimitedReader(s, 1024).ReadMsg(&req); err != nil {
			s.Reset()
			return
		}
		resp := &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND}
		var k protocol.Key
		copy(k[:], req.Key)
		if a, ok := old[k]; ok && req.Kind == pb.FetchRequest_KIND_ACCOUNT {
			resp = &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Account: &pb.AccountBundle{
				AccountPub: a.AccountPub[:], Payload: a.Payload, Signature: a.Signature[:], UpdatedAtMs: time.Now().UnixMilli()}}
		}
		pbio.NewDelimitedWriter(s).WriteMsg(resp)
	})
	for _, p := range peers {
		if err := h.Connect(ctx, p); err != nil {
			l.close()
			return nil, err
		}
	}
	if err := d.Bootstrap(ctx); err != nil {
		l.close()
		return nil, err
	}
	return l, nil
}

// attackRollback: two honest full nodes hold the new version of 32 account
// bundles; -liars hostile holders in the DHT serve the old version; a light
// node is asked once for each account. Counted: answers that are the new
// version.
func attackRollback(ctx context.Context, o attackOpts) (*attackResult, error) {
	const accounts = 32
	c := realnet.NewCluster(o.bin, o.dir, "kpbench-rollback")
	defer c.Close()
	n1, err := c.Add(ctx, nil)
	if err != nil {
		return nil, err
	}
	n2, err := c.Add(ctx, []string{n1.Addr})
	if err != nil {
		return nil, err
	}
	light, err := c.Add(ctx, []string{n1.Addr}, "--light")
	if err != nil {
		return nil, err
	}
	for _, n := range c.Nodes {
		if _, err := n.WaitStatus(ctx, 60*time.Second, func(s realnet.Status) bool { return s.Ready }); err != nil {
			return nil, err
		}
	}
	st, err := n1.Status(ctx)
	if err != nil {
		return nil, err
	}
	netID := networkIDOf(st)
	old := map[protocol.Key]*protocol.AccountBundle{}
	var newer []*protocol.AccountBundle
	dev := ed25519Key()
	var devKey protocol.Key
	copy(devKey[:], dev.Public().(ed25519.PublicKey))
	for i := 0; i < accounts; i++ {
		k := ed25519Key()
		a1 := protocol.SignAccount(k, protocol.EncodeAccountPayload(1, []protocol.Key{devKey, randomKey()}))
		a2 := protocol.SignAccount(k, protocol.EncodeAccountPayload(2, []protocol.Key{devKey}))
		if err := n1.Client.PublishAccount(ctx, &a1); err != nil {
			return nil, err
		}
		if err := n1.Client.PublishAccount(ctx, &a2); err != nil {
			return nil, err
		}
		old[a1.AccountPub] = &a1
		newer = append(newer, &a2)
	}
	if _, err := n2.WaitStatus(ctx, 30*time.Second, func(s realnet.Status) bool { return s.Accounts >= accounts }); err != nil {
		return nil, err
	}
	r := &attackResult{scenario: "rollback", what: fmt.Sprintf("%d hostile DHT holders serve the old version of %d account bundles to a light node; 2 honest holders have the new one", o.liars, accounts)}
	var infos []peer.AddrInfo
	for _, n := range c.Nodes {
		ai, err := peer.AddrInfoFromString(n.Addr)
		if err != nil {
			return nil, err
		}
		infos = append(infos, *ai)
	}
	var cids []cid.Cid
	for s := 0; s < st.ShardCount; s++ {
		cids = append(cids, discovery.ShardCID(netID, s))
	}
	for i := 0; i < o.liars; i++ {
		l, err := startLiar(ctx, netID, old, infos)
		if err != nil {
			return nil, err
		}
		defer l.close()
		for _, k := range cids {
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := l.dht.Provide(pctx, k, true)
			cancel()
			if err != nil {
				return nil, fmt.Errorf("liar %d: provide: %w", i, err)
			}
		}
	}
	fmt.Fprintf(o.out, "%d liars provide every shard; asking the light node for each account once\n", o.liars)
	ask := func() (fresh int) {
		for _, a := range newer {
			t0 := time.Now()
			got, err := light.Client.FetchAccount(ctx, a.AccountPub)
			r.gets = append(r.gets, time.Since(t0))
			switch {
			case err != nil:
				r.getErrors++
			case bytes.Equal(got.Payload, a.Payload):
				fresh++
			}
		}
		return fresh
	}
	r.rollbackOf = accounts
	r.rollbackNew = ask()
	// A restart empties the light node's cache: what it saw before must not
	// be forgotten.
	if err := light.Stop(); err != nil {
		return r, err
	}
	if err := light.Start(ctx); err != nil {
		return r, err
	}
	if _, err := light.WaitStatus(ctx, 60*time.Second, func(s realnet.Status) bool { return s.Ready }); err != nil {
		return r, err
	}
	r.rollbackAfterRestart = ask()
	return r, nil
}

func randomKey() protocol.Key {
	var k protocol.Key
	copy(k[:], ed25519Key().Public().(ed25519.PublicKey))
	return k
}
