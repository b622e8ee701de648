package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

const defaultAPI = "127.0.0.1:8080"

func runKeygen(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("keygen", "", stderr)
	out := fs.String("out", "device.key", "file to write the key to (PKCS#8 PEM, mode 0600)")
	force := fs.Bool("force", false, "overwrite an existing file")
	if _, err := parseFlags(fs, args); err != nil {
		return err
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return err
	}
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if *force {
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(*out, flags, 0o600)
	if err != nil {
		return err
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "device_id %s\nkey written to %s\n", hex.EncodeToString(priv.Public().(ed25519.PublicKey)), *out)
	return nil
}

// loadKey reads a PKCS#8 PEM Ed25519 private key (as keygen writes).
func loadKey(path string) (ed25519.PrivateKey, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(raw)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s: not a PEM \"PRIVATE KEY\" file", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an Ed25519 key", path)
	}
	return priv, nil
}

func runPublish(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("publish", "KEYPACKAGE_FILE", stderr)
	api := fs.String("api", defaultAPI, "node HTTP API (host:port or URL)")
	keyPath := fs.String("key", "device.key", "device key file (from kpnode keygen)")
	isHex := fs.Bool("hex", false, "the KeyPackage file holds hex, not raw bytes")
	testKP := fs.Bool("test-keypackage", false, "publish a freshly generated KeyPackage (suite 0x004D, last resort) signed by the device key instead of a file; its private keys are discarded, so it is for trying a registry only")
	rest, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(rest) != 1 && !(*testKP && len(rest) == 0) {
		fs.Usage()
		return errUsage
	}
	priv, err := loadKey(*keyPath)
	if err != nil {
		return err
	}
	var kp []byte
	if *testKP {
		if kp, _, err = mlstest.Generate(mlstest.Options{Suite: mlstest.SuiteXWing, Signer: priv, LastResort: true}); err != nil {
			return err
		}
	} else {
		if kp, err = os.ReadFile(rest[0]); err != nil {
			return err
		}
		if *isHex {
			if kp, err = hex.DecodeString(string(trimSpace(kp))); err != nil {
				return fmt.Errorf("%s: %w", rest[0], err)
			}
		}
	}
	b := protocol.SignBundle(priv, uint64(time.Now().UnixMilli()), kp)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := httpapi.NewClient(*api, nil).PublishBundle(ctx, &b); err != nil {
		return err
	}
	ts, _, _ := protocol.SplitBundlePayload(b.Payload)
	fmt.Fprintf(stdout, "published bundle for device %s (timestamp_ms %d, key_package %d bytes)\n", b.DeviceID, ts, len(kp))
	return nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

func runFetch(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("fetch", "DEVICE_ID | --account ACCOUNT_PUB", stderr)
	api := fs.String("api", defaultAPI, "node HTTP API (host:port or URL)")
	account := fs.String("account", "", "fetch this account's device list instead of a device's bundle")
	out := fs.String("out", "", "write the fetched key_package bytes to this file")
	rest, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	client := httpapi.NewClient(*api, nil)
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")

	if *account != "" {
		if len(rest) != 0 {
			fs.Usage()
			return errUsage
		}
		key, err := protocol.ParseKey(*account)
		if err != nil {
			return fmt.Errorf("account_pub: %w", err)
		}
		a, err := client.FetchAccount(ctx, key)
		if errors.Is(err, httpapi.ErrNotFound) {
			return fmt.Errorf("no account bundle for %s", key)
		}
		if err != nil {
			return err
		}
		report := map[string]any{"account_pub": key.String(), "updated_at": a.UpdatedAtMS, "verified": true}
		if d, err := protocol.DecodeAccountPayload(a.Payload); err == nil {
			devices := make([]string, len(d.Devices))
			for i, k := range d.Devices {
				devices[i] = k.String()
			}
			report["lamport"], report["devices"] = d.Lamport, devices
		} else if l, err := protocol.AccountLamport(a.Payload); err == nil {
			report["lamport"], report["devices_error"] = l, "payload has no device list"
		}
		return enc.Encode(report)
	}

	if len(rest) != 1 {
		fs.Usage()
		return errUsage
	}
	key, err := protocol.ParseKey(rest[0])
	if err != nil {
		return fmt.Errorf("device_id: %w", err)
	}
	b, err := client.FetchBundle(ctx, key)
	if errors.Is(err, httpapi.ErrNotFound) {
		return fmt.Errorf("no keypackage for device %s", key)
	}
	if err != nil {
		return err
	}
	ts, kp, _ := protocol.SplitBundlePayload(b.Payload)
	if *out != "" {
		if err := os.WriteFile(*out, kp, 0o644); err != nil {
			return err
		}
	}
	return enc.Encode(map[string]any{
		"device_id":         key.String(),
		"timestamp_ms":      ts,
		"signed_at":         time.UnixMilli(int64(ts)).UTC().Format(time.RFC3339Nano),
		"key_package_bytes": len(kp),
		"ref":               bundleRef(kp).String(),
		"verified":          true,
	})
}

func runStatus(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", "", stderr)
	api := fs.String("api", defaultAPI, "node HTTP API (host:port or URL)")
	if _, err := parseFlags(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw, err := httpapi.NewClient(*api, nil).Status(ctx)
	if err != nil {
		return err
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// bundleRef is the ref a node files a key_package under: the KeyPackageRef
// of the inner KeyPackage when it parses as MLS, else of the bytes as given.
func bundleRef(kp []byte) protocol.Ref {
	if parsed, err := mls.Parse(kp); err == nil {
		return protocol.Ref(mls.Ref(parsed.Raw))
	}
	return protocol.KeyPackageRef(kp)
}
