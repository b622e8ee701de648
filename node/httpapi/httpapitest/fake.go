package httpapitest

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
)

// Fake is an in-memory httpapi.Backend for tests of the API and of its
// clients (the CLI). It validates with a protocol.Policy (MLS off), keeps a
// device's bundles newest first, stores an account only for a greater
// lamport, and implements the single-use semantics the way the network
// does on one node: a claim hands out the oldest unclaimed one-time bundle
// of the suite, else the latest last-resort one (counting its hand-outs);
// claims are limited per requester and per target device with token
// buckets of ClaimRate/s and ClaimBurst; a consume notice deletes the
// named bundles of its device and tombstones them until its timestamp plus
// the retention, and a tombstoned bundle posted again is ErrConsumed. An
// injected error (Fail) is returned by every call that can fail.
type Fake struct {
	policy  protocol.Policy
	now     func() time.Time
	reached atomic.Int64

	mu         sync.Mutex
	err        error
	bundles    map[protocol.Key][]*httpapi.Bundle
	accounts   map[protocol.Key]*httpapi.Account
	lamports   map[protocol.Key]uint64
	tombstones map[protocol.Key]map[protocol.Ref]uint64 // device → ref → until (ms)
	handedOut  map[protocol.Ref]int64                   // last-resort hand-outs by ref
	limits     map[string]*bucket                       // "r:"+requester, "d:"+device
	status     *httpapi.Status
	requester  string // of the last claim
}

// The Fake's claim limits, as the node's defaults.
const (
	ClaimRate  = 20
	ClaimBurst = 40
)

var _ httpapi.Backend = (*Fake)(nil)

// NewFake returns an empty Fake on the clock now (nil: the wall clock).
func NewFake(now func() time.Time) *Fake {
	if now == nil {
		now = time.Now
	}
	p := protocol.DefaultPolicy()
	p.MLS = protocol.MLSOff
	return &Fake{policy: p, now: now, bundles: map[protocol.Key][]*httpapi.Bundle{},
		accounts: map[protocol.Key]*httpapi.Account{}, lamports: map[protocol.Key]uint64{},
		tombstones: map[protocol.Key]map[protocol.Ref]uint64{}, handedOut: map[protocol.Ref]int64{},
		limits: map[string]*bucket{}}
}

// Fail makes every later call that can fail return err (nil: succeed).
func (f *Fake) Fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// SetMLS sets the validation mode of bundles posted later (the default is
// off: opaque key_packages, never last-resort).
func (f *Fake) SetMLS(m protocol.MLSMode) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.policy.MLS = m
}

// LastRequester is the requester of the last claim.
func (f *Fake) LastRequester() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requester
}

// Reached counts the Backend calls the API made.
func (f *Fake) Reached() int64 { return f.reached.Load() }

// SetStatus makes Status serve st (nil: a status counting what is held).
func (f *Fake) SetStatus(st *httpapi.Status) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.status = st
}

// enter counts the call, locks f and returns the injected error; the
// caller unlocks.
func (f *Fake) enter() error {
	f.reached.Add(1)
	f.mu.Lock()
	return f.err
}

func (f *Fake) SubmitBundle(ctx context.Context, b *protocol.Bundle) error {
	f.mu.Lock()
	policy := f.policy
	f.mu.Unlock()
	info, err := policy.ValidateBundle(b, f.now())
	if err != nil {
		f.reached.Add(1)
		return err
	}
	err = f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return err
	}
	if until, ok := f.tombstones[b.DeviceID][info.Ref]; ok && until > uint64(f.now().UnixMilli()) {
		return fmt.Errorf("fake: bundle %s: %w", info.Ref, httpapi.ErrConsumed)
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

func (f *Fake) LatestBundle(ctx context.Context, device protocol.Key) (*httpapi.Bundle, error) {
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
	return copyBundle(best), nil
}

func (f *Fake) Bundles(ctx context.Context, device protocol.Key) ([]*httpapi.Bundle, error) {
	err := f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	out := make([]*httpapi.Bundle, 0, len(f.bundles[device]))
	for _, b := range f.bundles[device] {
		out = append(out, copyBundle(b))
	}
	return out, nil
}

func copyBundle(b *httpapi.Bundle) *httpapi.Bundle {
	c := *b
	return &c
}

func (f *Fake) SubmitAccount(ctx context.Context, a *protocol.AccountBundle) error {
	lamport, err := f.policy.ValidateAccount(a)
	if err != nil {
		f.reached.Add(1)
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

func (f *Fake) Account(ctx context.Context, account protocol.Key) (*httpapi.Account, error) {
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

func (f *Fake) Status(ctx context.Context) httpapi.Status {
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

// usable: within its MLS lifetime (an opaque key_package has none).
func (f *Fake) usable(b *httpapi.Bundle) bool {
	return b.NotAfterMS == 0 || b.NotAfterMS > f.now().UnixMilli()
}

// ofSuite: suite 0 is any; an opaque key_package has no suite to match.
func ofSuite(b *httpapi.Bundle, suite uint16) bool {
	if suite == 0 {
		return true
	}
	_, kp, _ := protocol.SplitBundlePayload(b.Payload)
	s, ok := protocol.KeyPackageCipherSuite(kp)
	return ok && s == suite
}

func (f *Fake) Claim(ctx context.Context, requester string, device protocol.Key, suite uint16) (*httpapi.Claim, error) {
	err := f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	f.requester = requester
	now := f.now()
	for _, k := range []string{"r:" + requester, "d:" + device.String()} {
		if wait := f.take(k, now); wait > 0 {
			return nil, &RateLimitedError{Wait: wait}
		}
	}
	held := f.bundles[device] // newest first
	for i := len(held) - 1; i >= 0; i-- {
		b := held[i]
		if !b.LastResort && !b.Claimed && f.usable(b) && ofSuite(b, suite) {
			b.Claimed = true
			return &httpapi.Claim{Bundle: *copyBundle(b)}, nil
		}
	}
	for _, b := range held {
		if b.LastResort && f.usable(b) && ofSuite(b, suite) {
			f.handedOut[b.Ref]++
			b.Claimed = true
			return &httpapi.Claim{Bundle: *copyBundle(b), LastResort: true}, nil
		}
	}
	return nil, httpapi.ErrNotFound
}

func (f *Fake) Count(ctx context.Context, device protocol.Key) (httpapi.ClaimCounts, error) {
	err := f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return httpapi.ClaimCounts{}, err
	}
	var c httpapi.ClaimCounts
	latest := true
	for _, b := range f.bundles[device] { // newest first
		switch {
		case !f.usable(b):
		case !b.LastResort:
			if !b.Claimed {
				c.OneTime++
			}
		default:
			c.LastResort++
			if latest {
				c.LastResortHandedOut, latest = f.handedOut[b.Ref], false
			}
		}
	}
	return c, nil
}

func (f *Fake) Consume(ctx context.Context, n *protocol.ConsumeNotice) error {
	info, err := f.policy.ValidateConsume(n, f.now())
	if err != nil {
		f.reached.Add(1)
		return err
	}
	err = f.enter()
	defer f.mu.Unlock()
	if err != nil {
		return err
	}
	named := make(map[protocol.Ref]bool, len(info.Refs))
	for _, r := range info.Refs {
		named[r] = true
	}
	for dev, held := range f.bundles {
		if dev == n.DeviceID {
			continue
		}
		for _, b := range held {
			if named[b.Ref] {
				return &protocol.ValidationError{Rule: protocol.RuleConsumeForeignRef, Field: "payload",
					Detail: "names a keypackage of another device"}
			}
		}
	}
	until := info.TimestampMS + uint64(f.policy.Retention.Milliseconds())
	ts := f.tombstones[n.DeviceID]
	if ts == nil {
		ts = map[protocol.Ref]uint64{}
		f.tombstones[n.DeviceID] = ts
	}
	for r := range named {
		ts[r] = max(ts[r], until)
	}
	f.bundles[n.DeviceID] = slices.DeleteFunc(f.bundles[n.DeviceID], func(b *httpapi.Bundle) bool { return named[b.Ref] })
	return nil
}

// RateLimitedError is the Fake's claim refusal: ErrRateLimited, with the
// wait until a token is back.
type RateLimitedError struct{ Wait time.Duration }

func (e *RateLimitedError) Error() string {
	return fmt.Sprintf("fake: claim limit, retry in %v", e.Wait)
}
func (e *RateLimitedError) Unwrap() error             { return httpapi.ErrRateLimited }
func (e *RateLimitedError) RetryAfter() time.Duration { return e.Wait }

// bucket is a token bucket of ClaimRate tokens a second, ClaimBurst deep.
type bucket struct {
	tokens float64
	at     time.Time
}

// take spends a token of k's bucket, or returns how long until one is
// back.
func (f *Fake) take(k string, now time.Time) time.Duration {
	b := f.limits[k]
	if b == nil {
		b = &bucket{tokens: ClaimBurst, at: now}
		f.limits[k] = b
	}
	b.tokens = min(ClaimBurst, b.tokens+now.Sub(b.at).Seconds()*ClaimRate)
	b.at = now
	if b.tokens < 1 {
		return time.Duration((1 - b.tokens) / ClaimRate * float64(time.Second))
	}
	b.tokens--
	return 0
}
