package node

import (
	"context"
	"errors"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// SubmitBundle validates a bundle and stores it. A bundle the node already
// holds is accepted again without change (idempotent). Validation failures
// are *protocol.ValidationError.
func (n *Node) SubmitBundle(ctx context.Context, b *protocol.Bundle) error {
	info, err := n.cfg.Policy.ValidateBundle(b, n.cfg.Now())
	if err != nil {
		n.metrics.bundleRejected(protocol.RuleOf(err))
		return err
	}
	outcome, err := n.store.PutBundle(ctx, &storage.Bundle{
		DeviceID:    b.DeviceID,
		Ref:         info.Ref,
		TimestampMS: info.TimestampMS,
		LastResort:  info.LastResort,
		Payload:     b.Payload,
		Signature:   b.Signature,
	})
	if err != nil {
		return err
	}
	n.metrics.bundleAccepted(outcome)
	n.log.Debug("bundle accepted", "device", b.DeviceID, "ref", info.Ref, "ts", info.TimestampMS, "outcome", outcome)
	return nil
}

// LatestBundle returns the bundle to hand a chat client for a device.
func (n *Node) LatestBundle(ctx context.Context, device protocol.Key) (*storage.Bundle, error) {
	return n.store.LatestBundle(ctx, device)
}

// Bundles returns every bundle held for a device, newest first.
func (n *Node) Bundles(ctx context.Context, device protocol.Key) ([]*storage.Bundle, error) {
	return n.store.Bundles(ctx, device)
}

// SubmitAccount validates an account bundle and stores it if its lamport is
// greater than the stored one's (storage.ErrStale otherwise, as chat-store).
func (n *Node) SubmitAccount(ctx context.Context, a *protocol.AccountBundle) error {
	lamport, err := n.cfg.Policy.ValidateAccount(a)
	if err != nil {
		n.metrics.accountRejected(protocol.RuleOf(err))
		return err
	}
	_, err = n.store.PutAccount(ctx, &storage.Account{
		AccountPub: a.AccountPub,
		Lamport:    lamport,
		Payload:    a.Payload,
		Signature:  a.Signature,
	}, storage.AccountMustIncrease)
	if errors.Is(err, storage.ErrStale) {
		n.metrics.accountRejected("stale")
		return err
	}
	if err != nil {
		return err
	}
	n.metrics.accountsAccepted.Inc()
	return nil
}

// Account returns the account bundle held for an account key.
func (n *Node) Account(ctx context.Context, account protocol.Key) (*storage.Account, error) {
	return n.store.Account(ctx, account)
}

// Status is the body of GET /v1/status.
type Status struct {
	Version       string `json:"version"`
	DataDir       string `json:"data_dir"`
	MLSValidation string `json:"mls_validation"`
	Devices       int64  `json:"devices"`
	Bundles       int64  `json:"bundles"`
	Accounts      int64  `json:"accounts"`
}

// Status reports the node's state.
func (n *Node) Status(ctx context.Context) any {
	c := n.store.Counts()
	return Status{
		Version:       n.cfg.Version,
		DataDir:       n.cfg.DataDir,
		MLSValidation: string(n.cfg.Policy.MLS),
		Devices:       c.Devices,
		Bundles:       c.Bundles,
		Accounts:      c.Accounts,
	}
}
