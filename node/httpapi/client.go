package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/ed25519strict"
)

// Client talks to a node's HTTP API the way the chat client does. It
// verifies every bundle it fetches under the key it asked for.
type Client struct {
	base string
	http *http.Client
}

// StatusError is a non-2xx answer other than 404 on a GET. It matches
// (errors.Is) ErrRateLimited for a 429, ErrConsumed for a 409 "keypackage
// consumed", ErrStale for another 409, and ErrUnavailable for a 503.
type StatusError struct {
	Code    int
	Message string // the {"error"} text, or the raw body
	// Retry is the answer's Retry-After in seconds; 0 when it has none.
	Retry time.Duration
}

func (e *StatusError) Error() string { return fmt.Sprintf("http %d: %s", e.Code, e.Message) }

// Is matches the sentinel the server answered e for.
func (e *StatusError) Is(target error) bool {
	switch target {
	case ErrRateLimited:
		return e.Code == http.StatusTooManyRequests
	case ErrConsumed:
		return e.Code == http.StatusConflict && e.Message == msgConsumed
	case ErrStale:
		return e.Code == http.StatusConflict && e.Message != msgConsumed
	case ErrUnavailable:
		return e.Code == http.StatusServiceUnavailable
	}
	return false
}

// RetryAfter is the answer's Retry-After (0 when it had none).
func (e *StatusError) RetryAfter() time.Duration { return e.Retry }

// NewClient returns a client for base ("127.0.0.1:8080" or a URL); hc nil
// means a client with a 10 s timeout, as the chat client uses.
func NewClient(base string, hc *http.Client) *Client {
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	if hc == nil {
		hc = &http.Client{Timeout: 10 * time.Second}
	}
	return &Client{base: strings.TrimRight(base, "/"), http: hc}
}

// BaseURL returns the API's base URL.
func (c *Client) BaseURL() string { return c.base }

type postBody struct {
	DeviceID   string `json:"device_id,omitempty"`
	AccountPub string `json:"account_pub,omitempty"`
	Payload    string `json:"payload"`
	Signature  string `json:"signature"`
}

// PublishBundle posts a bundle to POST /v0/keypackage.
func (c *Client) PublishBundle(ctx context.Context, b *protocol.Bundle) error {
	return c.post(ctx, "/v0/keypackage", postBody{DeviceID: b.DeviceID.String(),
		Payload: b64.EncodeToString(b.Payload), Signature: b64.EncodeToString(b.Signature[:])})
}

// PublishAccount posts an account bundle to POST /v0/account.
func (c *Client) PublishAccount(ctx context.Context, a *protocol.AccountBundle) error {
	return c.post(ctx, "/v0/account", postBody{AccountPub: a.AccountPub.String(),
		Payload: b64.EncodeToString(a.Payload), Signature: b64.EncodeToString(a.Signature[:])})
}

func (c *Client) post(ctx context.Context, path string, body postBody) error {
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, bytes.NewReader(data))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	return readStatusError(resp)
}

func readStatusError(resp *http.Response) error {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var eb errorBody
	msg := strings.TrimSpace(string(raw))
	if json.Unmarshal(raw, &eb) == nil && eb.Error != "" {
		msg = eb.Error
	}
	se := &StatusError{Code: resp.StatusCode, Message: msg}
	if s, err := strconv.ParseUint(resp.Header.Get("Retry-After"), 10, 32); err == nil {
		se.Retry = time.Duration(s) * time.Second
	}
	return se
}

func (c *Client) getJSON(ctx context.Context, path string, v any) error {
	return c.doJSON(ctx, http.MethodGet, path, v)
}

// doJSON sends a bodiless request and decodes a 2xx JSON answer into v; a
// 404 is ErrNotFound, any other code a *StatusError.
func (c *Client) doJSON(ctx context.Context, method, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		io.Copy(io.Discard, resp.Body)
		return ErrNotFound
	case resp.StatusCode/100 != 2:
		return readStatusError(resp)
	}
	dec := json.NewDecoder(io.LimitReader(resp.Body, 16<<20))
	return dec.Decode(v)
}

// FetchBundle gets a device's bundle from GET /v0/keypackage/{device_id}
// and verifies its signature strictly under device.
func (c *Client) FetchBundle(ctx context.Context, device protocol.Key) (*protocol.Bundle, error) {
	var body keyPackageBody
	if err := c.getJSON(ctx, "/v0/keypackage/"+device.String(), &body); err != nil {
		return nil, err
	}
	b := &protocol.Bundle{DeviceID: device}
	var err error
	if b.Payload, b.Signature, err = decodeSigned(body.Payload, body.Signature); err != nil {
		return nil, err
	}
	if err := ed25519strict.Verify(device[:], b.Payload, b.Signature[:]); err != nil {
		return nil, fmt.Errorf("bundle from %s: %w", c.base, err)
	}
	if len(b.Payload) < protocol.TimestampSize {
		return nil, fmt.Errorf("bundle from %s: payload of %d bytes", c.base, len(b.Payload))
	}
	return b, nil
}

// FetchAccount gets an account bundle from GET /v0/account/{account_pub}
// and verifies its signature strictly under account; UpdatedAtMS is the
// node's updated_at.
func (c *Client) FetchAccount(ctx context.Context, account protocol.Key) (*Account, error) {
	var body accountBody
	if err := c.getJSON(ctx, "/v0/account/"+account.String(), &body); err != nil {
		return nil, err
	}
	a := &Account{AccountBundle: protocol.AccountBundle{AccountPub: account}, UpdatedAtMS: body.UpdatedAt}
	var err error
	if a.Payload, a.Signature, err = decodeSigned(body.Payload, body.Signature); err != nil {
		return nil, err
	}
	if err := ed25519strict.Verify(account[:], a.Payload, a.Signature[:]); err != nil {
		return nil, fmt.Errorf("account bundle from %s: %w", c.base, err)
	}
	return a, nil
}

// Status gets GET /v1/status as raw JSON.
func (c *Client) Status(ctx context.Context) (json.RawMessage, error) {
	var raw json.RawMessage
	err := c.getJSON(ctx, "/v1/status", &raw)
	return raw, err
}

func decodeSigned(payload, signature string) ([]byte, [protocol.SignatureSize]byte, error) {
	var sig [protocol.SignatureSize]byte
	p, ok := decodeBase64(payload)
	if !ok {
		return nil, sig, errors.New("reply payload is not valid base64")
	}
	s, ok := decodeBase64(signature)
	if !ok || len(s) != protocol.SignatureSize {
		return nil, sig, errors.New("reply signature is not base64 of 64 bytes")
	}
	copy(sig[:], s)
	return p, sig, nil
}

// ClaimResult is one claimed bundle, verified under the device it was
// claimed for.
type ClaimResult struct {
	protocol.Bundle
	Ref         protocol.Ref
	TimestampMS uint64
	LastResort  bool
}

// AccountClaimDevice is one element of an account claim: a bundle, or the
// error the node answered for the device.
type AccountClaimDevice struct {
	DeviceID protocol.Key
	Claim    *ClaimResult // nil when Error is set
	Error    string
}

// AccountClaim is the answer of POST /v1/accounts/{account_pub}/claim.
type AccountClaim struct {
	AccountPub protocol.Key
	Lamport    uint64
	Devices    []AccountClaimDevice
}

// Claim claims one bundle of device (POST /v1/keypackages/{device_id}/claim)
// of cipher suite suite (0: any) and verifies it: signature under device,
// a payload with a timestamp equal to the one served. A 404 is
// ErrNotFound, a 429 a *StatusError matching ErrRateLimited.
func (c *Client) Claim(ctx context.Context, device protocol.Key, suite uint16) (*ClaimResult, error) {
	path := "/v1/keypackages/" + device.String() + "/claim"
	if suite != 0 {
		path += "?cipher_suite=" + strconv.Itoa(int(suite))
	}
	var body claimWire
	if err := c.doJSON(ctx, http.MethodPost, path, &body); err != nil {
		return nil, err
	}
	return c.verifyClaim(device, &body)
}

// ClaimAccount claims one bundle for each device of an account (POST
// /v1/accounts/{account_pub}/claim) and verifies each bundle under its
// device. A 404 is ErrNotFound (no such account).
func (c *Client) ClaimAccount(ctx context.Context, account protocol.Key, suite uint16) (*AccountClaim, error) {
	path := "/v1/accounts/" + account.String() + "/claim"
	if suite != 0 {
		path += "?cipher_suite=" + strconv.Itoa(int(suite))
	}
	var body struct {
		AccountPub string      `json:"account_pub"`
		Lamport    uint64      `json:"lamport"`
		Devices    []claimWire `json:"devices"`
	}
	if err := c.doJSON(ctx, http.MethodPost, path, &body); err != nil {
		return nil, err
	}
	if got, err := protocol.ParseKey(body.AccountPub); err != nil || got != account {
		return nil, fmt.Errorf("account claim from %s: answer for account %q", c.base, body.AccountPub)
	}
	out := &AccountClaim{AccountPub: account, Lamport: body.Lamport, Devices: make([]AccountClaimDevice, len(body.Devices))}
	for i := range body.Devices {
		w := &body.Devices[i]
		dev, err := protocol.ParseKey(w.DeviceID)
		if err != nil {
			return nil, fmt.Errorf("account claim from %s: device_id %q", c.base, w.DeviceID)
		}
		out.Devices[i].DeviceID = dev
		if w.Error != "" {
			out.Devices[i].Error = w.Error
			continue
		}
		if out.Devices[i].Claim, err = c.verifyClaim(dev, w); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// claimWire is a claim object, or an account claim's error element.
type claimWire struct {
	DeviceID    string `json:"device_id"`
	Ref         string `json:"ref"`
	Payload     string `json:"payload"`
	Signature   string `json:"signature"`
	TimestampMS uint64 `json:"timestamp_ms"`
	LastResort  bool   `json:"last_resort"`
	Error       string `json:"error"`
}

func (c *Client) verifyClaim(device protocol.Key, w *claimWire) (*ClaimResult, error) {
	if got, err := protocol.ParseKey(w.DeviceID); err != nil || got != device {
		return nil, fmt.Errorf("claim from %s: answer for device %q, asked for %s", c.base, w.DeviceID, device)
	}
	ref, err := protocol.ParseRef(w.Ref)
	if err != nil {
		return nil, fmt.Errorf("claim from %s: ref: %w", c.base, err)
	}
	r := &ClaimResult{Bundle: protocol.Bundle{DeviceID: device}, Ref: ref, TimestampMS: w.TimestampMS, LastResort: w.LastResort}
	if r.Payload, r.Signature, err = decodeSigned(w.Payload, w.Signature); err != nil {
		return nil, err
	}
	if err := ed25519strict.Verify(device[:], r.Payload, r.Signature[:]); err != nil {
		return nil, fmt.Errorf("claim from %s: %w", c.base, err)
	}
	ts, _, err := protocol.SplitBundlePayload(r.Payload)
	if err != nil || ts != w.TimestampMS {
		return nil, fmt.Errorf("claim from %s: timestamp_ms %d does not match the payload", c.base, w.TimestampMS)
	}
	return r, nil
}

// Count gets GET /v1/keypackages/{device_id}/count.
func (c *Client) Count(ctx context.Context, device protocol.Key) (ClaimCounts, error) {
	var body countBody
	if err := c.getJSON(ctx, "/v1/keypackages/"+device.String()+"/count", &body); err != nil {
		return ClaimCounts{}, err
	}
	if got, err := protocol.ParseKey(body.DeviceID); err != nil || got != device {
		return ClaimCounts{}, fmt.Errorf("count from %s: answer for device %q", c.base, body.DeviceID)
	}
	return body.ClaimCounts, nil
}

// Consume posts a consume notice to POST /v1/consume.
func (c *Client) Consume(ctx context.Context, n *protocol.ConsumeNotice) error {
	return c.post(ctx, "/v1/consume", postBody{DeviceID: n.DeviceID.String(),
		Payload: b64.EncodeToString(n.Payload), Signature: b64.EncodeToString(n.Signature[:])})
}
