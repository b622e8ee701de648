package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"
	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/testnet/launch/realnet"
)

// bigBundle is a correctly signed bundle whose KeyPackage carries an
// identity of size bytes.
func bigBundle(dev ed25519.PrivateKey, ts uint64, size int, lastResort bool) (protocol.Bundle, error) {
	id := make([]byte, size)
	for i := range id {
		id[i] = 'a' + byte(i%26)
	}
	kp, _, err := mlstest.Generate(mlstest.Options{Signer: dev, LastResort: lastResort, Identity: id})
	if err != nil {
		return protocol.Bundle{}, err
	}
	return protocol.SignBundle(dev, ts, kp), nil
}

func gossipData(b *protocol.Bundle) []byte {
	d, _ := proto.Marshal(&pb.GossipMessage{Body: &pb.GossipMessage_Bundle{Bundle: &pb.Bundle{
		DeviceId: b.DeviceID[:], Payload: b.Payload, Signature: b.Signature[:]}}})
	return d
}

// gossiper is a gossipsub router on a host, in every bundle topic of the
// node's network, with a message size limit above the node's.
type gossiper struct {
	topics []*pubsub.Topic
	shards int
}

func newGossiper(ctx context.Context, h host.Host, v *victim, shards int) (*gossiper, error) {
	ps, err := pubsub.NewGossipSub(ctx, h, pubsub.WithMessageSignaturePolicy(pubsub.StrictNoSign), pubsub.WithNoAuthor(),
		pubsub.WithMessageIdFn(func(m *pubsubpb.Message) string { s := sha256.Sum256(m.Data); return string(s[:]) }),
		pubsub.WithFloodPublish(true), pubsub.WithMaxMessageSize(8<<20))
	if err != nil {
		return nil, err
	}
	g := &gossiper{shards: shards}
	for s := 0; s < shards; s++ {
		t, err := ps.Join(protocol.BundleTopic(v.netID, s))
		if err != nil {
			return nil, err
		}
		g.topics = append(g.topics, t)
	}
	if err := h.Connect(ctx, v.info); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, t := range g.topics {
		for len(t.ListPeers()) == 0 {
			if time.Now().After(deadline) {
				return nil, errors.New("the node never joined our bundle topics")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return g, nil
}

func (g *gossiper) publish(ctx context.Context, b *protocol.Bundle) error {
	return g.topics[protocol.Shard(b.DeviceID, g.shards)].Publish(ctx, gossipData(b))
}

// waitBundles waits until the node's status counts at least want bundles.
func waitBundles(ctx context.Context, v *victim, want int64, timeout time.Duration) (int64, error) {
	st, err := v.n.WaitStatus(ctx, timeout, func(s realnet.Status) bool { return s.Bundles >= want })
	if err != nil {
		return st.Bundles, fmt.Errorf("%d of %d bundles: %w", st.Bundles, want, err)
	}
	return st.Bundles, nil
}

// attackBigBundle: correctly signed bundles with 2 MB and 70 KB KeyPackages
// gossiped to the node, against honest 3 KB ones from the same router.
func attackBigBundle(ctx context.Context, o attackOpts) (*attackResult, error) {
	v, err := startVictim(ctx, o, o.seed)
	if err != nil {
		return nil, err
	}
	defer v.close()
	st, err := v.n.Status(ctx)
	if err != nil {
		return nil, err
	}
	nBig, nMid := max(1, min(o.requests, 50)/5), max(1, min(o.requests, 50)*4/5)
	r := &attackResult{scenario: "big-bundle", what: fmt.Sprintf("gossip of correctly signed bundles: %d of 2 MB and %d of 70 KB (%d bundles stored)", nBig, nMid, o.seed)}
	fmt.Fprintf(o.out, "generating %d oversized bundles...\n", nBig+nMid)
	var big []protocol.Bundle
	for i := 0; i < nBig+nMid; i++ {
		size := 70_000
		if i < nBig {
			size = 2_000_000
		}
		b, err := bigBundle(ed25519Key(), uint64(time.Now().UnixMilli()), size, true)
		if err != nil {
			return nil, err
		}
		big = append(big, b)
	}
	honestBundles, err := newBundles(40)
	if err != nil {
		return nil, err
	}
	bad, err := newHost()
	if err != nil {
		return nil, err
	}
	defer bad.Close()
	g, err := newGossiper(ctx, bad, v, st.ShardCount)
	if err != nil {
		return nil, err
	}
	before := st.Bundles
	err = phases(ctx, o, v, r, []host.Host{bad},
		func(ctx context.Context) (int, error) {
			// Paced: gossipsub drops what a validator cannot take at once,
			// and an honest peer does not burst.
			for i := range honestBundles {
				if err := g.publish(ctx, &honestBundles[i]); err != nil {
					return i, err
				}
				time.Sleep(20 * time.Millisecond)
			}
			got, err := waitBundles(ctx, v, before+int64(len(honestBundles)), 10*time.Second)
			if err != nil && got > before {
				r.notes = append(r.notes, fmt.Sprintf("honest gossip: %d of %d stored", got-before, len(honestBundles)))
				return int(got - before), nil
			}
			return len(honestBundles), err
		},
		func(ctx context.Context, w *cutWatch) (int, error) {
			sent := 0
			for i := range big {
				if ctx.Err() != nil {
					break
				}
				if err := g.publish(ctx, &big[i]); err != nil {
					w.cut("publish refused: " + err.Error())
					break
				}
				sent++
			}
			<-ctx.Done()
			return sent, nil
		})
	if err != nil {
		return r, err
	}
	after, err := v.n.Status(ctx)
	if err != nil {
		return r, err
	}
	stored := after.Bundles - before - int64(r.honestRounds)
	r.notes = append(r.notes, fmt.Sprintf("oversized bundles the node stored: %d of %d (target 0: the 64 KiB payload cap)", stored, len(big)))
	return r, nil
}

// attackFetchAll: one device holds 100 bundles of ~60 KB; -hosts hostile
// hosts send -requests KIND_ALL fetches for it in all, 32 at a time each,
// against honest KIND_LATEST fetches of ordinary devices.
func attackFetchAll(ctx context.Context, o attackOpts) (*attackResult, error) {
	v, err := startVictim(ctx, o, o.seed)
	if err != nil {
		return nil, err
	}
	defer v.close()
	dev := ed25519Key()
	fmt.Fprintln(o.out, "storing 100 bundles of ~60 KB for one device...")
	now := uint64(time.Now().UnixMilli())
	for i := 0; i < 100; i++ {
		b, err := bigBundle(dev, now-uint64(100-i), 60_000, false)
		if err != nil {
			return nil, err
		}
		if err := v.n.Client.PublishBundle(ctx, &b); err != nil {
			return nil, fmt.Errorf("store device bundle %d: %w", i, err)
		}
	}
	var key protocol.Key
	copy(key[:], dev.Public().(ed25519.PublicKey))
	r := &attackResult{scenario: "fetch-all", what: fmt.Sprintf("%d KIND_ALL fetches from %d hosts for a device holding 100 bundles of 60 KB (%d bundles stored)", o.requests, o.hosts, o.seed)}
	honest, err := newHost()
	if err != nil {
		return nil, err
	}
	defer honest.Close()
	var bad []host.Host
	for i := 0; i < o.hosts; i++ {
		h, err := newHost()
		if err != nil {
			return nil, err
		}
		defer h.Close()
		bad = append(bad, h)
	}
	fetchProto := p2pprotocol.ID(protocol.FetchProtocol(v.netID))
	var bytesIn atomic.Int64
	served := 0
	err = phases(ctx, o, v, r, bad,
		func(ctx context.Context) (int, error) {
			if err := honest.Connect(ctx, v.info); err != nil {
				return 0, err
			}
			// Paced like a light node serving a busy client: 50 a second.
			n := min(100, len(v.bundles))
			t := time.NewTicker(20 * time.Millisecond)
			defer t.Stop()
			for i := 0; i < n; i++ {
				<-t.C
				if _, err := fetchOnce(ctx, honest, v.info.ID, fetchProto, pb.FetchRequest_KIND_LATEST, v.bundles[i].DeviceID); err != nil {
					return i, err
				}
			}
			return n, nil
		},
		func(ctx context.Context, w *cutWatch) (int, error) {
			var answered, attempts, next atomic.Int64
			var wg sync.WaitGroup
			for _, h := range bad {
				if err := h.Connect(ctx, v.info); err != nil {
					return 0, err
				}
				for k := 0; k < 32; k++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for ctx.Err() == nil && next.Add(1) <= int64(o.requests) {
							n, err := fetchOnce(ctx, h, v.info.ID, fetchProto, pb.FetchRequest_KIND_ALL, key)
							if ctx.Err() == nil {
								attempts.Add(1)
							}
							if err != nil {
								if ctx.Err() == nil {
									w.refused()
									select { // a refused attacker retries, gently
									case <-ctx.Done():
									case <-time.After(100 * time.Millisecond):
									}
								}
								continue
							}
							w.served()
							bytesIn.Add(int64(n))
							answered.Add(1)
						}
					}()
				}
			}
			wg.Wait()
			served = int(answered.Load())
			return int(attempts.Load()), nil
		})
	if served > 0 {
		r.notes = append(r.notes, fmt.Sprintf("%d of %d requests answered (the rest refused: busy or reset), %.1f MB and %.1f ms CPU per answer",
			served, r.hostileReqs, float64(bytesIn.Load())/float64(served)/1e6, r.hostileCPU/float64(served)*1000))
	}
	return r, err
}

// fetchOnce sends one fetch request on a new stream and reads the whole
// answer; it returns the answer's size.
func fetchOnce(ctx context.Context, h host.Host, p peer.ID, proto p2pprotocol.ID, kind pb.FetchRequest_Kind, key protocol.Key) (int, error) {
	s, err := h.NewStream(ctx, p, proto)
	if err != nil {
		return 0, err
	}
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Reset() })
	defer stop()
	s.SetDeadline(time.Now().Add(30 * time.Second))
	if err := pbio.NewDelimitedWriter(s).WriteMsg(&pb.FetchRequest{Kind: kind, Key: key[:]}); err != nil {
		s.Reset()
		return 0, err
	}
	s.CloseWrite()
	raw, err := io.ReadAll(io.LimitReader(s, 64<<20))
	if err != nil {
		s.Reset()
		return len(raw), err
	}
	var resp pb.FetchResponse
	if err := pbio.NewDelimitedReader(bytes.NewReader(raw), 64<<20).ReadMsg(&resp); err != nil {
		return len(raw), err
	}
	if resp.Status != pb.FetchResponse_STATUS_OK {
		return len(raw), fmt.Errorf("fetch answered %v", resp.Status)
	}
	return len(raw), nil
}
