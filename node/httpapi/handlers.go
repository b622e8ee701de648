package httpapi

import (
	"encoding/base64"
	"errors"
	"net/http"

	"github.com/kpnode/kpnode/protocol"
)

// Messages of chat-store that clients may match on.
const (
	msgNoKeyPackage = "no keypackage for device"
	msgNoAccount    = "no account bundle for account_pub"
	msgStale        = "stale bundle: lamport is not newer than the stored one"
	msgInternal     = "internal error"
	// Answers of 503: nothing is wrong with the request; the client should
	// try again later (Retry-After says when).
	msgUnavailable = "registry network unreachable, try again"
	msgStoreFull   = "registry store is full, try again later"
	msgOutboxFull  = "too many publications waiting for the registry network, try again"
)

// retryAfterSeconds is the Retry-After of a 503.
const retryAfterSeconds = "5"

// backendError maps a Backend error to its answer.
func (a *api) backendError(w http.ResponseWriter, r *http.Request, err error, notFound string) int {
	var ve *protocol.ValidationError
	switch {
	case errors.As(err, &ve):
		a.log.Debug("refused", "route", r.URL.Path, "rule", ve.Rule, "err", err)
		return writeError(w, http.StatusBadRequest, ve.Error())
	case errors.Is(err, ErrStale):
		return writeError(w, http.StatusConflict, msgStale)
	case errors.Is(err, ErrConsumed):
		return writeError(w, http.StatusConflict, msgConsumed)
	case errors.Is(err, ErrRateLimited):
		a.log.Debug("rate limited", "route", r.URL.Path, "err", err)
		w.Header().Set("Retry-After", retryAfter(err))
		return writeError(w, http.StatusTooManyRequests, msgRateLimited)
	case errors.Is(err, ErrNotFound):
		return writeError(w, http.StatusNotFound, notFound)
	case errors.Is(err, ErrUnavailable):
		a.log.Debug("unavailable", "route", r.URL.Path, "err", err)
		w.Header().Set("Retry-After", retryAfterSeconds)
		return writeError(w, http.StatusServiceUnavailable, msgUnavailable)
	case errors.Is(err, ErrStoreFull):
		a.log.Warn("write refused: store full", "route", r.URL.Path, "err", err)
		return writeError(w, http.StatusInsufficientStorage, msgStoreFull)
	case errors.Is(err, ErrOutboxFull):
		a.log.Warn("publication refused: outbox full", "route", r.URL.Path)
		w.Header().Set("Retry-After", retryAfterSeconds)
		return writeError(w, http.StatusServiceUnavailable, msgOutboxFull)
	default:
		if r.Context().Err() == nil {
			a.log.Error("backend failed", "route", r.URL.Path, "err", err)
		}
		return writeError(w, http.StatusInternalServerError, msgInternal)
	}
}

func (a *api) refuse(w http.ResponseWriter, r *http.Request, e *requestError) int {
	a.log.Debug("refused", "route", r.URL.Path, "code", e.code, "err", e.msg)
	return writeError(w, e.code, e.msg)
}

// postSigned serves a POST of a signed record, {keyField, "payload",
// "signature"}: the body's shape and encodings are checked in chat-store's
// order, then submit decides.
func (a *api) postSigned(w http.ResponseWriter, r *http.Request, keyField, notFound string, submit func(key protocol.Key, payload []byte, sig [protocol.SignatureSize]byte) error) int {
	body, rerr := readJSONObject(w, r, a.maxBody, keyField, "payload", "signature")
	if rerr != nil {
		return a.refuse(w, r, rerr)
	}
	key, payload, sig, rerr := signedFields(body, keyField)
	if rerr != nil {
		return a.refuse(w, r, rerr)
	}
	if err := submit(key, payload, sig); err != nil {
		return a.backendError(w, r, err, notFound)
	}
	return writeNoContent(w)
}

func (a *api) postKeyPackage(w http.ResponseWriter, r *http.Request) int {
	return a.postSigned(w, r, "device_id", msgNoKeyPackage, func(key protocol.Key, payload []byte, sig [protocol.SignatureSize]byte) error {
		return a.backend.SubmitBundle(r.Context(), &protocol.Bundle{DeviceID: key, Payload: payload, Signature: sig})
	})
}

func (a *api) postAccount(w http.ResponseWriter, r *http.Request) int {
	return a.postSigned(w, r, "account_pub", msgNoAccount, func(key protocol.Key, payload []byte, sig [protocol.SignatureSize]byte) error {
		return a.backend.SubmitAccount(r.Context(), &protocol.AccountBundle{AccountPub: key, Payload: payload, Signature: sig})
	})
}

// keyPackageBody is chat-store's GET /v0/keypackage reply, fields in order.
type keyPackageBody struct {
	Payload   string `json:"payload"`
	Signature string `json:"signature"`
}

// accountBody is chat-store's GET /v0/account reply, fields in order.
type accountBody struct {
	Payload   string `json:"payload"`
	Signature string `json:"signature"`
	UpdatedAt int64  `json:"updated_at"`
}

var b64 = base64.StdEncoding

func (a *api) getKeyPackage(w http.ResponseWriter, r *http.Request) int {
	// chat-store looks the segment up verbatim, so anything that is not a key
	// is simply unknown: 404. Keys are normalised, so any hex case is found.
	key, err := protocol.ParseKey(r.PathValue("device_id"))
	if err != nil {
		return writeError(w, http.StatusNotFound, msgNoKeyPackage)
	}
	b, err := a.backend.LatestBundle(r.Context(), key)
	if err != nil {
		return a.backendError(w, r, err, msgNoKeyPackage)
	}
	return writeJSON(w, http.StatusOK, keyPackageBody{
		Payload:   b64.EncodeToString(b.Payload),
		Signature: b64.EncodeToString(b.Signature[:]),
	})
}

func (a *api) getAccount(w http.ResponseWriter, r *http.Request) int {
	key, err := protocol.ParseKey(r.PathValue("account_pub"))
	if err != nil {
		return writeError(w, http.StatusNotFound, msgNoAccount)
	}
	acct, err := a.backend.Account(r.Context(), key)
	if err != nil {
		return a.backendError(w, r, err, msgNoAccount)
	}
	return writeJSON(w, http.StatusOK, accountBody{
		Payload:   b64.EncodeToString(acct.Payload),
		Signature: b64.EncodeToString(acct.Signature[:]),
		UpdatedAt: acct.UpdatedAtMS,
	})
}

// bundleListBody is the v1 list of a device's bundles.
type bundleListBody struct {
	DeviceID string           `json:"device_id"`
	Bundles  []bundleListItem `json:"bundles"`
}

type bundleListItem struct {
	Ref         string `json:"ref"`
	TimestampMS uint64 `json:"timestamp_ms"`
	LastResort  bool   `json:"last_resort"`
	Claimed     bool   `json:"claimed"`
	Payload     string `json:"payload"`
	Signature   string `json:"signature"`
}

func (a *api) listKeyPackages(w http.ResponseWriter, r *http.Request) int {
	key, err := protocol.ParseKey(r.PathValue("device_id"))
	if err != nil {
		return writeError(w, http.StatusBadRequest, msgBadDeviceID)
	}
	bundles, err := a.backend.Bundles(r.Context(), key)
	if err != nil {
		return a.backendError(w, r, err, msgNoKeyPackage)
	}
	out := bundleListBody{DeviceID: key.String(), Bundles: make([]bundleListItem, 0, len(bundles))}
	for _, b := range bundles {
		out.Bundles = append(out.Bundles, bundleListItem{
			Ref:         b.Ref.String(),
			TimestampMS: b.TimestampMS,
			LastResort:  b.LastResort,
			Claimed:     b.Claimed,
			Payload:     b64.EncodeToString(b.Payload),
			Signature:   b64.EncodeToString(b.Signature[:]),
		})
	}
	return writeJSON(w, http.StatusOK, out)
}

func (a *api) status(w http.ResponseWriter, r *http.Request) int {
	return writeJSON(w, http.StatusOK, a.backend.Status(r.Context()))
}

func (a *api) healthz(w http.ResponseWriter, r *http.Request) int {
	return writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
