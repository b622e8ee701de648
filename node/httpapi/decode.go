package httpapi

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/kpnode/kpnode/protocol"
)

// requestError is a refusal with its status code and chat-store message.
type requestError struct {
	code int
	msg  string
}

func (e *requestError) Error() string { return e.msg }

func badRequest(msg string) *requestError { return &requestError{http.StatusBadRequest, msg} }

// readJSONObject reads the body of a JSON POST the way chat-store's axum
// extractor does, with JSON errors: 415 for a missing or non-JSON content
// type, 413 for a body over the cap, 400 for malformed JSON, 422 for a
// missing field, a field that is not a string, or a body that is not an
// object. Unknown fields are ignored; field names are case-sensitive.
func readJSONObject(w http.ResponseWriter, r *http.Request, maxBody int64, fields ...string) (map[string]string, *requestError) {
	if !isJSONContentType(r.Header.Get("Content-Type")) {
		return nil, &requestError{http.StatusUnsupportedMediaType, "expected request with `Content-Type: application/json`"}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, &requestError{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body is larger than %d bytes", maxBody)}
		}
		return nil, badRequest("failed to read request body")
	}
	return decodeJSONObject(body, fields...)
}

// decodeJSONObject is the body-parsing half of readJSONObject.
func decodeJSONObject(body []byte, fields ...string) (map[string]string, *requestError) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return nil, &requestError{http.StatusUnprocessableEntity, "request body must be a JSON object"}
		}
		return nil, badRequest("request body is not valid JSON")
	}
	if raw == nil { // the body was `null`
		return nil, &requestError{http.StatusUnprocessableEntity, "request body must be a JSON object"}
	}
	out := make(map[string]string, len(fields))
	for _, f := range fields {
		v, ok := raw[f]
		if !ok {
			return nil, &requestError{http.StatusUnprocessableEntity, fmt.Sprintf("missing field `%s`", f)}
		}
		var s string
		if len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &s) != nil {
			return nil, &requestError{http.StatusUnprocessableEntity, fmt.Sprintf("field `%s` must be a string", f)}
		}
		out[f] = s
	}
	return out, nil
}

// isJSONContentType accepts application/json and application/*+json, with
// parameters, as axum does.
func isJSONContentType(ct string) bool {
	if ct == "" {
		return false
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return false
	}
	return mt == "application/json" || (strings.HasPrefix(mt, "application/") && strings.HasSuffix(mt, "+json"))
}

var strictBase64 = base64.StdEncoding.Strict()

// decodeBase64 decodes padded standard base64 strictly: no whitespace
// (Go's decoder skips \r and \n, Rust's does not) and zero trailing bits.
func decodeBase64(s string) ([]byte, bool) {
	if strings.ContainsAny(s, "\r\n") {
		return nil, false
	}
	b, err := strictBase64.DecodeString(s)
	return b, err == nil
}

// signedFields decodes the key, payload and signature of a POST in
// chat-store's order of checks (1–3); keyField is device_id or account_pub.
func signedFields(body map[string]string, keyField string) (protocol.Key, []byte, [protocol.SignatureSize]byte, *requestError) {
	var sig [protocol.SignatureSize]byte
	key, err := protocol.ParseKey(body[keyField])
	if err != nil {
		return key, nil, sig, badRequest(keyField + ": must be hex of a 32-byte key")
	}
	payload, ok := decodeBase64(body["payload"])
	if !ok {
		return key, nil, sig, badRequest("payload: not valid base64")
	}
	s, ok := decodeBase64(body["signature"])
	if !ok || len(s) != protocol.SignatureSize {
		return key, nil, sig, badRequest("signature: must be base64 of 64 bytes")
	}
	copy(sig[:], s)
	return key, payload, sig, nil
}
