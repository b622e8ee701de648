package testnet

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/node/discovery"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/testnet/simnet"
)

// liar is a raw libp2p host that joins the network's DHT, provides every
// shard, and answers every fetch at once with an old, validly signed record
// (the one in its tables), as a hostile or stale holder would.
type liar struct {
	h        host.Host
	dht      *dht.IpfsDHT
	mu       sync.Mutex
	accounts map[protocol.Key]protocol.AccountBundle
	bundles  map[protocol.Key]protocol.Bundle
}

func startLiar(t *testing.T, ctx context.Context, nw *simnet.Network, n *node.Node) *liar {
	t.Helper()
	h := simHost(t, nw)
	l := &liar{h: h, accounts: map[protocol.Key]protocol.AccountBundle{}, bundles: map[protocol.Key]protocol.Bundle{}}
	h.SetStreamHandler(p2pprotocol.ID(protocol.FetchProtocol(n.NetworkID())), l.serve)
	d, err := dht.New(h, dht.Mode(dht.ModeServer), dht.ProtocolPrefix(p2pprotocol.ID(protocol.DHTPrefix(n.NetworkID()))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	l.dht = d
	connectTo(t, ctx, h, n)
	return l
}

// provide announces every shard; it retries until the DHT takes it.
func (l *liar) provide(t *testing.T, ctx context.Context, netID string) {
	t.Helper()
	if err := eventually(ctx, func() bool { return l.dht.RoutingTable().Size() > 0 }); err != nil {
		t.Fatal("liar never joined the DHT")
	}
	for s := 0; s < protocol.DefaultShardCount; s++ {
		if err := l.dht.Provide(ctx, discovery.ShardCID(netID, s), true); err != nil {
			t.Fatalf("liar provide shard %d: %v", s, err)
		}
	}
}

func (l *liar) serve(s network.Stream) {
	defer s.Close()
	var req pb.FetchRequest
	if err := pbio.NewDelimitedReader(s, 256).ReadMsg(&req); err != nil {
		s.Reset()
		return
	}
	var key protocol.Key
	copy(key[:], req.Key)
	resp := &pb.FetchResponse{Status: pb.FetchResponse_STATUS_NOT_FOUND}
	l.mu.Lock()
	if a, ok := l.accounts[key]; ok && req.Kind == pb.FetchRequest_KIND_ACCOUNT {
		resp = &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Account: &pb.AccountBundle{
			AccountPub: a.AccountPub[:], Payload: a.Payload, Signature: a.Signature[:], UpdatedAtMs: time.Now().UnixMilli()}}
	}
	if b, ok := l.bundles[key]; ok && (req.Kind == pb.FetchRequest_KIND_LATEST || req.Kind == pb.FetchRequest_KIND_ALL) {
		resp = &pb.FetchResponse{Status: pb.FetchResponse_STATUS_OK, Bundles: []*pb.Bundle{{DeviceId: b.DeviceID[:], Payload: b.Payload, Signature: b.Signature[:]}}}
	}
	l.mu.Unlock()
	pbio.NewDelimitedWriter(s).WriteMsg(resp)
}

// getPayload GETs path on n's API (its handler, in process) and returns the
// status and the payload.
func getPayload(t *testing.T, n *node.Node, path string) (int, []byte, string) {
	t.Helper()
	resp, err := (&http.Client{Transport: handlerTransport{n.Handler()}}).Get("http://node.invalid" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Payload string `json:"payload"`
		Error   string `json:"error"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatalf("GET %s: %d %q is not JSON", path, resp.StatusCode, body)
	}
	p, _ := base64.StdEncoding.DecodeString(v.Payload)
	return resp.StatusCode, p, v.Error
}

// A dozen hostile holders answer every fetch at once with an old, validly
// signed record while three honest holders have the new one: a light node
// serves the new account bundle (a revoked device gone) and the newer
// KeyPackage every time, and after a restart with a cold cache it still
// refuses the old records (503) when only the liars answer, because it
// remembers on disk the version it served. The network is simulated, in
// virtual time; the light node's store is on disk.
func TestLightNodeCannotBeRolledBack(t *testing.T) {
	synctest.Test(t, lightNodeCannotBeRolledBack)
}

func lightNodeCannotBeRolledBack(t *testing.T) {
	const (
		honest = 3
		liars  = 12
		keys   = 32
	)
	dir := t.TempDir()
	nw := startSim(t, simnet.Options{Full: honest, Light: 1, ShardCount: protocol.DefaultShardCount, MLS: protocol.MLSOff,
		NodeConfig: func(i int, cfg *node.Config) {
			if i < honest {
				cfg.Shards = protocol.AllShards(protocol.DefaultShardCount)
				return
			}
			// The light node keeps its lookup floors on disk, across the
			// restart below.
			cfg.InMemory = false
			cfg.DataDir = dir
			// Generous for a race-enabled run on a loaded machine; the
			// default is DefaultLookupGrace.
			cfg.LookupGrace = time.Second
			cfg.LookupTimeout = 5 * time.Second
		}})
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	var holders []*node.Node
	for _, n := range nw.Nodes[:honest] {
		holders = append(holders, n.Node)
	}
	netID := holders[0].NetworkID()

	// keys accounts revoke a device (v1 names two, v2 one); keys devices
	// publish a newer KeyPackage (b2 after b1). The honest holders get both,
	// the liars keep the old ones. One more account the light node never
	// looks up before the restart shows what the liars serve without a floor.
	type acct struct{ v1, v2 protocol.AccountBundle }
	var accts []acct
	var devs [][2]protocol.Bundle
	ts := uint64(time.Now().UnixMilli()) - 10_000
	for i := 0; i <= keys; i++ {
		_, k, _ := ed25519.GenerateKey(rand.Reader)
		var d1, d2 protocol.Key
		rand.Read(d1[:])
		rand.Read(d2[:])
		accts = append(accts, acct{
			v1: protocol.SignAccount(k, protocol.EncodeAccountPayload(1, []protocol.Key{d1, d2})),
			v2: protocol.SignAccount(k, protocol.EncodeAccountPayload(2, []protocol.Key{d1})),
		})
		_, dk, _ := ed25519.GenerateKey(rand.Reader)
		kp1, kp2 := make([]byte, 300), make([]byte, 300)
		rand.Read(kp1)
		rand.Read(kp2)
		devs = append(devs, [2]protocol.Bundle{protocol.SignBundle(dk, ts, kp1), protocol.SignBundle(dk, ts+1000, kp2)})
	}
	for i := range accts {
		for _, a := range []protocol.AccountBundle{accts[i].v1, accts[i].v2} {
			if err := holders[i%honest].SubmitAccount(ctx, &a); err != nil {
				t.Fatal(err)
			}
		}
		for _, b := range devs[i] {
			if err := holders[i%honest].SubmitBundle(ctx, &b); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, n := range holders {
		for j := range accts {
			if err := eventually(ctx, func() bool { a, err := n.Account(ctx, accts[j].v2.AccountPub); return err == nil && a.Lamport == 2 }); err != nil {
				t.Fatalf("honest node %d never got account %d", i, j)
			}
			if err := waitServed(ctx, n, devs[j][1]); err != nil {
				t.Fatalf("honest node %d: %v", i, err)
			}
		}
	}

	var ls []*liar
	for range liars {
		l := startLiar(t, ctx, nw, holders[0])
		for _, a := range accts {
			l.accounts[a.v1.AccountPub] = a.v1
		}
		for _, d := range devs {
			l.bundles[d[0].DeviceID] = d[0]
		}
		ls = append(ls, l)
	}
	for _, l := range ls {
		l.provide(t, ctx, netID)
	}

	lightIdx := honest
	light := nw.Nodes[lightIdx].Node
	if err := eventually(ctx, func() bool { return light.DHTPeers() > 0 }); err != nil {
		t.Fatal(err)
	}

	newAccounts, newBundles := 0, 0
	for i := 0; i < keys; i++ {
		code, p, _ := getPayload(t, light, "/v0/account/"+accts[i].v2.AccountPub.String())
		if code == 200 && bytes.Equal(p, accts[i].v2.Payload) {
			newAccounts++
		} else if code != 200 || !bytes.Equal(p, accts[i].v1.Payload) {
			t.Fatalf("account %d: %d, neither version", i, code)
		}
		code, p, _ = getPayload(t, light, "/v0/keypackage/"+devs[i][1].DeviceID.String())
		if code == 200 && bytes.Equal(p, devs[i][1].Payload) {
			newBundles++
		} else if code != 200 || !bytes.Equal(p, devs[i][0].Payload) {
			t.Fatalf("device %d: %d, neither version", i, code)
		}
	}
	t.Logf("with %d liars and %d honest holders: new account bundle in %d of %d GETs, newer KeyPackage in %d of %d",
		liars, honest, newAccounts, keys, newBundles, keys)
	if newAccounts != keys || newBundles != keys {
		t.Fatalf("rolled back: new account bundle in %d of %d GETs, newer KeyPackage in %d of %d", newAccounts, keys, newBundles, keys)
	}

	// Only the liars are left; the light node restarts with a cold cache.
	if err := nw.Stop(lightIdx); err != nil {
		t.Fatal(err)
	}
	for i := range honest {
		nw.Stop(i)
	}
	if err := nw.Restart(ctx, lightIdx, func(cfg *node.Config) {
		cfg.Bootstrap = nil
		for _, l := range ls {
			for _, a := range l.h.Addrs() {
				cfg.Bootstrap = append(cfg.Bootstrap, fmt.Sprintf("%s/p2p/%s", a, l.h.ID()))
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	light = nw.Nodes[lightIdx].Node
	if err := eventually(ctx, func() bool { return light.DHTPeers() > 0 }); err != nil {
		t.Fatal(err)
	}
	// Without a floor the liars' record is all there is: it is served.
	control := accts[keys]
	if code, p, _ := getPayload(t, light, "/v0/account/"+control.v1.AccountPub.String()); code != 200 || !bytes.Equal(p, control.v1.Payload) {
		t.Fatalf("the liars do not answer (%d): the check below would prove nothing", code)
	}
	old := 0
	for i := 0; i < keys; i++ {
		for _, path := range []string{"/v0/account/" + accts[i].v2.AccountPub.String(), "/v0/keypackage/" + devs[i][1].DeviceID.String()} {
			code, _, msg := getPayload(t, light, path)
			switch code {
			case 503:
				if msg != "registry network unreachable, try again" {
					t.Fatalf("503 with %q", msg)
				}
			case 200:
				old++
			default:
				t.Fatalf("GET %s after restart: %d %q", path, code, msg)
			}
		}
	}
	if old > 0 {
		t.Fatalf("after a restart with only liars left, %d of %d GETs served a rolled-back record", old, 2*keys)
	}
}
