package node

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/httpapi/httpapitest"
	"github.com/kpnode/kpnode/protocol"
)

// The client's hot path and ingest, over real loopback HTTP against a real
// node (Badger on disk). Compare with BenchmarkBareHandler, a net/http
// handler serving the same bytes from memory: the ceiling kpbench quotes.
//
//	go test -run '^$' -bench . -benchtime 2s ./node/

func benchClient() *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64}, Timeout: 10 * time.Second}
}

func benchGET(b *testing.B, hc *http.Client, url string) {
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := hc.Get(url)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}

func BenchmarkGetAccount(b *testing.B) {
	n, base := testNode(b, nil)
	a := protocol.SignAccount(nodetest.SeedKey(4), protocol.EncodeAccountPayload(3, []protocol.Key{{1}, {2}}))
	if err := n.SubmitAccount(b.Context(), &a); err != nil {
		b.Fatal(err)
	}
	benchGET(b, benchClient(), base+"/v0/account/"+a.AccountPub.String())
}

func BenchmarkGetKeyPackage(b *testing.B) {
	n, base := testNode(b, nil)
	kp := protocol.SignBundle(nodetest.SeedKey(1), nowMS(), bytes.Repeat([]byte{'k'}, 2800))
	if err := n.SubmitBundle(b.Context(), &kp); err != nil {
		b.Fatal(err)
	}
	benchGET(b, benchClient(), base+"/v0/keypackage/"+kp.DeviceID.String())
}

// BenchmarkBareHandler serves a GET /v0/account-sized reply from memory with
// nothing else: the ceiling for the two benchmarks above.
func BenchmarkBareHandler(b *testing.B) {
	body := []byte(fmt.Sprintf(`{"payload":"%s","signature":"%s","updated_at":1}`, b64.EncodeToString(make([]byte, 105)), b64.EncodeToString(make([]byte, 64))))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	}))
	defer srv.Close()
	benchGET(b, benchClient(), srv.URL+"/v0/account/x")
}

// BenchmarkPostKeyPackage measures ingest: strict verification, Badger write
// with fsync per acknowledged write (as the binary runs), 204.
func BenchmarkPostKeyPackage(b *testing.B) {
	for _, sync := range []bool{true, false} {
		b.Run(fmt.Sprintf("fsync=%v", sync), func(b *testing.B) {
			_, base := testNode(b, func(c *Config) { c.NoSync = !sync })
			hc := benchClient()
			// Pre-sign so the benchmark measures the node, not the client.
			bodies := make([][]byte, b.N)
			for i := range bodies {
				kp := protocol.SignBundle(nodetest.SeedKey(byte(i%200)), nowMS()+uint64(i/200), bytes.Repeat([]byte{'k'}, 512))
				bodies[i] = []byte(httpapitest.MustJSON(httpapitest.BundleJSON(kp)))
			}
			var next atomic.Int64
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					body := bodies[next.Add(1)-1]
					resp, err := hc.Post(base+"/v0/keypackage", "application/json", bytes.NewReader(body))
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 204 {
						b.Errorf("status %d", resp.StatusCode)
						return
					}
				}
			})
		})
	}
}
