package httpapi

import (
	"net/http"
	"net/url"
	"strconv"
	"strings"
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

// FuzzClaimParams: the claim query decoder never panics, refuses with a
// 400 only, and accepts exactly one decimal cipher_suite of 0..65535 (or
// none), answering its value.
func FuzzClaimParams(f *testing.F) {
	for _, s := range []string{"", "cipher_suite=1", "cipher_suite=65535", "cipher_suite=65536", "cipher_suite=-1",
		"cipher_suite=1&cipher_suite=1", "cipher_suite=%31", "cipher_suite=+1", "cipher_suite=0x4D", "other=1", "cipher_suite=%zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, rawQuery string) {
		r := &http.Request{URL: &url.URL{RawQuery: rawQuery}, Body: http.NoBody}
		suite, rerr := claimParams(r)
		vs := r.URL.Query()["cipher_suite"]
		if rerr != nil {
			if rerr.code != http.StatusBadRequest {
				t.Fatalf("code %d", rerr.code)
			}
			if len(vs) == 1 {
				if n, err := strconv.ParseUint(vs[0], 10, 16); err == nil {
					t.Fatalf("refused a valid suite %d", n)
				}
			}
			return
		}
		switch len(vs) {
		case 0:
			if suite != 0 {
				t.Fatalf("suite %d without a parameter", suite)
			}
		case 1:
			if strconv.Itoa(int(suite)) != strings.TrimLeft(vs[0], "0") && !(suite == 0 && strings.Trim(vs[0], "0") == "") {
				t.Fatalf("suite %d from %q", suite, vs[0])
			}
		default:
			t.Fatalf("accepted %d values", len(vs))
		}
	})
}
