package httpapitest

import (
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/kpnode/kpnode/protocol"
)

// ClaimFields are the keys of a claim answer, in the order they are served.
var ClaimFields = []string{"device_id", "ref", "payload", "signature", "timestamp_ms", "last_resort"}

// ConsumeJSON is a POST /v1/consume body for n.
func ConsumeJSON(n protocol.ConsumeNotice) map[string]string {
	return map[string]string{"device_id": n.DeviceID.String(), "payload": b64.EncodeToString(n.Payload), "signature": b64.EncodeToString(n.Signature[:])}
}

// ClaimJSON is the claim answer the server gives for b.
func ClaimJSON(b protocol.Bundle, lastResort bool) string {
	ts, kp, _ := protocol.SplitBundlePayload(b.Payload)
	return fmt.Sprintf(`{"device_id":"%s","ref":"%s","payload":"%s","signature":"%s","timestamp_ms":%d,"last_resort":%t}`,
		b.DeviceID, protocol.KeyPackageRef(kp), b64.EncodeToString(b.Payload), b64.EncodeToString(b.Signature[:]), ts, lastResort)
}

func countJSON(device protocol.Key, oneTime, lastResort, handedOut int) string {
	return fmt.Sprintf(`{"device_id":"%s","one_time":%d,"last_resort":%d,"last_resort_handed_out":%d}`, device, oneTime, lastResort, handedOut)
}

func pub(k ed25519.PrivateKey) protocol.Key {
	var out protocol.Key
	copy(out[:], k.Public().(ed25519.PublicKey))
	return out
}

const (
	consumed    = `{"error":"keypackage consumed"}`
	rateLimited = `{"error":"rate limited"}`
	badDeviceID = `{"error":"device_id: must be hex of a 32-byte key"}`
	badSuite    = `{"error":"cipher_suite: must be a decimal number from 0 to 65535"}`
)

// singleUseRefusals: requests to the single-use routes refused for their
// shape, before the Backend: keys that are not keys, cipher_suite out of
// range, a claim with a body, wrong methods, consume bodies that are not
// the signed shape. Keys: none stored.
func (c *client) singleUseRefusals(t *testing.T) {
	zero := strings.Repeat("0", 64)
	claim := "/v1/keypackages/" + zero + "/claim"
	for _, r := range []struct {
		name, method, path, ctype, body string
		code                            int
		want                            string
	}{
		{"claim bad key", "POST", "/v1/keypackages/nothex/claim", "", "", 400, badDeviceID},
		{"count bad key", "GET", "/v1/keypackages/nothex/count", "", "", 400, badDeviceID},
		{"account claim bad key", "POST", "/v1/accounts/nothex/claim", "", "", 400, `{"error":"account_pub: must be hex of a 32-byte key"}`},
		{"suite not a number", "POST", claim + "?cipher_suite=x", "", "", 400, badSuite},
		{"suite empty", "POST", claim + "?cipher_suite=", "", "", 400, badSuite},
		{"suite negative", "POST", claim + "?cipher_suite=-1", "", "", 400, badSuite},
		{"suite hex", "POST", claim + "?cipher_suite=0x1", "", "", 400, badSuite},
		{"suite over 65535", "POST", claim + "?cipher_suite=65536", "", "", 400, badSuite},
		{"suite twice", "POST", claim + "?cipher_suite=1&cipher_suite=2", "", "", 400, badSuite},
		{"account suite over 65535", "POST", "/v1/accounts/" + zero + "/claim?cipher_suite=70000", "", "", 400, badSuite},
		{"claim with a body", "POST", claim, "application/json", `{"cipher_suite":1}`, 400, `{"error":"claim takes no request body; pass cipher_suite in the query"}`},
		{"claim GET", "GET", claim, "", "", 405, `{"error":"method not allowed"}`},
		{"count POST", "POST", "/v1/keypackages/" + zero + "/count", "", "", 405, `{"error":"method not allowed"}`},
		{"account claim GET", "GET", "/v1/accounts/" + zero + "/claim", "", "", 405, `{"error":"method not allowed"}`},
		{"consume GET", "GET", "/v1/consume", "", "", 405, `{"error":"method not allowed"}`},
		{"consume no content type", "POST", "/v1/consume", "", `{}`, 415, "{\"error\":\"expected request with `Content-Type: application/json`\"}"},
		{"consume malformed", "POST", "/v1/consume", "application/json", `{"device_id":`, 400, `{"error":"request body is not valid JSON"}`},
		{"consume missing field", "POST", "/v1/consume", "application/json", `{"device_id":"aa","payload":"AAAA"}`, 422, "{\"error\":\"missing field `signature`\"}"},
		{"consume bad key", "POST", "/v1/consume", "application/json", `{"device_id":"aa","payload":"AAAA","signature":"AAAA"}`, 400, badDeviceID},
		{"consume bad base64", "POST", "/v1/consume", "application/json", `{"device_id":"` + zero + `","payload":"A","signature":"AAAA"}`, 400, `{"error":"payload: not valid base64"}`},
		{"consume short signature", "POST", "/v1/consume", "application/json", `{"device_id":"` + zero + `","payload":"AAAA","signature":"AAAA"}`, 400, `{"error":"signature: must be base64 of 64 bytes"}`},
	} {
		t.Run(r.name, func(t *testing.T) {
			got := c.do(t, r.method, r.path, r.ctype, r.body)
			Expect(t, got, r.code, r.want)
			if r.code == 405 {
				want := "POST"
				if r.method == "POST" {
					want = "GET, HEAD"
				}
				if got.Allow != want {
					t.Fatalf("Allow %q, want %q", got.Allow, want)
				}
			}
		})
	}
}

// claim: three one-time bundles are handed out once each, oldest first,
// with the claim answer's fields in order; then 404. The list flags them
// claimed; GET /v0 keeps serving the latest. Key: seed 10.
func (c *client) claim(t *testing.T) {
	dev := SeedKey(10)
	now := nowMS()
	var posted []protocol.Bundle
	for i := range 3 {
		b := protocol.SignBundle(dev, now-uint64(3-i)*1000, fmt.Appendf(nil, "one-time-%d", i))
		Expect(t, c.post(t, "/v0/keypackage", BundleJSON(b)), 204, "")
		posted = append(posted, b)
	}
	path := "/v1/keypackages/" + pub(dev).String() + "/claim"
	for i, b := range posted {
		r := c.do(t, "POST", path, "", "")
		Expect(t, r, 200, ClaimJSON(b, false))
		if keys, err := objectKeys(r.Body); err != nil || !slices.Equal(keys, ClaimFields) {
			t.Fatalf("claim %d: fields %v (%v), want %v", i, keys, err, ClaimFields)
		}
	}
	Expect(t, c.do(t, "POST", path, "", ""), 404, noKeyPackage)
	Expect(t, c.do(t, "POST", "/v1/keypackages/"+strings.ToUpper(pub(dev).String())+"/claim", "", ""), 404, noKeyPackage)
	r := c.do(t, "GET", "/v1/keypackages/"+pub(dev).String(), "", "")
	Expect(t, r, 200, "*")
	var list struct {
		Bundles []struct {
			Claimed *bool `json:"claimed"`
		} `json:"bundles"`
	}
	if err := json.Unmarshal([]byte(r.Body), &list); err != nil || len(list.Bundles) != 3 {
		t.Fatalf("list %s: %v", r.Body, err)
	}
	for i, b := range list.Bundles {
		if b.Claimed == nil || !*b.Claimed {
			t.Fatalf("bundle %d not listed as claimed: %s", i, r.Body)
		}
	}
	// The chat-store route stays safe and idempotent: the latest bundle.
	Expect(t, c.do(t, "GET", "/v0/keypackage/"+pub(dev).String(), "", ""), 200, keyPackageBody(posted[2]))
	// A device the server has never seen.
	Expect(t, c.do(t, "POST", "/v1/keypackages/"+strings.Repeat("0", 64)+"/claim", "", ""), 404, noKeyPackage)
}

// count: one-time bundles not yet claimed, before and after a claim; a
// device with nothing counts zeros. Key: seed 11.
func (c *client) count(t *testing.T) {
	dev := SeedKey(11)
	id := pub(dev)
	Expect(t, c.do(t, "GET", "/v1/keypackages/"+id.String()+"/count", "", ""), 200, countJSON(id, 0, 0, 0))
	now := nowMS()
	for i := range 2 {
		b := protocol.SignBundle(dev, now-uint64(2-i)*1000, fmt.Appendf(nil, "count-%d", i))
		Expect(t, c.post(t, "/v0/keypackage", BundleJSON(b)), 204, "")
	}
	Expect(t, c.do(t, "GET", "/v1/keypackages/"+id.String()+"/count", "", ""), 200, countJSON(id, 2, 0, 0))
	Expect(t, c.do(t, "POST", "/v1/keypackages/"+id.String()+"/claim", "", ""), 200, "*")
	Expect(t, c.do(t, "GET", "/v1/keypackages/"+strings.ToUpper(id.String())+"/count", "", ""), 200, countJSON(id, 1, 0, 0))
}

// consume: a consume notice deletes the named bundle (204, also when
// posted again), the bundle posted again is 409 "keypackage consumed", the
// other bundle is still claimed; a notice with a bad signature, a bad
// layout, an old timestamp or another device's ref is a 400 and changes
// nothing. Keys: seeds 12 and 13.
func (c *client) consume(t *testing.T) {
	dev, other := SeedKey(12), SeedKey(13)
	now := nowMS()
	a := protocol.SignBundle(dev, now-2000, []byte("consume-a"))
	b := protocol.SignBundle(dev, now-1000, []byte("consume-b"))
	o := protocol.SignBundle(other, now, []byte("consume-other"))
	for _, x := range []protocol.Bundle{a, b, o} {
		Expect(t, c.post(t, "/v0/keypackage", BundleJSON(x)), 204, "")
	}
	refOf := func(x protocol.Bundle) protocol.Ref {
		_, kp, _ := protocol.SplitBundlePayload(x.Payload)
		return protocol.KeyPackageRef(kp)
	}
	listRefs := func(k ed25519.PrivateKey) []string {
		r := c.do(t, "GET", "/v1/keypackages/"+pub(k).String(), "", "")
		Expect(t, r, 200, "*")
		var list struct {
			Bundles []struct {
				Ref string `json:"ref"`
			} `json:"bundles"`
		}
		if err := json.Unmarshal([]byte(r.Body), &list); err != nil {
			t.Fatal(err)
		}
		var refs []string
		for _, x := range list.Bundles {
			refs = append(refs, x.Ref)
		}
		return refs
	}
	before := listRefs(dev)

	// Refusals first: nothing changes.
	wrongKey := protocol.SignConsume(other, now, []protocol.Ref{refOf(a)})
	wrongKey.DeviceID = pub(dev)
	foreign := protocol.SignConsume(dev, now, []protocol.Ref{refOf(o)})
	dup := protocol.SignConsume(dev, now, []protocol.Ref{refOf(a), refOf(a)})
	for _, tc := range []struct {
		name string
		n    protocol.ConsumeNotice
		want string
	}{
		{"wrong signature", wrongKey, `{"error":"signature: verification failed"}`},
		{"count 0", protocol.SignConsume(dev, now, nil), `{"error":"payload: consume count 0 is not between 1 and 256"}`},
		{"ref twice", dup, fmt.Sprintf(`{"error":"payload: consume payload names ref %s twice"}`, refOf(a))},
		{"past retention", protocol.SignConsume(dev, 1700000000000, []protocol.Ref{refOf(a)}), `{"error":"payload: timestamp 1700000000000 is older than the retention of 720h0m0s"}`},
		{"another device's ref", foreign, `{"error":"payload: names a keypackage of another device"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := c.post(t, "/v1/consume", ConsumeJSON(tc.n))
			Expect(t, r, 400, tc.want)
			if !strings.HasPrefix(r.Body, `{"error":"`) {
				t.Fatalf("body %s", r.Body)
			}
		})
	}
	if got := listRefs(dev); !slices.Equal(got, before) {
		t.Fatalf("refused notices changed the bundles: %v, want %v", got, before)
	}
	if got := listRefs(other); len(got) != 1 || got[0] != refOf(o).String() {
		t.Fatalf("another device's bundle: %v", got)
	}

	n := protocol.SignConsume(dev, now, []protocol.Ref{refOf(a)})
	Expect(t, c.post(t, "/v1/consume", ConsumeJSON(n)), 204, "")
	Expect(t, c.post(t, "/v1/consume", ConsumeJSON(n)), 204, "")
	if got := listRefs(dev); len(got) != 1 || got[0] != refOf(b).String() {
		t.Fatalf("after consume: %v, want only %s", got, refOf(b))
	}
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(a)), 409, consumed)
	// Signed again later, the consumed KeyPackage is still refused.
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(protocol.SignBundle(dev, now+1, []byte("consume-a")))), 409, consumed)
	Expect(t, c.do(t, "POST", "/v1/keypackages/"+pub(dev).String()+"/claim", "", ""), 200, ClaimJSON(b, false))
	// A consume of a ref the server never held is accepted (the bundle may
	// arrive later) and keeps that bundle out.
	late := protocol.SignBundle(dev, now, []byte("consume-late"))
	Expect(t, c.post(t, "/v1/consume", ConsumeJSON(protocol.SignConsume(dev, now, []protocol.Ref{refOf(late)}))), 204, "")
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(late)), 409, consumed)
}

// accountClaim: one claim per listed device, in the list's order, a device
// with nothing gets an error element; an unknown account is a 404, an
// account bundle without a device list a 422. Keys: account seed 14,
// devices seeds 15 and 16; account seed 17.
func (c *client) accountClaim(t *testing.T) {
	acct, d1, d2 := SeedKey(14), SeedKey(15), SeedKey(16)
	b := protocol.SignBundle(d1, nowMS(), []byte("account-claim"))
	Expect(t, c.post(t, "/v0/keypackage", BundleJSON(b)), 204, "")
	path := "/v1/accounts/" + pub(acct).String() + "/claim"
	Expect(t, c.do(t, "POST", path, "", ""), 404, noAccount)
	a := protocol.SignAccount(acct, protocol.EncodeAccountPayload(3, []protocol.Key{pub(d1), pub(d2)}))
	Expect(t, c.post(t, "/v0/account", AccountJSON(a)), 204, "")
	Expect(t, c.do(t, "POST", path, "", ""), 200, fmt.Sprintf(`{"account_pub":"%s","lamport":3,"devices":[%s,{"device_id":"%s","error":"no keypackage for device"}]}`,
		pub(acct), ClaimJSON(b, false), pub(d2)))
	// Claimed: the next account claim gets nothing for either device.
	Expect(t, c.do(t, "POST", path, "", ""), 200, fmt.Sprintf(`{"account_pub":"%s","lamport":3,"devices":[{"device_id":"%s","error":"no keypackage for device"},{"device_id":"%s","error":"no keypackage for device"}]}`,
		pub(acct), pub(d1), pub(d2)))

	bare := SeedKey(17)
	full := protocol.EncodeAccountPayload(1, nil)
	Expect(t, c.post(t, "/v0/account", AccountJSON(protocol.SignAccount(bare, full[:len(full)-2]))), 204, "")
	Expect(t, c.do(t, "POST", "/v1/accounts/"+pub(bare).String()+"/claim", "", ""), 422, `{"error":"account bundle has no device list"}`)
}

// claimLimit: claims of one device from one client run into the limit: a
// 429 {"error":"rate limited"} with a Retry-After of whole seconds, within
// 200 claims. Key: seed 18 (nothing stored: misses count too).
func (c *client) claimLimit(t *testing.T) {
	path := "/v1/keypackages/" + pub(SeedKey(18)).String() + "/claim"
	for i := range 200 {
		r := c.do(t, "POST", path, "", "")
		if r.Code == 404 {
			continue
		}
		Expect(t, r, 429, rateLimited)
		if s, err := strconv.Atoi(r.RetryAfter); err != nil || s < 1 {
			t.Fatalf("claim %d: Retry-After %q", i, r.RetryAfter)
		}
		return
	}
	t.Fatal("200 claims of one device in a row were never rate limited")
}
