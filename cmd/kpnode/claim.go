package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
)

// claimOutput is a claimed bundle as `kpnode claim` prints it: the API's
// claim object, verified under the device.
type claimOutput struct {
	DeviceID    string `json:"device_id"`
	Ref         string `json:"ref"`
	Payload     string `json:"payload"`
	Signature   string `json:"signature"`
	TimestampMS uint64 `json:"timestamp_ms"`
	LastResort  bool   `json:"last_resort"`
}

func newClaimOutput(c *httpapi.ClaimResult) claimOutput {
	return claimOutput{DeviceID: c.DeviceID.String(), Ref: c.Ref.String(), Payload: base64.StdEncoding.EncodeToString(c.Payload),
		Signature: base64.StdEncoding.EncodeToString(c.Signature[:]), TimestampMS: c.TimestampMS, LastResort: c.LastResort}
}

type deviceErrorOutput struct {
	DeviceID string `json:"device_id"`
	Error    string `json:"error"`
}

func runClaim(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("claim", "DEVICE_ID | --account ACCOUNT_PUB", stderr)
	api := fs.String("api", defaultAPI, "node HTTP API (host:port or URL)")
	account := fs.String("account", "", "claim one KeyPackage for each device of this account instead")
	suite := fs.Uint("cipher-suite", 0, "claim only KeyPackages of this MLS cipher suite (0: any)")
	out := fs.String("out", "", "write the claimed key_package bytes to this file (device claims only)")
	rest, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if *suite > 0xFFFF {
		fmt.Fprintf(stderr, "--cipher-suite %d: must be at most 65535\n", *suite)
		return errUsage
	}
	if (*account == "" && len(rest) != 1) || (*account != "" && (len(rest) != 0 || *out != "")) {
		fs.Usage()
		return errUsage
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := httpapi.NewClient(*api, nil)
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")

	if *account != "" {
		key, err := protocol.ParseKey(*account)
		if err != nil {
			return fmt.Errorf("account_pub: %w", err)
		}
		got, err := client.ClaimAccount(ctx, key, uint16(*suite))
		if errors.Is(err, httpapi.ErrNotFound) {
			return fmt.Errorf("no account bundle for %s", key)
		}
		if err != nil {
			return claimError(err)
		}
		devices := make([]any, len(got.Devices))
		for i, d := range got.Devices {
			if d.Claim == nil {
				devices[i] = deviceErrorOutput{DeviceID: d.DeviceID.String(), Error: d.Error}
				continue
			}
			devices[i] = newClaimOutput(d.Claim)
		}
		return enc.Encode(struct {
			AccountPub string `json:"account_pub"`
			Lamport    uint64 `json:"lamport"`
			Devices    []any  `json:"devices"`
		}{key.String(), got.Lamport, devices})
	}

	key, err := protocol.ParseKey(rest[0])
	if err != nil {
		return fmt.Errorf("device_id: %w", err)
	}
	got, err := client.Claim(ctx, key, uint16(*suite))
	if errors.Is(err, httpapi.ErrNotFound) {
		return fmt.Errorf("no keypackage for device %s", key)
	}
	if err != nil {
		return claimError(err)
	}
	if *out != "" {
		_, kp, _ := protocol.SplitBundlePayload(got.Payload)
		if err := os.WriteFile(*out, kp, 0o644); err != nil {
			return err
		}
	}
	return enc.Encode(newClaimOutput(got))
}

// claimError says when to retry a rate-limited claim.
func claimError(err error) error {
	var ra interface{ RetryAfter() time.Duration }
	if errors.Is(err, httpapi.ErrRateLimited) && errors.As(err, &ra) && ra.RetryAfter() > 0 {
		return fmt.Errorf("%w (retry after %v)", err, ra.RetryAfter())
	}
	return err
}

func runCount(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("count", "DEVICE_ID", stderr)
	api := fs.String("api", defaultAPI, "node HTTP API (host:port or URL)")
	rest, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(rest) != 1 {
		fs.Usage()
		return errUsage
	}
	key, err := protocol.ParseKey(rest[0])
	if err != nil {
		return fmt.Errorf("device_id: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := httpapi.NewClient(*api, nil).Count(ctx, key)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		DeviceID string `json:"device_id"`
		httpapi.ClaimCounts
	}{key.String(), c})
}

func runConsume(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("consume", "REF...", stderr)
	api := fs.String("api", defaultAPI, "node HTTP API (host:port or URL)")
	keyPath := fs.String("key", "device.key", "device key file (from kpnode keygen) that signs the consume notice")
	rest, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(rest) == 0 || len(rest) > protocol.MaxConsumeRefs {
		fmt.Fprintf(stderr, "kpnode consume: name 1 to %d refs (lowercase hex KeyPackageRefs, as `kpnode fetch` and `kpnode claim` print them)\n", protocol.MaxConsumeRefs)
		fs.Usage()
		return errUsage
	}
	refs := make([]protocol.Ref, 0, len(rest))
	seen := make(map[protocol.Ref]bool, len(rest))
	for _, s := range rest {
		r, err := protocol.ParseRef(s)
		if err != nil {
			return fmt.Errorf("ref %q: %w", s, err)
		}
		if seen[r] {
			return fmt.Errorf("ref %s named twice", r)
		}
		seen[r] = true
		refs = append(refs, r)
	}
	priv, err := loadKey(*keyPath)
	if err != nil {
		return err
	}
	n := protocol.SignConsume(priv, uint64(time.Now().UnixMilli()), refs)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := httpapi.NewClient(*api, nil).Consume(ctx, &n); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "consumed %d bundle(s) of device %s\n", len(refs), n.DeviceID)
	return nil
}
