package node

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/node/claim"
	"github.com/kpnode/kpnode/node/fetch"
	"github.com/kpnode/kpnode/node/httpapi"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/storage"
)

// Defaults of the claim limits (Config.Claim*): token buckets per
// requester (API client address, fetch peer) and per target device.
const (
	DefaultClaimRequesterRate  = claim.DefaultRequesterRate
	DefaultClaimRequesterBurst = claim.DefaultRequesterBurst
	DefaultClaimDeviceRate     = claim.DefaultDeviceRate
	DefaultClaimDeviceBurst    = claim.DefaultDeviceBurst
)

// errNoClaims: the claim service is not running (before Start, or the host
// has no Ed25519 identity key to sign claim notices with).
var errNoClaims = errors.New("node: claims are not available")

// startClaim wires the claim service: the store, the node's ingest path,
// the holders of a shard as gossip sees them, the fetch client, gossip for
// the notices, the DHT for holders of shards not held, and the host's
// identity key. The fetch server reaches it through fetchClaimer.
func (n *Node) startClaim(h host.Host) error {
	key, err := ed25519Identity(h)
	if err != nil {
		// A claim notice is signed with the node's Ed25519 identity;
		// an injected host with another key type serves no claims.
		n.log.Warn("claims disabled", "err", err)
		return nil
	}
	s, err := claim.New(claim.Config{
		Store:          n.store,
		Ingester:       nodeIngester{n},
		View:           holderView{n},
		Client:         n.fetchClient,
		Publisher:      n, // Node.PublishClaim: gossip on the device's shard
		Finder:         n.dht,
		AddrBook:       h.Peerstore(),
		Self:           h.ID(),
		Key:            key,
		Shards:         n.cfg.Shards,
		RequesterRate:  n.cfg.ClaimRequesterRate,
		RequesterBurst: n.cfg.ClaimRequesterBurst,
		DeviceRate:     n.cfg.ClaimDeviceRate,
		DeviceBurst:    n.cfg.ClaimDeviceBurst,
		// Sign no more claim notices than peers accept from one origin.
		SignRate:   claimOriginRate,
		SignBurst:  claimOriginBurst,
		Now:        n.cfg.Now,
		Logger:     n.log.With("component", "claim"),
		Registerer: n.registry,
	})
	if err != nil {
		return fmt.Errorf("claim: %w", err)
	}
	n.claims.Store(s)
	return nil
}

// ed25519Identity returns the host's identity key as an Ed25519 key.
func ed25519Identity(h host.Host) (ed25519.PrivateKey, error) {
	sk := h.Peerstore().PrivKey(h.ID())
	if sk == nil {
		return nil, errors.New("the host's peerstore has no private key for its peer ID")
	}
	if sk.Type() != crypto.Ed25519 {
		return nil, fmt.Errorf("the host's identity key is %v, not Ed25519", sk.Type())
	}
	raw, err := sk.Raw()
	if err != nil || len(raw) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("the host's Ed25519 key: %d bytes, %v", len(raw), err)
	}
	return ed25519.PrivateKey(raw), nil
}

// holderView names the holders of a shard: the peers in its gossip topic,
// and the node itself when it holds the shard.
type holderView struct{ n *Node }

func (v holderView) ShardHolders(shard int) []peer.ID {
	var out []peer.ID
	if v.n.gossip != nil {
		out = v.n.gossip.ShardPeers(shard)
	}
	if v.n.cfg.Shards.Has(shard) {
		out = append(out, v.n.host.ID())
	}
	return out
}

// fetchClaimer is the claim service as the fetch server sees it.
type fetchClaimer struct{ n *Node }

var _ fetch.Claimer = fetchClaimer{}

func (f fetchClaimer) ServeClaim(ctx context.Context, req fetch.ClaimRequest) (fetch.ClaimAnswer, error) {
	s := f.n.claims.Load()
	if s == nil {
		return fetch.ClaimAnswer{}, errNoClaims
	}
	return s.ServeClaim(ctx, req)
}

func (f fetchClaimer) Count(ctx context.Context, dev protocol.Key) (storage.ClaimCounts, error) {
	return f.n.store.ClaimCounts(ctx, dev)
}

// Claim hands out one bundle of device to requester (an API client's
// address), as POST /v1/keypackages/{device_id}/claim.
func (n *Node) Claim(ctx context.Context, requester string, device protocol.Key, suite uint16) (claim.Result, error) {
	s := n.claims.Load()
	if s == nil {
		return claim.Result{}, errNoClaims
	}
	return s.Claim(ctx, claim.Request{Requester: requester, Device: device, Suite: suite, Source: sourceHTTP})
}

// ClaimCounts counts a device's bundles: from the store when the node holds
// the shard, else from a holder.
func (n *Node) ClaimCounts(ctx context.Context, device protocol.Key) (storage.ClaimCounts, error) {
	if n.cfg.Shards.HasKey(device) {
		return n.store.ClaimCounts(ctx, device)
	}
	s := n.claims.Load()
	if s == nil {
		return storage.ClaimCounts{}, errNoClaims
	}
	return s.Count(ctx, device)
}

// claimAPIError maps an error of a claim or a count to the httpapi
// sentinel the API answers by: over a limit is 429 (the cause keeps its
// RetryAfter), no holder reachable (or no claim service) 503; anything else
// as apiError.
func claimAPIError(err error) error {
	switch {
	case errors.Is(err, claim.ErrRateLimited):
		return &mappedError{sentinel: httpapi.ErrRateLimited, cause: err}
	case errors.Is(err, claim.ErrUnavailable), errors.Is(err, errNoClaims):
		return &mappedError{sentinel: httpapi.ErrUnavailable, cause: err}
	}
	return apiError(err)
}
