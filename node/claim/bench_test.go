package claim

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/ingest"
)

// fill stores devices × perDevice one-time bundles (and a last-resort one
// each) in n's store.
func fill(b *testing.B, c *cluster, n *testNode, seed0 byte, devices, perDevice int) []*pool {
	b.Helper()
	var ps []*pool
	for d := range devices {
		p := newPool(b, c.clock, seed0+byte(d), perDevice)
		p.storeIn(b, n)
		ps = append(ps, p)
	}
	return ps
}

func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkClaimAtHolder: one-time claims at a holder that owns every ref
// (real Badger): sign, record (the store's atomic claim write), publish.
// The pools are refilled, untimed, when used up.
func BenchmarkClaimAtHolder(b *testing.B) {
	c := newCluster(b)
	n := c.add(1, false, unlimited)
	c.agree()
	const devices, per = 10, 99 // the store keeps 100 per device, with the last-resort one
	seed := byte(100)
	ps := fill(b, c, n, seed, devices, per)
	ctx := context.Background()
	i := 0
	b.ResetTimer()
	for b.Loop() {
		if i == devices*per {
			b.StopTimer()
			seed += devices
			ps, i = fill(b, c, n, seed, devices, per), 0
			b.StartTimer()
		}
		r, err := n.svc.Claim(ctx, Request{Requester: "bench", Device: ps[i%devices].dev, Source: ingest.SourceHTTP})
		if err != nil || r.LastResort {
			b.Fatalf("claim %d: %v (last resort %v)", i, err, r.LastResort)
		}
		i++
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "claims/s")
}

// BenchmarkClaimThroughHolder: a node that does not hold the shard claims
// through a holder over fetch (net.Pipe, so no transport cost), next to a
// fetch KIND_LATEST round trip to the same holder, its ceiling.
func BenchmarkClaimThroughHolder(b *testing.B) {
	c := newCluster(b)
	h := c.add(1, false, unlimited)
	c.agree()
	l := c.add(2, true, unlimited)
	const devices, per = 10, 99 // the store keeps 100 per device, with the last-resort one
	seed := byte(100)
	ps := fill(b, c, h, seed, devices, per)
	ctx := context.Background()
	b.Run("claim", func(b *testing.B) {
		// Fresh pools for every run of this sub-benchmark (-count).
		seed += devices
		ps = fill(b, c, h, seed, devices, per)
		var lat []time.Duration
		i := 0
		for b.Loop() {
			if i == devices*per {
				b.StopTimer()
				seed += devices
				ps, i = fill(b, c, h, seed, devices, per), 0
				b.StartTimer()
			}
			start := time.Now()
			r, err := l.svc.Claim(ctx, Request{Requester: "bench", Device: ps[i%devices].dev, Source: ingest.SourceHTTP})
			lat = append(lat, time.Since(start))
			if err != nil || r.LastResort {
				b.Fatalf("claim %d: %v", i, err)
			}
			i++
		}
		reportLatency(b, lat)
	})
	b.Run("fetch-latest", func(b *testing.B) {
		cli := l.svc.cfg.Client.(*fetch.Client)
		var lat []time.Duration
		i := 0
		for b.Loop() {
			start := time.Now()
			_, err := cli.FetchLatest(ctx, h.id, ps[i%devices].dev)
			lat = append(lat, time.Since(start))
			if err != nil {
				b.Fatal(err)
			}
			i++
		}
		reportLatency(b, lat)
	})
}

func unlimited(cfg *Config) {
	cfg.RequesterRate, cfg.RequesterBurst = 1e9, 1e9
	cfg.DeviceRate, cfg.DeviceBurst = 1e9, 1e9
	cfg.SignRate, cfg.SignBurst = 1e9, 1e9
}
