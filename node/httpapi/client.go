package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
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

// StatusError is a non-2xx answer other than 404 on a GET.
type StatusError struct {
	Code    int
	Message string // the {"error"} text, or the raw body
}

func (e *StatusError) Error() string { return fmt.Sprintf("http %d: %s", e.Code, e.Message) }

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
	return &StatusError{Code: resp.StatusCode, Message: msg}
}

func (c *Client) getJSON(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
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
