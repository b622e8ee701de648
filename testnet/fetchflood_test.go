package testnet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	p2pprotocol "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// Problem 3 (fetch): 1,000 KIND_ALL requests from three hostile peers (16
// streams each, the per-peer limit) for a device holding 100 bundles of
// 60 KB grow the node's heap by less than 100 MiB, and an honest client's
// GETs keep being answered meanwhile. (Before the fetch budgets each
// request held the device's 6 MB twice over.)
func TestFetchAllFloodBoundsMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test in -short mode")
	}
	c := startCluster(t, 1, func(_ int, cfg *node.Config) { cfg.Policy.MLS = protocol.MLSOff; cfg.MaxPerDevice = 100 })
	n := c.Nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, dev, _ := ed25519.GenerateKey(rand.Reader)
	start := uint64(time.Now().Add(-time.Hour).UnixMilli())
	for i := 0; i < 100; i++ {
		kp := make([]byte, 60_000-protocol.TimestampSize)
		rand.Read(kp)
		b := protocol.SignBundle(dev, start+uint64(i)*1000, kp)
		if err := n.SubmitBundle(ctx, &b); err != nil {
			t.Fatal(err)
		}
	}
	device := protocol.Key(dev.Public().(ed25519.PublicKey))
	small, _ := newBundle(t)
	if err := n.SubmitBundle(ctx, &small); err != nil {
		t.Fatal(err)
	}

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var peak atomic.Uint64
	stopSampling := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-tick.C:
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				if ms.HeapInuse > peak.Load() {
					peak.Store(ms.HeapInuse)
				}
			}
		}
	}()

	proto := p2pprotocol.ID(protocol.FetchProtocol(n.NetworkID()))
	const attackers, streams, total = 3, 16, 1000
	var next atomic.Int64
	var served, failed atomic.Int64
	var wg sync.WaitGroup
	for a := 0; a < attackers; a++ {
		h := rawHost(t)
		id := connectTo(t, ctx, h, n)
		for w := 0; w < streams; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for next.Add(1) <= total {
					s, err := h.NewStream(ctx, id, proto)
					if err != nil {
						failed.Add(1)
						continue
					}
					s.SetDeadline(time.Now().Add(30 * time.Second))
					if err := pbio.NewDelimitedWriter(s).WriteMsg(&pb.FetchRequest{Kind: pb.FetchRequest_KIND_ALL, Key: device[:]}); err != nil {
						s.Reset()
						failed.Add(1)
						continue
					}
					s.CloseWrite()
					if _, err := io.Copy(io.Discard, s); err != nil {
						failed.Add(1)
					} else {
						served.Add(1)
					}
					s.Close()
				}
			}()
		}
	}
	// An honest client GETs the small bundle while the flood runs.
	hc := &http.Client{Timeout: 10 * time.Second}
	url := fmt.Sprintf("http://%s/v0/keypackage/%s", n.APIAddr(), small.DeviceID)
	floodDone := make(chan struct{})
	go func() { wg.Wait(); close(floodDone) }()
	var lat []time.Duration
	for running := true; running; {
		select {
		case <-floodDone:
			running = false
		default:
		}
		t0 := time.Now()
		resp, err := hc.Get(url)
		if err != nil {
			t.Fatalf("honest GET during the flood: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("honest GET during the flood: %d", resp.StatusCode)
		}
		lat = append(lat, time.Since(t0))
	}
	close(stopSampling)
	sampler.Wait()
	slices.Sort(lat)
	growth := int64(peak.Load()) - int64(base)
	t.Logf("%d KIND_ALL requests answered, %d failed; heap in use %d MiB before, peak growth %d MiB; honest GETs %d, p50 %v, p99 %v",
		served.Load(), failed.Load(), base>>20, growth>>20, len(lat), lat[len(lat)/2], lat[len(lat)*99/100])
	if growth > 100<<20 {
		t.Fatalf("heap grew by %d MiB under the flood, want < 100 MiB", growth>>20)
	}
}
