package httpapi_test

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
)

// fakeBackend is an in-memory Backend for the API's tests: it validates
// with a protocol.Policy (MLS off), keeps a device's bundles newest first,
// stores an account only for a greater lamport, and answers err (when set)
// from every call that can fail.
type fakeBackend struct {
	policy protocol.Policy
	now    func() time.Time
	// reached counts the calls the API made.
	reached atomic.Int64

	mu       sync.Mutex
	err      error
	bundles  map[protocol.Key][]*httpapi.Bundle
	accounts map[protocol.Key]*httpapi.Account
	lamports map[protocol.Key]uint64
	status   *httpapi.Status // served by Status when set
}

var _ httpapi.Backend = (*fakeBackend)(nil)

func newFakeBackend(now func() time.Time) *fakeBackend {
	if now == nil {
		now = time.Now
	}
	p := protocol.DefaultPolicy()
	p.MLS = protocol.MLSOff
	return &fakeBackend{policy: p, now: now, bundles: map[protocol.Key][]*httpapi.Bundle{},
		accounts: map[protocol.Key]*httpapi.Account{}, lamports: map[protocol.Key]uint64{}}
}

// fail makes every later call that can fail return err (nil: succeed).
func (f *fakeBackend) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// enter locks f and returns the injected error; the caller unlocks.
func (f *fakeBackend) enter() error {
	f.mu.Lock()
	return f.err
}

func (f *fakeBackend) SubmitBundle(ctx context.Context, b *protocol.Bundle) error {
	f.reached.Add(1)
	info, err := f.policy.ValidateBundle(b, f.now())
	if err != nil {
		return err
	}
	err = f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return err
	}
	held := f.bundles[b.DeviceID]
	for _, h := range held {
		if h.Ref == info.Ref && h.TimestampMS == info.TimestampMS {
			return nil
		}
	}
	held = append(held, &httpapi.Bundle{Bundle: protocol.Bundle{DeviceID: b.DeviceID, Payload: bytes.Clone(b.Payload), Signature: b.Signature}, BundleInfo: info})
	slices.SortStableFunc(held, func(x, y *httpapi.Bundle) int {
		switch {
		case x.TimestampMS > y.TimestampMS:
			return -1
		case x.TimestampMS < y.TimestampMS:
			return 1
		}
		return bytes.Compare(x.Ref[:], y.Ref[:])
	})
	f.bundles[b.DeviceID] = held
	return nil
}

func (f *fakeBackend) LatestBundle(ctx context.Context, device protocol.Key) (*httpapi.Bundle, error) {
	f.reached.Add(1)
	err := f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	var best *httpapi.Bundle
	for _, b := range f.bundles[device] {
		if best == nil || (b.LastResort && !best.LastResort) || (b.LastResort == best.LastResort && b.TimestampMS > best.TimestampMS) {
			best = b
		}
	}
	if best == nil {
		return nil, httpapi.ErrNotFound
	}
	return best, nil
}

func (f *fakeBackend) Bundles(ctx context.Context, device protocol.Key) ([]*httpapi.Bundle, error) {
	f.reached.Add(1)
	err := f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return slices.Clone(f.bundles[device]), nil
}

func (f *fakeBackend) SubmitAccount(ctx context.Context, a *protocol.AccountBundle) error {
	f.reached.Add(1)
	lamport, err := f.policy.ValidateAccount(a)
	if err != nil {
		return err
	}
	err = f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return err
	}
	if old, ok := f.lamports[a.AccountPub]; ok && lamport <= old {
		return httpapi.ErrStale
	}
	f.lamports[a.AccountPub] = lamport
	f.accounts[a.AccountPub] = &httpapi.Account{
		AccountBundle: protocol.AccountBundle{AccountPub: a.AccountPub, Payload: bytes.Clone(a.Payload), Signature: a.Signature},
		UpdatedAtMS:   f.now().UnixMilli(),
	}
	return nil
}

func (f *fakeBackend) Account(ctx context.Context, account protocol.Key) (*httpapi.Account, error) {
	f.reached.Add(1)
	err := f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	a, ok := f.accounts[account]
	if !ok {
		return nil, httpapi.ErrNotFound
	}
	return a, nil
}

func (f *fakeBackend) Status(ctx context.Context) httpapi.Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.status != nil {
		return *f.status
	}
	st := httpapi.Status{Version: "fake", Network: "test", MLSValidation: string(f.policy.MLS),
		Addrs: []string{}, Peers: []string{}, Shards: []int{}, Accounts: int64(len(f.accounts))}
	for _, bs := range f.bundles {
		if len(bs) > 0 {
			st.Devices++
			st.Bundles += int64(len(bs))
		}
	}
	return st
}

func (f *fakeBackend) Claim(context.Context, string, protocol.Key, uint16) (*httpapi.Claim, error) {
	return nil, errors.New("fake: claims not implemented yet")
}

func (f *fakeBackend) Count(context.Context, protocol.Key) (httpapi.ClaimCounts, error) {
	return httpapi.ClaimCounts{}, errors.New("fake: count not implemented yet")
}

func (f *fakeBackend) Consume(context.Context, *protocol.ConsumeNotice) error {
	return errors.New("fake: consume not implemented yet")
}
