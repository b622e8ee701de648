package httpapi

import (
	"net/http"
	"testing"
)

// FuzzDecodeJSONObject: the request-body decoder never panics, and every
// refusal carries a 4xx code chat-store's framework would use.
func FuzzDecodeJSONObject(f *testing.F) {
	for _, s := range []string{
		`{"device_id":"aa","payload":"AAAA","signature":"x"}`,
		`{"device_id":1}`, `[]`, `null`, `{`, `{"a":"\ud800"}`, `{"device_id":"a","device_id":"b","payload":"","signature":""}`,
		"{\"payload\":\"\xff\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		fields, rerr := decodeJSONObject(body, "device_id", "payload", "signature")
		if rerr != nil {
			switch rerr.code {
			case http.StatusBadRequest, http.StatusUnprocessableEntity:
			default:
				t.Fatalf("unexpected code %d", rerr.code)
			}
			return
		}
		for _, f := range []string{"device_id", "payload", "signature"} {
			if _, ok := fields[f]; !ok {
				t.Fatalf("accepted body lacks %s", f)
			}
		}
	})
}

// FuzzSignedFields: key, base64 and signature decoding never panic and only
// accept exact sizes.
func FuzzSignedFields(f *testing.F) {
	f.Add("8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c", "AGjlz4sBAABmYWtlLW1scy1rZXlwYWNrYWdlLWJ5dGVz",
		"fygNs4+JqzpxO460REm2KU5CiC3WFcOj0B0ViER/5W9wTJGNMqVUzeIlkCsZRqlwkS4lGlyxhomyfWqkXaKuDA==")
	f.Add("XYZ", "AB==", "\n")
	f.Fuzz(func(t *testing.T, key, payload, sig string) {
		k, p, s, rerr := signedFields(map[string]string{"device_id": key, "payload": payload, "signature": sig}, "device_id")
		if rerr != nil {
			if rerr.code != http.StatusBadRequest {
				t.Fatalf("code %d", rerr.code)
			}
			return
		}
		if len(key) != 64 || k.String() == "" || len(s) != 64 {
			t.Fatalf("accepted key %q", key)
		}
		if b64.EncodeToString(p) != payload {
			t.Fatalf("payload %q accepted but does not round-trip", payload)
		}
	})
}
