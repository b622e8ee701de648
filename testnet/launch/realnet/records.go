package realnet

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

// NewBundles returns n bundles of fresh devices, each a real 0x004D
// last-resort KeyPackage, generated on every core.
func NewBundles(ctx context.Context, n int) ([]protocol.Bundle, error) {
	out := make([]protocol.Bundle, n)
	errs := make(chan error, 1)
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < runtime.GOMAXPROCS(0); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				_, dev, err := ed25519.GenerateKey(rand.Reader)
				if err == nil {
					var kp []byte
					if kp, _, err = mlstest.Generate(mlstest.Options{Signer: dev, LastResort: true}); err == nil {
						out[i] = protocol.SignBundle(dev, uint64(time.Now().UnixMilli()), kp)
						continue
					}
				}
				select {
				case errs <- err:
				default:
				}
			}
		}()
	}
	var err error
feed:
	for i := 0; i < n; i++ {
		select {
		case next <- i:
		case err = <-errs:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return out, err
}

// Wins reports whether account bundle a replaces b under the network's
// convergence rule (greater lamport, then smaller SHA-256 of the payload).
func Wins(a, b *protocol.AccountBundle) bool {
	la, _ := protocol.AccountLamport(a.Payload)
	lb, _ := protocol.AccountLamport(b.Payload)
	return protocol.AccountSupersedes(la, a.Payload, lb, b.Payload)
}

// Fingerprint names an account bundle version in reports: lamport and the
// first bytes of the payload's SHA-256.
func Fingerprint(payload []byte) string {
	l, _ := protocol.AccountLamport(payload)
	h := sha256.Sum256(payload)
	return fmt.Sprintf("l%d/%x", l, h[:4])
}

// Missing counts the bundles of want that client does not serve as the
// device's latest with the same payload.
func Missing(ctx context.Context, client *httpapi.Client, want []*protocol.Bundle) (int, error) {
	missing := 0
	for _, b := range want {
		got, err := client.FetchBundle(ctx, b.DeviceID)
		var se *httpapi.StatusError
		switch {
		case err == nil && bytes.Equal(got.Payload, b.Payload):
		case err == nil, errors.As(err, &se) && se.Code == 404:
			missing++
		default:
			return missing, err
		}
	}
	return missing, nil
}
