package main

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSimSmall runs kpsim's whole scenario on a 20-node network and checks
// that the table has every column and sane values: every holder stored
// every bundle after a positive delay, every lookup from the light node
// succeeded over at least one DHT hop, the rejoined node caught up by sync.
func TestSimSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("simulates a 20-node network")
	}
	c := DefaultConfig()
	c.Sizes = []int{20}
	c.Pubs, c.Lookups, c.RejoinBundles = 5, 3, 3
	c.Warmup = 10 * time.Second
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	r := Simulate(t, c, 20)
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%+v", r)
	switch {
	case r.Full+r.Light != 20 || r.Light < 1:
		t.Errorf("full %d light %d, want 20 nodes with a light one", r.Full, r.Light)
	case r.HoldersPerShard < float64(c.Replication):
		t.Errorf("holders per shard %v < replication %d", r.HoldersPerShard, c.Replication)
	case r.Delivered != 1:
		t.Errorf("delivered %v, want every holder to store every bundle", r.Delivered)
	case !(r.PropP50Ms > 0 && r.PropP99Ms >= r.PropP50Ms && r.PropAllP99Ms >= r.PropP50Ms):
		t.Errorf("propagation p50 %v p99 %v all %v, want 0 < p50 <= p99", r.PropP50Ms, r.PropP99Ms, r.PropAllP99Ms)
	case r.BytesPerNodePerPub <= 0 || math.IsNaN(r.PktsPerNodePerPub):
		t.Errorf("bytes/node/pub %v pkts %v, want a positive byte count", r.BytesPerNodePerPub, r.PktsPerNodePerPub)
	case r.LookupOK != c.Lookups || !(r.LookupP50Ms > 0) || !(r.LookupBytes > 0):
		t.Errorf("lookups %d/%d, p50 %v ms, %v bytes each", r.LookupOK, c.Lookups, r.LookupP50Ms, r.LookupBytes)
	case !(r.DHTHops >= 1 && r.DHTPeersQueried >= 1):
		t.Errorf("DHT hops %v peers queried %v, want at least 1", r.DHTHops, r.DHTPeersQueried)
	case !r.RejoinCaughtUp || r.RejoinMissed != c.RejoinBundles || r.SyncBytes <= 0 || r.SyncRounds < 1:
		t.Errorf("rejoin: caught up %v, missed %d/%d, sync %v bytes %v rounds", r.RejoinCaughtUp, r.RejoinMissed, c.RejoinBundles, r.SyncBytes, r.SyncRounds)
	case !(r.HeapPerNodeMiB > 0 && r.PeakRSSMiB > 0):
		t.Errorf("heap/node %v, peak RSS %v", r.HeapPerNodeMiB, r.PeakRSSMiB)
	}

	out := filepath.Join(t.TempDir(), "sim")
	var stdout bytes.Buffer
	if err := Write(&stdout, out, c, []Result{r}, true); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(out + ".md")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(md, stdout.Bytes()) {
		t.Error("stdout and OUT.md differ")
	}
	lines := strings.Split(string(md), "\n")
	var header, row string
	for k, l := range lines {
		if strings.HasPrefix(l, "| N |") {
			header, row = l, lines[k+2]
		}
	}
	for _, col := range []string{"prop p50 ms", "prop p99 ms", "pkts/node/pub", "bytes/node/pub", "lookup p50 ms", "B/lookup", "DHT hops", "sync bytes", "sync rounds", "catch-up s", "heap/node MiB", "peak RSS MiB"} {
		if !strings.Contains(header, "| "+col+" |") {
			t.Errorf("table has no column %q", col)
		}
	}
	if h, v := strings.Count(header, "|"), strings.Count(row, "|"); h != v || strings.Contains(row, "–") {
		t.Errorf("row %q does not fill header %q", row, header)
	}
	var rep Report
	js, err := os.ReadFile(out + ".json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(js, &rep); err != nil || len(rep.Results) != 1 || len(rep.Fits) != len(figures) {
		t.Errorf("json: %v, %d results, %d fits", err, len(rep.Results), len(rep.Fits))
	}
	svg, err := os.ReadFile(out + ".svg")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(svg, []byte("<svg")) || bytes.Count(svg, []byte("fit: ")) != len(figures) {
		t.Errorf("svg has %d panels, want %d", bytes.Count(svg, []byte("fit: ")), len(figures))
	}
}

// TestFitVerdict: the fit tells log N from linear growth and flat figures.
func TestFitVerdict(t *testing.T) {
	ns := []int{50, 100, 250, 500, 1000}
	for _, tc := range []struct {
		name string
		f    func(n float64) float64
		want string
	}{
		{"log", func(n float64) float64 { return 3 + 2*math.Log(n) }, "log N"},
		{"linear", func(n float64) float64 { return 5 + 0.5*n }, "linear"},
		{"flat", func(n float64) float64 { return 100 + math.Mod(n, 7) }, "flat"},
	} {
		var rs []Result
		for _, n := range ns {
			rs = append(rs, Result{N: n, PropP50Ms: tc.f(float64(n))})
		}
		if got := fitFigure(figures[0], rs); got.Verdict != tc.want {
			t.Errorf("%s: verdict %q (log RSS %v, linear RSS %v), want %q", tc.name, got.Verdict, got.LogRSS, got.LinRSS, tc.want)
		}
	}
	if got := fitFigure(figures[0], []Result{{N: 50, PropP50Ms: 1}, {N: 100, PropP50Ms: 3}}); got.Verdict != "too few points" {
		t.Errorf("two sizes: verdict %q", got.Verdict)
	}
}

// TestMergeReports: two runs' reports of one setting become one report
// sorted by N whose fits span both; reports of other settings are refused.
func TestMergeReports(t *testing.T) {
	dir := t.TempDir()
	c := DefaultConfig()
	save := func(name string, c Config, ns ...int) string {
		var rs []Result
		for _, n := range ns {
			rs = append(rs, Result{N: n, PropP50Ms: 10 + math.Log(float64(n)), HeapPerNodeMiB: 5})
		}
		c.Sizes = ns
		out := filepath.Join(dir, name)
		if err := write(&bytes.Buffer{}, out, "run "+name, c, rs, true); err != nil {
			t.Fatal(err)
		}
		return out + ".json"
	}
	big, small := save("big", c, 500), save("small", c, 50, 100, 250)
	var w bytes.Buffer
	out := filepath.Join(dir, "merged")
	if err := mergeReports(&w, out, []string{big, small}); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(out + ".json")
	if err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatal(err)
	}
	var ns []int
	for _, r := range rep.Results {
		ns = append(ns, r.N)
	}
	if got := strings.ReplaceAll(fmtInts(ns), " ", ","); got != "50,100,250,500" {
		t.Fatalf("merged sizes %v, want 50,100,250,500 in order", ns)
	}
	if rep.Command != "run big; run small" || !strings.Contains(w.String(), "| 500 |") {
		t.Fatalf("command %q, table %q", rep.Command, w.String())
	}
	other := c
	other.Shards = 64
	if err := mergeReports(&w, "", []string{big, save("other", other, 1000)}); err == nil {
		t.Fatal("reports of different settings were merged")
	}
}

func fmtInts(ns []int) string {
	var b strings.Builder
	for i, n := range ns {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(strconv.Itoa(n))
	}
	return b.String()
}
