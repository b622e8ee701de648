package httpapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/kpnode/kpnode/protocol"
)

// Single-use routes: claim, account claim, count, consume.

// MaxAccountClaimDevices caps the devices one POST
// /v1/accounts/{account_pub}/claim claims for; the devices listed after
// them get an error element (a client claims them with the per-device
// route). Each device's claim spends one of the requester's claim tokens,
// so the cap stays under the node's per-requester burst (40): one account
// claim from a fresh client is never cut short by its own limit. The chat
// client lists a handful of devices per account.
const MaxAccountClaimDevices = 32

// accountClaimWorkers bounds the claims one account claim runs at once.
const accountClaimWorkers = 8

// Messages of the single-use routes.
const (
	msgConsumed          = "keypackage consumed"
	msgRateLimited       = "rate limited"
	msgNoDeviceList      = "account bundle has no device list"
	msgClaimBody         = "claim takes no request body; pass cipher_suite in the query"
	msgCipherSuite       = "cipher_suite: must be a decimal number from 0 to 65535"
	msgBadDeviceID       = "device_id: must be hex of a 32-byte key"
	msgBadAccountPub     = "account_pub: must be hex of a 32-byte key"
	msgTooManyDevices    = "too many devices in one account claim"
	msgDeviceListedTwice = "device listed twice in the account bundle"
)

// claimBody is the answer of a claim, fields in the order.
type claimBody struct {
	DeviceID    string `json:"device_id"`
	Ref         string `json:"ref"`
	Payload     string `json:"payload"`
	Signature   string `json:"signature"`
	TimestampMS uint64 `json:"timestamp_ms"`
	LastResort  bool   `json:"last_resort"`
}

func newClaimBody(c *Claim) claimBody {
	return claimBody{
		DeviceID:    c.DeviceID.String(),
		Ref:         c.Ref.String(),
		Payload:     b64.EncodeToString(c.Payload),
		Signature:   b64.EncodeToString(c.Signature[:]),
		TimestampMS: c.TimestampMS,
		LastResort:  c.LastResort,
	}
}

// deviceError is an element of an account claim whose device got nothing.
type deviceError struct {
	DeviceID string `json:"device_id"`
	Error    string `json:"error"`
}

// accountClaimBody is the answer of an account claim; each element of
// Devices is a claimBody or a deviceError.
type accountClaimBody struct {
	AccountPub string `json:"account_pub"`
	Lamport    uint64 `json:"lamport"`
	Devices    []any  `json:"devices"`
}

// countBody is the answer of GET /v1/keypackages/{device_id}/count.
type countBody struct {
	DeviceID string `json:"device_id"`
	ClaimCounts
}

// requester names the client for the per-requester claim limit: the IP of
// the connection's remote address (the port changes per connection).
func requester(r *http.Request) string {
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return host
	}
	return r.RemoteAddr
}

// claimParams reads what a claim request may carry: no body, and an
// optional cipher_suite query parameter (0, or absent, means any suite).
func claimParams(r *http.Request) (uint16, *requestError) {
	if r.ContentLength > 0 {
		return 0, badRequest(msgClaimBody)
	}
	if r.ContentLength < 0 { // chunked: look for a first byte
		var one [1]byte
		if n, _ := io.ReadFull(io.LimitReader(r.Body, 1), one[:]); n > 0 {
			return 0, badRequest(msgClaimBody)
		}
	}
	vs, ok := r.URL.Query()["cipher_suite"]
	if !ok {
		return 0, nil
	}
	if len(vs) != 1 {
		return 0, badRequest(msgCipherSuite)
	}
	s, err := strconv.ParseUint(vs[0], 10, 16)
	if err != nil {
		return 0, badRequest(msgCipherSuite)
	}
	return uint16(s), nil
}

func (a *api) claimKeyPackage(w http.ResponseWriter, r *http.Request) int {
	key, err := protocol.ParseKey(r.PathValue("device_id"))
	if err != nil {
		return writeError(w, http.StatusBadRequest, msgBadDeviceID)
	}
	suite, rerr := claimParams(r)
	if rerr != nil {
		return a.refuse(w, r, rerr)
	}
	c, err := a.backend.Claim(r.Context(), requester(r), key, suite)
	if err != nil {
		return a.backendError(w, r, err, msgNoKeyPackage)
	}
	return writeJSON(w, http.StatusOK, newClaimBody(c))
}

func (a *api) claimAccount(w http.ResponseWriter, r *http.Request) int {
	key, err := protocol.ParseKey(r.PathValue("account_pub"))
	if err != nil {
		return writeError(w, http.StatusBadRequest, msgBadAccountPub)
	}
	suite, rerr := claimParams(r)
	if rerr != nil {
		return a.refuse(w, r, rerr)
	}
	acct, err := a.backend.Account(r.Context(), key)
	if err != nil {
		return a.backendError(w, r, err, msgNoAccount)
	}
	d, err := protocol.DecodeAccountPayload(acct.Payload)
	if err != nil {
		// The account exists but its payload is not the chat client's
		// device list (it may be any payload with a lamport header).
		a.log.Debug("account claim: no device list", "account", key, "err", err)
		return writeError(w, http.StatusUnprocessableEntity, msgNoDeviceList)
	}
	out := accountClaimBody{AccountPub: key.String(), Lamport: d.Lamport, Devices: make([]any, len(d.Devices))}
	var (
		wg   sync.WaitGroup
		jobs = make(chan int)
		seen = make(map[protocol.Key]bool, len(d.Devices))
	)
	for range min(accountClaimWorkers, len(d.Devices)) {
		wg.Go(func() {
			for i := range jobs {
				dev := d.Devices[i]
				c, err := a.backend.Claim(r.Context(), requester(r), dev, suite)
				if err != nil {
					out.Devices[i] = deviceError{DeviceID: dev.String(), Error: a.deviceErrorMessage(r, err)}
					continue
				}
				out.Devices[i] = newClaimBody(c)
			}
		})
	}
	claimed := 0
	for i, dev := range d.Devices {
		switch {
		case seen[dev]:
			out.Devices[i] = deviceError{DeviceID: dev.String(), Error: msgDeviceListedTwice}
		case claimed == MaxAccountClaimDevices:
			out.Devices[i] = deviceError{DeviceID: dev.String(), Error: fmt.Sprintf("%s (at most %d)", msgTooManyDevices, MaxAccountClaimDevices)}
		default:
			seen[dev] = true
			claimed++
			jobs <- i
		}
	}
	close(jobs)
	wg.Wait()
	if err := r.Context().Err(); err != nil {
		return a.backendError(w, r, err, msgNoAccount)
	}
	return writeJSON(w, http.StatusOK, out)
}

// deviceErrorMessage is the error text of one device of an account claim:
// the message its own claim would answer.
func (a *api) deviceErrorMessage(r *http.Request, err error) string {
	var ve *protocol.ValidationError
	switch {
	case errors.As(err, &ve):
		return ve.Error()
	case errors.Is(err, ErrRateLimited):
		return msgRateLimited
	case errors.Is(err, ErrNotFound):
		return msgNoKeyPackage
	case errors.Is(err, ErrUnavailable):
		return msgUnavailable
	default:
		if !errors.Is(err, context.Canceled) {
			a.log.Error("backend failed", "route", r.URL.Path, "err", err)
		}
		return msgInternal
	}
}

func (a *api) countKeyPackages(w http.ResponseWriter, r *http.Request) int {
	key, err := protocol.ParseKey(r.PathValue("device_id"))
	if err != nil {
		return writeError(w, http.StatusBadRequest, msgBadDeviceID)
	}
	c, err := a.backend.Count(r.Context(), key)
	if err != nil {
		return a.backendError(w, r, err, msgNoKeyPackage)
	}
	return writeJSON(w, http.StatusOK, countBody{DeviceID: key.String(), ClaimCounts: c})
}

func (a *api) postConsume(w http.ResponseWriter, r *http.Request) int {
	return a.postSigned(w, r, "device_id", msgNoKeyPackage, func(key protocol.Key, payload []byte, sig [protocol.SignatureSize]byte) error {
		return a.backend.Consume(r.Context(), &protocol.ConsumeNotice{DeviceID: key, Payload: payload, Signature: sig})
	})
}

// retryAfter is the Retry-After of a 429: the error's RetryAfter() rounded
// up to whole seconds, at least 1; 1 when it has none.
func retryAfter(err error) string {
	var ra interface{ RetryAfter() time.Duration }
	if !errors.As(err, &ra) {
		return "1"
	}
	d := ra.RetryAfter()
	if d <= time.Second {
		return "1"
	}
	s := math.Ceil(d.Seconds())
	if s > 3600 {
		s = 3600
	}
	return strconv.Itoa(int(s))
}
