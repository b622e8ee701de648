// Package httpapi serves kpnode's local HTTP API: chat-store's v0 contract,
// byte for byte, so a chat client only changes its registry URL, plus kpnode's
// v1 additions, health and Prometheus metrics.
//
// Every answer, including the ones chat-store's framework gives in plain text
// (415, 400, 422, 413, 404, 405), is JSON. The handler validates nothing
// itself beyond the request's shape; the Backend decides what is stored.
package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kpnode/kpnode/protocol"
)

// Errors a Backend returns (wrapped, or joined with its own cause) for the
// API to map to a status code. The Client returns ErrNotFound as well, for a
// 404.
var (
	// ErrNotFound: no record for the key. A 404.
	ErrNotFound = errors.New("not found")
	// ErrStale: an account bundle does not supersede the stored one. A 409.
	ErrStale = errors.New("stale account bundle")
	// ErrUnavailable: the Backend cannot answer for now: the registry
	// network did not answer in time or could not be reached. It is a 503
	// with Retry-After, never a 404: the record may well exist.
	ErrUnavailable = errors.New("registry network unavailable")
	// ErrStoreFull: the store refuses writes until it has room. A 507.
	ErrStoreFull = errors.New("store full")
	// ErrOutboxFull: too many publications are waiting for the registry
	// network. A 503 with Retry-After.
	ErrOutboxFull = errors.New("outbox full")
	// ErrConsumed: the bundle's KeyPackage was consumed (a consume notice
	// tombstones its ref). A 409 {"error":"keypackage consumed"}.
	ErrConsumed = errors.New("keypackage consumed")
	// ErrRateLimited: a claim is over the per-requester or per-device
	// limit. A 429 {"error":"rate limited"} with Retry-After; an error that
	// also has a RetryAfter() time.Duration method says when.
	ErrRateLimited = errors.New("rate limited")
)

// Bundle is a stored bundle as the API serves it: the record the device
// signed and what validation derived from it.
type Bundle struct {
	protocol.Bundle
	protocol.BundleInfo
	// Claimed: a claim notice holds the bundle (it was handed out).
	Claimed bool
}

// Claim is a bundle handed out by a claim.
type Claim struct {
	Bundle
	// LastResort: no unclaimed one-time bundle was left, so this is the
	// device's latest last-resort bundle (which may be handed out again).
	LastResort bool
}

// ClaimCounts is the body of GET /v1/keypackages/{device_id}/count, but
// the device_id.
type ClaimCounts struct {
	OneTime             int   `json:"one_time"`
	LastResort          int   `json:"last_resort"`
	LastResortHandedOut int64 `json:"last_resort_handed_out"`
}

// Account is a stored account bundle as the API serves it, with the local
// time of its last accepted upsert (chat-store's updated_at).
type Account struct {
	protocol.AccountBundle
	UpdatedAtMS int64
}

// Status is the body of GET /v1/status. Its fields are served in this order.
type Status struct {
	Version string `json:"version"`
	DataDir string `json:"data_dir"`
	Network string `json:"network"`
	// NetworkID is the network name with the network constants' tag, as
	// topics and protocol IDs embed it; peers interoperate only when equal.
	NetworkID      string   `json:"network_id"`
	PeerID         string   `json:"peer_id"`
	Addrs          []string `json:"addrs"`
	ConnectedPeers int      `json:"connected_peers"`
	// Ready: connected, in the DHT, its shards provided, and a gossip peer
	// in every topic of the shards it holds.
	Ready         bool     `json:"ready"`
	Peers         []string `json:"peers"`
	Light         bool     `json:"light"`
	Shards        []int    `json:"shards"`
	ShardCount    int      `json:"shard_count"`
	MLSValidation string   `json:"mls_validation"`
	Devices       int64    `json:"devices"`
	Bundles       int64    `json:"bundles"`
	Accounts      int64    `json:"accounts"`
	// PendingPublications: acknowledged publications of shards the node
	// does not hold that no holder has confirmed yet (the outbox).
	PendingPublications int `json:"pending_publications"`
}

// Backend is what the API serves. Errors it returns are matched with
// errors.As and errors.Is, first match in this order:
// *protocol.ValidationError → 400 with its text, ErrStale → 409,
// ErrConsumed → 409 "keypackage consumed", ErrRateLimited → 429 (with
// Retry-After: the error's RetryAfter() in whole seconds, else 1),
// ErrNotFound → 404, ErrUnavailable → 503 (with Retry-After),
// ErrStoreFull → 507, ErrOutboxFull → 503 (with Retry-After), anything
// else → 500 "internal error". Records it returns are only read.
type Backend interface {
	SubmitBundle(ctx context.Context, b *protocol.Bundle) error
	// LatestBundle returns the bundle to hand a chat client for a device.
	LatestBundle(ctx context.Context, device protocol.Key) (*Bundle, error)
	// Bundles returns every bundle held for a device, newest first; none is
	// an empty list, not ErrNotFound.
	Bundles(ctx context.Context, device protocol.Key) ([]*Bundle, error)
	SubmitAccount(ctx context.Context, a *protocol.AccountBundle) error
	Account(ctx context.Context, account protocol.Key) (*Account, error)
	// Status is served as JSON at GET /v1/status.
	Status(ctx context.Context) Status

	// Claim hands out one bundle of device to requester (the client's
	// address, for the per-requester limit): an unclaimed one-time bundle,
	// else the latest last-resort one; suite 0 means any cipher suite.
	// ErrNotFound when the device has nothing usable; ErrRateLimited.
	Claim(ctx context.Context, requester string, device protocol.Key, suite uint16) (*Claim, error)
	// Count counts a device's bundles for its client's replenishing.
	Count(ctx context.Context, device protocol.Key) (ClaimCounts, error)
	// Consume applies a consume notice the device signed: the named
	// bundles are deleted everywhere and refused for the retention.
	Consume(ctx context.Context, n *protocol.ConsumeNotice) error
}

// DefaultMaxBodyBytes caps request bodies (chat-store: 2 MB; kpnode: 1 MiB,
// far above any KeyPackage).
const DefaultMaxBodyBytes = 1 << 20

// Config configures the handler.
type Config struct {
	Backend Backend
	// Registry receives the HTTP metrics and is served at /metrics.
	// Default: a fresh registry.
	Registry *prometheus.Registry
	// Logger logs refused requests at debug. Default slog.Default().
	Logger *slog.Logger
	// MaxBodyBytes caps a request body. Default DefaultMaxBodyBytes.
	MaxBodyBytes int64
}

type api struct {
	backend  Backend
	log      *slog.Logger
	maxBody  int64
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
}

// New returns the API handler.
func New(cfg Config) (http.Handler, error) {
	if cfg.Backend == nil {
		return nil, errors.New("httpapi: Backend is required")
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = DefaultMaxBodyBytes
	}
	a := &api{
		backend: cfg.Backend,
		log:     cfg.Logger,
		maxBody: cfg.MaxBodyBytes,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kpnode_http_requests_total",
			Help: "HTTP API requests by route and status code.",
		}, []string{"route", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kpnode_http_request_duration_seconds",
			Help:    "HTTP API request latency by route.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 2.5},
		}, []string{"route"}),
	}
	if err := cfg.Registry.Register(a.requests); err != nil {
		return nil, err
	}
	if err := cfg.Registry.Register(a.latency); err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	// Patterns carry no method: a known path with the wrong method is a JSON
	// 405 from route, not ServeMux's plain-text one.
	a.route(mux, "/v0/keypackage", "POST /v0/keypackage", http.MethodPost, a.postKeyPackage)
	a.route(mux, "/v0/keypackage/{device_id}", "GET /v0/keypackage/{device_id}", http.MethodGet, a.getKeyPackage)
	a.route(mux, "/v0/account", "POST /v0/account", http.MethodPost, a.postAccount)
	a.route(mux, "/v0/account/{account_pub}", "GET /v0/account/{account_pub}", http.MethodGet, a.getAccount)
	a.route(mux, "/v1/keypackages/{device_id}", "GET /v1/keypackages/{device_id}", http.MethodGet, a.listKeyPackages)
	a.route(mux, "/v1/keypackages/{device_id}/claim", "POST /v1/keypackages/{device_id}/claim", http.MethodPost, a.claimKeyPackage)
	a.route(mux, "/v1/keypackages/{device_id}/count", "GET /v1/keypackages/{device_id}/count", http.MethodGet, a.countKeyPackages)
	a.route(mux, "/v1/accounts/{account_pub}/claim", "POST /v1/accounts/{account_pub}/claim", http.MethodPost, a.claimAccount)
	a.route(mux, "/v1/consume", "POST /v1/consume", http.MethodPost, a.postConsume)
	a.route(mux, "/v1/status", "GET /v1/status", http.MethodGet, a.status)
	a.route(mux, "/healthz", "GET /healthz", http.MethodGet, a.healthz)
	metrics := promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{})
	a.route(mux, "/metrics", "GET /metrics", http.MethodGet, func(w http.ResponseWriter, r *http.Request) int {
		metrics.ServeHTTP(w, r)
		return http.StatusOK
	})
	a.route(mux, "/", "other", "", func(w http.ResponseWriter, r *http.Request) int {
		return writeError(w, http.StatusNotFound, "not found")
	})
	return mux, nil
}

// handlerFunc serves a request and returns the status code it wrote.
type handlerFunc func(w http.ResponseWriter, r *http.Request) int

// route registers h for path, allowing only method (and HEAD for GET);
// label names the route in metrics.
func (a *api) route(mux *http.ServeMux, path, label, method string, h handlerFunc) {
	requests := a.requests.MustCurryWith(prometheus.Labels{"route": label})
	latency := a.latency.WithLabelValues(label)
	mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		var code int
		switch {
		case method == "" || r.Method == method || (method == http.MethodGet && r.Method == http.MethodHead):
			code = h(w, r)
		default:
			allow := method
			if method == http.MethodGet {
				allow += ", " + http.MethodHead
			}
			w.Header().Set("Allow", allow)
			code = writeError(w, http.StatusMethodNotAllowed, "method not allowed")
		}
		requests.WithLabelValues(strconv.Itoa(code)).Inc()
		latency.Observe(time.Since(start).Seconds())
	})
}

// errorBody is chat-store's error shape.
type errorBody struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, code int, v any) int {
	body, err := json.Marshal(v)
	if err != nil {
		code, body = http.StatusInternalServerError, []byte(`{"error":"internal error"}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	w.Write(body)
	return code
}

func writeError(w http.ResponseWriter, code int, msg string) int {
	return writeJSON(w, code, errorBody{Error: msg})
}

func writeNoContent(w http.ResponseWriter) int {
	w.WriteHeader(http.StatusNoContent)
	return http.StatusNoContent
}
