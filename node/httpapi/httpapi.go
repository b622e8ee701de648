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
	"github.com/kpnode/kpnode/storage"
)

// ErrUnavailable is the error a Backend returns (wrapped) when it cannot
// answer for now: the registry network did not answer in time or could not
// be reached. It is a 503, never a 404: the record may well exist.
var ErrUnavailable = errors.New("registry network unavailable")

// Backend is what the API serves. Errors it returns are mapped once:
// *protocol.ValidationError → 400 with its text, storage.ErrStale → 409,
// storage.ErrNotFound → 404, ErrUnavailable and storage.ErrOutboxFull → 503
// (with Retry-After), anything else → 500 "internal error".
type Backend interface {
	SubmitBundle(ctx context.Context, b *protocol.Bundle) error
	LatestBundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error)
	Bundles(ctx context.Context, device protocol.Key) ([]*storage.Bundle, error)
	SubmitAccount(ctx context.Context, a *protocol.AccountBundle) error
	Account(ctx context.Context, account protocol.Key) (*storage.Account, error)
	// Status is served as JSON at GET /v1/status.
	Status(ctx context.Context) any
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
