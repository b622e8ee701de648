// Package nodetest holds the helpers the tests of the node packages and
// of testnet share: polling with a deadline, reading metrics, listing
// goroutines for leak checks, opening a real Badger store in a temporary
// directory, linked in-memory libp2p hosts. Only test files import it.
package nodetest

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kpnode/kpnode/storage"
)

// WaitFor polls cond until it holds, failing t once d has passed. It polls
// every millisecond at first and backs off to every 10 ms, so a cheap
// condition is seen at once and an expensive one is not run in a loop.
func WaitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for pause := time.Millisecond; !cond(); pause = min(2*pause, 10*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(pause)
	}
}

// Mocknet starts go-libp2p's in-memory network with n hosts, every pair
// of them linked (not connected); t's cleanup closes it.
func Mocknet(t testing.TB, n int) (mocknet.Mocknet, []host.Host) {
	t.Helper()
	mn := mocknet.New()
	t.Cleanup(func() { mn.Close() })
	hs := make([]host.Host, n)
	for i := range hs {
		h, err := mn.GenPeer()
		if err != nil {
			t.Fatal(err)
		}
		hs[i] = h
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	return mn, hs
}

// Stacks returns the stacks of every goroutine, in runtime.Stack's format.
func Stacks() string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return string(buf[:n])
		}
		buf = make([]byte, 2*len(buf))
	}
}

// Goroutines returns the stacks of the goroutines running non-test code of
// the package in directory dir of the module ("node/gossip").
func Goroutines(dir string) []string {
	var out []string
	for _, s := range strings.Split(Stacks(), "\n\n") {
		if strings.Contains(s, "/"+dir+"/") && !strings.Contains(s, "_test.go") {
			out = append(out, s)
		}
	}
	return out
}

// Counter adds up the samples of the counter family name gathered from g
// whose labels include every pair of labels (name, value, name, value...).
// Without labels the family must be gathered (a plain counter always is,
// so a missing one is a misspelt name); with labels a vector that has no
// such series yet reads 0.
func Counter(t testing.TB, g prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	if len(labels)%2 != 0 {
		t.Fatalf("Counter %s: labels %q are not name/value pairs", name, labels)
	}
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var sum float64
		for _, m := range mf.GetMetric() {
			if hasLabels(m, labels) {
				sum += m.GetCounter().GetValue()
			}
		}
		return sum
	}
	if len(labels) == 0 {
		t.Fatalf("metric %s not registered", name)
	}
	return 0
}

func hasLabels(m *dto.Metric, pairs []string) bool {
	for i := 0; i < len(pairs); i += 2 {
		found := false
		for _, l := range m.GetLabel() {
			if l.GetName() == pairs[i] && l.GetValue() == pairs[i+1] {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// Value reads the value of one counter or gauge (a vector's
// WithLabelValues, say).
func Value(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		panic(err)
	}
	if d.Gauge != nil {
		return d.GetGauge().GetValue()
	}
	return d.GetCounter().GetValue()
}

// Scrape adds up the samples of metric name that h serves on GET /metrics
// in the text format, over the lines that contain every one of match
// (label pairs such as `role="initiator"`).
func Scrape(t testing.TB, h http.Handler, name string, match ...string) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	total := 0.0
	sc := bufio.NewScanner(rec.Body)
	sc.Buffer(nil, 1<<20)
lines:
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		for _, m := range match {
			if !strings.Contains(line, m) {
				continue lines
			}
		}
		v, _ := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		total += v
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading /metrics: %v", err)
	}
	return total
}

// QuietLogger logs nothing.
func QuietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// SeedKey returns the Ed25519 key whose seed is 32 bytes of b.
func SeedKey(b byte) ed25519.PrivateKey {
	return ed25519.NewKeyFromSeed(bytes.Repeat([]byte{b}, 32))
}

// OpenStore opens a real Badger store with o in a temporary directory
// (unless o names one) without fsync or the free-disk check, logging
// nothing unless o has a logger; t's cleanup closes it.
func OpenStore(t testing.TB, o storage.Options) *storage.Store {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	if o.Logger == nil {
		o.Logger = QuietLogger()
	}
	o.NoSync, o.MinFreeDisk = true, -1
	st, err := storage.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}
