package main

import (
	"math"

	"context"
	"fmt"
	humanize "github.com/dustin/go-humanize"
	"io"
	"log/slog"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kpnode/kpnode/node"
	"github.com/kpnode/kpnode/protocol"
)

func runNode(args []string, stdout, stderr io.Writer) error {
	cfg := node.DefaultConfig()
	fs := newFlagSet("run", "", stderr)
	fs.StringVar(&cfg.DataDir, "data", cfg.DataDir, "data directory (store and node state)")
	fs.StringVar(&cfg.APIAddr, "api", cfg.APIAddr, "HTTP API listen address; keep it on loopback unless you mean to expose it (\"\": no API, e.g. a bootstrap node)")
	fs.Var(newListFlag(&cfg.Listen), "listen", "libp2p listen multiaddr (repeatable; env: comma-separated)")
	fs.Var(newListFlag(&cfg.Bootstrap), "bootstrap", "multiaddr with /p2p/ of a peer to dial on start (repeatable; env: comma-separated)")
	fs.StringVar(&cfg.Network, "network", cfg.Network, "registry network name; part of every topic and protocol ID")
	shards := "all"
	fs.StringVar(&shards, "shards", shards, "shards this full node holds: all, or a list such as 0,2,4-7")
	fs.BoolVar(&cfg.Light, "light", false, "run a light node: hold no shards, find holders through the DHT, cache what it fetches")
	fs.DurationVar(&cfg.LookupTimeout, "lookup-timeout", cfg.LookupTimeout, "how long a GET may search the network for a key of a shard the node does not hold")
	fs.DurationVar(&cfg.LookupGrace, "lookup-grace", cfg.LookupGrace, "how long a lookup keeps collecting holders' answers after the first valid one (the best wins)")
	fs.IntVar(&cfg.OutboxMax, "outbox-max", cfg.OutboxMax, "publications of shards the node does not hold kept on disk until a holder has them; when full, POSTs get 503")
	fs.Var(byteSizeFlag{&cfg.MaxStoreBytes}, "max-store-bytes", "store budget (e.g. 4GiB): beyond it the oldest bundles are evicted, else writes get 507; -1 for none")
	fs.Var(byteSizeFlag{&cfg.MinFreeDisk}, "min-free-disk", "free disk space below which writes are refused (507) instead of filling the disk; -1 for no check")
	fs.IntVar(&cfg.MaxPerDevice, "max-per-device", cfg.MaxPerDevice, "bundles kept per device (newest by signed timestamp)")
	retention := durationFlag{&cfg.Policy.Retention}
	fs.Var(retention, "retention", "how long bundles and account bundles are kept (e.g. 30d, 720h)")
	lifetime := durationFlag{&cfg.Policy.MaxKeyPackageLifetime}
	fs.Var(lifetime, "max-kp-lifetime", "longest KeyPackage lifetime accepted (not_after − not_before)")
	mls := string(cfg.Policy.MLS)
	fs.StringVar(&mls, "mls-validation", mls, "KeyPackage validation: strict (RFC 9420) or off (opaque, as chat-store)")
	syncWrites := true
	fs.BoolVar(&syncWrites, "sync-writes", syncWrites, "fsync every acknowledged write; false keeps writes safe from a crash of the process but not of the machine")
	logLevel := "info"
	fs.StringVar(&logLevel, "log-level", logLevel, "log level: debug, info, warn or error")
	logFormat := "text"
	fs.StringVar(&logFormat, "log-format", logFormat, "log format: text or json")
	rest, err := parseFlags(fs, args)
	if err != nil {
		return err
	} else if len(rest) > 0 {
		return fmt.Errorf("unexpected arguments %q", rest)
	}
	cfg.Policy.MLS = protocol.MLSMode(mls)
	if cfg.Light && shards == "all" {
		cfg.Shards = protocol.NoShards(protocol.DefaultShardCount)
	} else if cfg.Shards, err = protocol.ParseShardSet(shards, protocol.DefaultShardCount); err != nil {
		return err
	}
	cfg.NoSync = !syncWrites

	logger, err := newLogger(stderr, logLevel, logFormat)
	if err != nil {
		return err
	}
	cfg.Logger = logger
	cfg.Version = version()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	n, err := node.New(cfg)
	if err != nil {
		return err
	}
	if err := n.Start(ctx); err != nil {
		n.Close()
		return err
	}
	addrs, _ := n.P2PAddrs()
	api := "off" // --api "": a relay or bootstrap node that serves no client
	if a := n.APIAddr(); a != nil {
		api = "http://" + a.String()
	}
	logger.Info("kpnode started", "version", cfg.Version, "peer_id", n.PeerID(), "addrs", addrs, "network", cfg.Network,
		"shards", cfg.Shards.String(), "light", cfg.Light, "data", cfg.DataDir, "api", api,
		"mls_validation", cfg.Policy.MLS, "max_per_device", cfg.MaxPerDevice, "retention", cfg.Policy.Retention)
	<-ctx.Done()
	logger.Info("shutting down")
	if err := n.Close(); err != nil {
		return err
	}
	logger.Info("stopped")
	return nil
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// durationFlag is a time.Duration flag that also takes whole days ("30d").
type durationFlag struct{ d *time.Duration }

func (f durationFlag) String() string {
	if f.d == nil {
		return ""
	}
	if *f.d%(24*time.Hour) == 0 && *f.d != 0 {
		return fmt.Sprintf("%dd", *f.d/(24*time.Hour))
	}
	return f.d.String()
}

func (f durationFlag) Set(s string) error {
	d, err := parseDuration(s)
	if err != nil {
		return err
	}
	if d <= 0 {
		return fmt.Errorf("must be positive")
	}
	*f.d = d
	return nil
}

func parseDuration(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseUint(days, 10, 16)
		if err != nil {
			return 0, fmt.Errorf("invalid duration %q", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	return time.ParseDuration(s)
}

// listFlag is a repeatable string flag. The first value given replaces the
// default; KPNODE_* environment values are comma-separated and are replaced,
// not extended, by values on the command line.
type listFlag struct {
	vals     *[]string
	explicit bool
}

func newListFlag(vals *[]string) *listFlag { return &listFlag{vals: vals} }

func (f *listFlag) String() string {
	if f == nil || f.vals == nil {
		return ""
	}
	return strings.Join(*f.vals, ",")
}

func (f *listFlag) Set(v string) error {
	if !f.explicit {
		*f.vals = nil
		f.explicit = true
	}
	for _, part := range strings.Split(v, ",") {
		if part = strings.TrimSpace(part); part != "" {
			*f.vals = append(*f.vals, part)
		}
	}
	return nil
}

// resetExplicit lets the command line replace values set from the environment.
func (f *listFlag) resetExplicit() { f.explicit = false }

// byteSizeFlag is a size in bytes written as humans do: 4GiB, 512MiB,
// 1000000 (IEC and SI suffixes), or -1 for "none".
type byteSizeFlag struct{ n *int64 }

func (f byteSizeFlag) String() string {
	if f.n == nil {
		return ""
	}
	if *f.n < 0 {
		return "-1"
	}
	return humanize.IBytes(uint64(*f.n))
}

func (f byteSizeFlag) Set(s string) error {
	if strings.TrimSpace(s) == "-1" {
		*f.n = -1
		return nil
	}
	v, err := humanize.ParseBytes(s)
	if err != nil {
		return fmt.Errorf("want a size such as 4GiB or 512MiB, or -1: %w", err)
	}
	if v > math.MaxInt64 {
		return fmt.Errorf("size %q is too large", s)
	}
	*f.n = int64(v)
	return nil
}
