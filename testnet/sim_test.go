package testnet

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/kpnode/kpnode/testnet/simnet"
)

// startSim starts a simulated network and waits until it has formed. Call
// it inside synctest.Test: the network runs in virtual time and is closed
// when the bubble's test ends.
func startSim(t *testing.T, opts simnet.Options) *simnet.Network {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger()
	}
	nw, err := simnet.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nw.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := nw.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := nw.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return nw
}

// handlerTransport is an http.RoundTripper that serves every request with
// h, in process: an HTTP client talks to a node's API without a socket
// (whose accept loop would stop synctest's clock).
type handlerTransport struct{ h http.Handler }

func (t handlerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	rec := httptest.NewRecorder()
	t.h.ServeHTTP(rec, req)
	return rec.Result(), nil
}
