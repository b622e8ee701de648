package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"reflect"
	"slices"
	"strings"
)

// figure is one measured quantity plotted and fitted against N.
type figure struct {
	Name, Unit string
	get        func(Result) float64
}

var figures = []figure{
	{"propagation p50", "ms", func(r Result) float64 { return r.PropP50Ms }},
	{"propagation p99", "ms", func(r Result) float64 { return r.PropP99Ms }},
	{"packets / node / publication", "pkts", func(r Result) float64 { return r.PktsPerNodePerPub }},
	{"bytes / node / publication", "B", func(r Result) float64 { return r.BytesPerNodePerPub }},
	{"holder bytes / held publication", "B", func(r Result) float64 { return r.HolderBytesPerHeldPub }},
	{"light lookup p50", "ms", func(r Result) float64 { return r.LookupP50Ms }},
	{"bytes / lookup", "B", func(r Result) float64 { return r.LookupBytes }},
	{"DHT hops", "hops", func(r Result) float64 { return r.DHTHops }},
	{"DHT peers queried", "peers", func(r Result) float64 { return r.DHTPeersQueried }},
	{"rejoin sync bytes", "B", func(r Result) float64 { return r.SyncBytes }},
	{"rejoin catch-up", "s", func(r Result) float64 { return r.CatchupSec }},
	{"heap / node", "MiB", func(r Result) float64 { return r.HeapPerNodeMiB }},
}

// Fit compares y = a + b·ln N with y = a + b·N by their residuals.
type Fit struct {
	Figure         string
	LogA, LogB     float64
	LogRSS, LinRSS float64
	// Verdict: "flat" (varies by less than 10% of its mean over the
	// range), "log N" or "linear" (the smaller residual), or "too few
	// points" (fewer than 3 sizes: both lines fit exactly).
	Verdict string
}

func linfit(xs, ys []float64) (a, b, rss float64) {
	n := float64(len(xs))
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	den := n*sxx - sx*sx
	if den == 0 {
		return sy / n, 0, 0
	}
	b = (n*sxy - sx*sy) / den
	a = (sy - b*sx) / n
	for i := range xs {
		e := ys[i] - (a + b*xs[i])
		rss += e * e
	}
	return a, b, rss
}

func fitFigure(f figure, rs []Result) Fit {
	var ns, lns, ys []float64
	for _, r := range rs {
		y := f.get(r)
		if math.IsNaN(y) {
			continue
		}
		ns = append(ns, float64(r.N))
		lns = append(lns, math.Log(float64(r.N)))
		ys = append(ys, y)
	}
	fit := Fit{Figure: f.Name}
	if len(ys) == 0 {
		fit.Verdict = "no data"
		return fit
	}
	fit.LogA, fit.LogB, fit.LogRSS = linfit(lns, ys)
	_, _, fit.LinRSS = linfit(ns, ys)
	lo, hi, sum := ys[0], ys[0], 0.0
	for _, y := range ys {
		lo, hi, sum = min(lo, y), max(hi, y), sum+y
	}
	switch m := sum / float64(len(ys)); {
	case hi-lo <= 0.1*math.Abs(m):
		fit.Verdict = "flat"
	case len(ys) < 3:
		fit.Verdict = "too few points"
	case fit.LogRSS <= fit.LinRSS:
		fit.Verdict = "log N"
	default:
		fit.Verdict = "linear"
	}
	return fit
}

// Report is kpsim's JSON output.
type Report struct {
	Command string
	Config  Config
	Results []Result
	Fits    []Fit
}

// Write prints the table on w and, when out is set, writes out.md,
// out.json and out.svg. The fits are printed only when final.
func Write(w io.Writer, out string, c Config, rs []Result, final bool) error {
	return write(w, out, "go run ./cmd/kpsim "+strings.Join(os.Args[1:], " "), c, rs, final)
}

func write(w io.Writer, out, command string, c Config, rs []Result, final bool) error {
	rep := Report{Command: command, Config: c, Results: rs}
	for _, f := range figures {
		rep.Fits = append(rep.Fits, fitFigure(f, rs))
	}
	md := table(rep)
	if final {
		fmt.Fprint(w, md)
	}
	if out == "" {
		return nil
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{out + ".md": []byte(md), out + ".json": js, out + ".svg": []byte(plot(rep))} {
		if err := os.WriteFile(name, data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func num(x float64, prec int) string {
	if math.IsNaN(x) {
		return "–"
	}
	return fmt.Sprintf("%.*f", prec, x)
}

// table renders the results and fits as Markdown.
func table(rep Report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "`%s`\n\n", rep.Command)
	b.WriteString("| N | full | light | S | holders/shard | ready s | prop p50 ms | prop p99 ms | all-holders p99 ms | delivered | pkts/node/pub | bytes/node/pub | holder B/held pub | light B/pub | lookups ok | lookup p50 ms | lookup p99 ms | B/lookup | DHT hops | DHT peers queried | rejoin missed | sync bytes | sync rounds | catch-up s | heap/node MiB | peak RSS MiB | wall s |\n")
	b.WriteString("|" + strings.Repeat(" ---: |", 27) + "\n")
	for _, r := range rep.Results {
		fmt.Fprintf(&b, "| %d | %d | %d | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d/%d | %s | %s | %s | %s | %s | %d | %s | %s | %s | %s | %s | %s |\n",
			r.N, r.Full, r.Light, r.Shards, num(r.HoldersPerShard, 1), num(r.ReadySec, 1),
			num(r.PropP50Ms, 0), num(r.PropP99Ms, 0), num(r.PropAllP99Ms, 0), num(r.Delivered, 4),
			num(r.PktsPerNodePerPub, 1), num(r.BytesPerNodePerPub, 0),
			num(r.HolderBytesPerHeldPub, 0), num(r.LightBytesPerPub, 0),
			r.LookupOK, rep.Config.Lookups, num(r.LookupP50Ms, 0), num(r.LookupP99Ms, 0), num(r.LookupBytes, 0),
			num(r.DHTHops, 1), num(r.DHTPeersQueried, 1),
			r.RejoinMissed, num(r.SyncBytes, 0), num(r.SyncRounds, 0), num(r.CatchupSec, 1),
			num(r.HeapPerNodeMiB, 2), num(r.PeakRSSMiB, 0), num(r.WallSec, 0))
	}
	b.WriteString("\n| figure | a + b·ln N | RSS log | RSS linear | grows like |\n| --- | --- | ---: | ---: | --- |\n")
	for _, f := range rep.Fits {
		fmt.Fprintf(&b, "| %s | %s + %s·ln N | %.3g | %.3g | %s |\n", f.Figure, num(f.LogA, 2), num(f.LogB, 2), f.LogRSS, f.LinRSS, f.Verdict)
	}
	return b.String()
}

// plot draws one panel per figure: the values against N on a log axis,
// and the fitted a + b·ln N reference curve (dashed).
func plot(rep Report) string {
	const (
		cols, pw, ph   = 3, 320, 220
		ml, mr, mt, mb = 60, 15, 40, 35
	)
	rows := (len(figures) + cols - 1) / cols
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", cols*pw, rows*ph+30)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/><text x="10" y="18" font-size="13">%s</text>`+"\n", html.EscapeString(rep.Command))
	nmin, nmax := math.Inf(1), math.Inf(-1)
	for _, r := range rep.Results {
		nmin, nmax = min(nmin, float64(r.N)), max(nmax, float64(r.N))
	}
	if nmin == nmax {
		nmin, nmax = nmin/2, nmax*2
	}
	for k, f := range figures {
		ox, oy := (k%cols)*pw, 30+(k/cols)*ph
		x0, y0, w, h := float64(ox+ml), float64(oy+mt), float64(pw-ml-mr), float64(ph-mt-mb)
		fit := rep.Fits[k]
		ymax := 0.0
		for _, r := range rep.Results {
			if y := f.get(r); !math.IsNaN(y) {
				ymax = max(ymax, y)
			}
		}
		if ymax <= 0 {
			ymax = 1
		}
		ymax *= 1.15
		px := func(n float64) float64 { return x0 + w*math.Log(n/nmin)/math.Log(nmax/nmin) }
		py := func(y float64) float64 { return y0 + h - h*max(0, y)/ymax }
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">%s (%s)</text><text x="%d" y="%d" fill="#555">fit: %s</text>`+"\n",
			ox+ml, oy+14, html.EscapeString(f.Name), f.Unit, ox+ml, oy+28, html.EscapeString(fit.Verdict))
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="%.0f" height="%.0f" fill="none" stroke="#999"/>`+"\n", x0, y0, w, h)
		for _, r := range rep.Results {
			x := px(float64(r.N))
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#eee"/><text x="%.1f" y="%.0f" text-anchor="middle">%d</text>`+"\n", x, y0, x, y0+h, x, y0+h+14, r.N)
		}
		for _, fr := range []float64{0, 0.5, 1} {
			y := ymax / 1.15 * fr
			fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" text-anchor="end">%s</text>`+"\n", x0-4, py(y)+4, short(y))
		}
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="middle" fill="#555">N (log)</text>`+"\n", x0+w/2, y0+h+28)
		if !math.IsNaN(fit.LogA) && fit.Verdict != "no data" {
			var pts []string
			for s := 0; s <= 40; s++ {
				n := nmin * math.Pow(nmax/nmin, float64(s)/40)
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(n), py(fit.LogA+fit.LogB*math.Log(n))))
			}
			fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="#d62728" stroke-dasharray="4 3"/>`+"\n", strings.Join(pts, " "))
		}
		var pts []string
		for _, r := range rep.Results {
			y := f.get(r)
			if math.IsNaN(y) {
				continue
			}
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(float64(r.N)), py(y)))
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="#1f77b4"/>`+"\n", px(float64(r.N)), py(y))
		}
		if len(pts) > 1 {
			fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="#1f77b4"/>`+"\n", strings.Join(pts, " "))
		}
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#555">blue: measured; red dashed: fitted a + b·ln N</text>`+"\n", cols*pw-300, rows*ph+25)
	b.WriteString("</svg>\n")
	return b.String()
}

func short(y float64) string {
	switch a := math.Abs(y); {
	case a >= 1e6:
		return fmt.Sprintf("%.1fM", y/1e6)
	case a >= 1e3:
		return fmt.Sprintf("%.1fk", y/1e3)
	case a >= 10:
		return fmt.Sprintf("%.0f", y)
	}
	return fmt.Sprintf("%.2f", y)
}

// mergeReports writes the results of earlier runs' JSON reports (runs of
// one setting at different sizes, e.g. a large N run on its own) as one
// report, sorted by N, with the fits over all of them. The merged report's
// Command names every run.
func mergeReports(w io.Writer, out string, files []string) error {
	var first *Report
	var rs []Result
	var cmds []string
	for _, name := range files {
		raw, err := os.ReadFile(strings.TrimSpace(name))
		if err != nil {
			return err
		}
		var rep Report
		if err := json.Unmarshal(raw, &rep); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		c := rep.Config
		if first != nil {
			c.Sizes = first.Config.Sizes
			if !reflect.DeepEqual(c, first.Config) {
				return fmt.Errorf("%s: settings differ from %s's", name, files[0])
			}
		} else {
			first = &rep
		}
		rs = append(rs, rep.Results...)
		cmds = append(cmds, rep.Command)
	}
	if first == nil {
		return errors.New("no report to merge")
	}
	slices.SortFunc(rs, func(a, b Result) int { return cmp.Compare(a.N, b.N) })
	c := first.Config
	c.Sizes = nil
	for _, r := range rs {
		c.Sizes = append(c.Sizes, r.N)
	}
	return write(w, out, strings.Join(cmds, "; "), c, rs, true)
}
