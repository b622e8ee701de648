package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// startLocalNode starts one node (fsync on, as the binary runs) on loopback.
func startLocalNode(ctx context.Context, dir string, mls protocol.MLSMode) (*node.Node, error) {
	cfg := node.DefaultConfig()
	cfg.Policy.MLS = mls
	cfg.DataDir = dir
	cfg.APIAddr = "127.0.0.1:0"
	cfg.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	n, err := node.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := n.Start(ctx); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

// loadGET sends total GETs to url from clients goroutines and returns the
// latencies and the elapsed time.
func loadGET(ctx context.Context, url string, clients, total int) ([]time.Duration, time.Duration, error) {
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}, Timeout: 10 * time.Second}
	lat := make([]time.Duration, total)
	start := time.Now()
	err := parallel(ctx, clients, total, func(i int) error {
		t0 := time.Now()
		resp, err := hc.Get(url)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		lat[i] = time.Since(t0)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return lat, time.Since(start), nil
}

// get: GET /v0/account on a node against a bare net/http handler serving
// the same bytes from memory, same load.
func getBench(args []string) error {
	fs := flag.NewFlagSet("get", flag.ExitOnError)
	clients := fs.Int("clients", 16, "concurrent clients (1..256)")
	total := fs.Int("requests", 50_000, "requests per run (1..1000000)")
	fs.Parse(args)
	if *clients < 1 || *clients > 256 || *total < 1 || *total > 1_000_000 {
		return errors.New("clients must be 1..256 and requests 1..1000000")
	}
	e, err := newEnv(10 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx, dir := e.ctx, e.dir
	n, err := startLocalNode(ctx, dir, protocol.MLSStrict)
	if err != nil {
		return err
	}
	defer n.Close()
	bundles, err := newBundles(3)
	if err != nil {
		return err
	}
	var devices []protocol.Key
	for _, b := range bundles {
		devices = append(devices, b.DeviceID)
	}
	a := protocol.SignAccount(ed25519Key(), protocol.EncodeAccountPayload(7, devices))
	if err := n.SubmitAccount(ctx, &a); err != nil {
		return err
	}
	url := "http://" + n.APIAddr().String() + "/v0/account/" + a.AccountPub.String()
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	bare := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})}
	go bare.Serve(ln)
	defer bare.Close()

	if _, _, err := loadGET(ctx, url, *clients, *total/10); err != nil { // warm up
		return err
	}
	got, gotTime, err := loadGET(ctx, url, *clients, *total)
	if err != nil {
		return err
	}
	ceil, ceilTime, err := loadGET(ctx, "http://"+ln.Addr().String()+"/v0/account/x", *clients, *total)
	if err != nil {
		return err
	}
	gotRate, ceilRate := float64(*total)/gotTime.Seconds(), float64(*total)/ceilTime.Seconds()
	fmt.Printf("local GET /v0/account (%d B body, %d clients): %.0f req/s, p99 %v | ceiling %.0f req/s, p99 %v | throughput ratio %.2f×\n",
		len(body), *clients, gotRate, quantile(got, 0.99).Round(time.Microsecond), ceilRate, quantile(ceil, 0.99).Round(time.Microsecond), gotRate/ceilRate)
	return nil
}

// ingest: bundles posted over HTTP (16 clients) to a node with fsync on,
// against tight loops of the same validation and Badger writes in this
// process, as many as there are clients (so both sides share fsyncs alike).
func ingestBench(args []string) error {
	fs := flag.NewFlagSet("ingest", flag.ExitOnError)
	count := fs.Int("count", 2000, "bundles per run (1..100000)")
	clients := fs.Int("clients", 16, "concurrent HTTP clients (1..256)")
	fs.Parse(args)
	if *count < 1 || *count > 100_000 || *clients < 1 || *clients > 256 {
		return errors.New("count must be 1..100000 and clients 1..256")
	}
	e, err := newEnv(10 * time.Minute)
	if err != nil {
		return err
	}
	defer e.close()
	ctx, dir := e.ctx, e.dir
	fmt.Printf("generating %d KeyPackages...\n", 2**count)
	posted, err := newBundles(*count)
	if err != nil {
		return err
	}
	looped, err := newBundles(*count)
	if err != nil {
		return err
	}

	n, err := startLocalNode(ctx, filepath.Join(dir, "node"), protocol.MLSStrict)
	if err != nil {
		return err
	}
	defer n.Close()
	api := httpapi.NewClient(n.APIAddr().String(), &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: *clients}, Timeout: 30 * time.Second})
	start := time.Now()
	if err := parallel(ctx, *clients, len(posted), func(i int) error { return api.PublishBundle(ctx, &posted[i]) }); err != nil {
		return err
	}
	httpTime := time.Since(start)

	store, err := storage.Open(storage.Options{Dir: filepath.Join(dir, "loop"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return err
	}
	defer store.Close()
	policy := protocol.DefaultPolicy()
	start = time.Now()
	err = parallel(ctx, *clients, len(looped), func(i int) error {
		b := &looped[i]
		info, err := policy.ValidateBundle(b, time.Now())
		if err != nil {
			return err
		}
		_, err = store.PutBundle(ctx, &storage.Bundle{Bundle: protocol.Bundle{DeviceID: b.DeviceID, Payload: bytes.Clone(b.Payload), Signature: b.Signature},
			BundleInfo: info})
		return err
	})
	loopTime := time.Since(start)
	if err != nil {
		return err
	}
	got, ceil := float64(*count)/httpTime.Seconds(), float64(*count)/loopTime.Seconds()
	fmt.Printf("ingest, %d bundles (0x004D KeyPackages), fsync on: HTTP POST x%d clients %.0f bundles/s | ceiling (validate + Badger write, %d loops) %.0f/s | ratio %.2f×\n",
		*count, *clients, got, *clients, ceil, got/ceil)
	return nil
}
