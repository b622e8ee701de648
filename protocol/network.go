package protocol

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DefaultNetwork is the registry network a node joins unless told otherwise.
const DefaultNetwork = "kpnode-dev"

// DefaultShardCount is S, the number of shards of a network. It is a
// network constant: every node of one network must use the same value.
const DefaultShardCount = 8

var networkName = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidateNetworkName reports whether name can be part of topic names and
// protocol IDs: 1–63 of [a-z0-9._-], starting with a letter or digit.
func ValidateNetworkName(name string) error {
	if !networkName.MatchString(name) {
		return fmt.Errorf("network name %q: want 1-63 characters of a-z, 0-9, '.', '_', '-'", name)
	}
	return nil
}

// Shard returns the shard of a key: sha256(key)[0] mod shards. Bundles shard
// by device key, account bundles by account key.
func Shard(key Key, shards int) int {
	h := sha256.Sum256(key[:])
	return int(h[0]) % shards
}

// BundleTopic is the gossipsub topic of a shard's bundles.
func BundleTopic(network string, shard int) string {
	return fmt.Sprintf("/kpnode/1/%s/kp/%d", network, shard)
}

// AccountTopic is the gossipsub topic of a shard's account bundles.
func AccountTopic(network string, shard int) string {
	return fmt.Sprintf("/kpnode/1/%s/acct/%d", network, shard)
}

// FetchProtocol is the stream protocol ID of fetch requests.
func FetchProtocol(network string) string { return "/kpnode/" + network + "/fetch/1.0.0" }

// SyncProtocol is the stream protocol ID of anti-entropy sync.
func SyncProtocol(network string) string { return "/kpnode/" + network + "/sync/1.0.0" }

// DHTPrefix is the Kademlia protocol prefix of a network.
func DHTPrefix(network string) string { return "/kpnode/" + network }

// ShardProviderKey is the bytes whose SHA-256 names a shard in the DHT
// (as a CIDv1 raw): "kpnode/{network}/shard/{n}".
func ShardProviderKey(network string, shard int) []byte {
	return []byte(fmt.Sprintf("kpnode/%s/shard/%d", network, shard))
}

// ShardSet is a set of shards of a network with S shards.
type ShardSet struct {
	count int
	held  []bool
}

// AllShards returns the set of every shard.
func AllShards(count int) ShardSet {
	s := ShardSet{count: count, held: make([]bool, count)}
	for i := range s.held {
		s.held[i] = true
	}
	return s
}

// NoShards returns the empty set (a light node).
func NoShards(count int) ShardSet { return ShardSet{count: count, held: make([]bool, count)} }

// ParseShardSet parses "all", "none" or a comma-separated list of shard
// numbers and ranges ("0,3,5-7").
func ParseShardSet(s string, count int) (ShardSet, error) {
	switch strings.TrimSpace(s) {
	case "all", "":
		return AllShards(count), nil
	case "none":
		return NoShards(count), nil
	}
	set := NoShards(count)
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return set, fmt.Errorf("shards %q: %q is not a number", s, part)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return set, fmt.Errorf("shards %q: bad range %q", s, part)
			}
		}
		if a < 0 || b >= count {
			return set, fmt.Errorf("shards %q: shard numbers run from 0 to %d", s, count-1)
		}
		for i := a; i <= b; i++ {
			set.held[i] = true
		}
	}
	return set, nil
}

// Count is S, the number of shards of the network.
func (s ShardSet) Count() int { return s.count }

// Has reports whether shard n is in the set.
func (s ShardSet) Has(n int) bool { return n >= 0 && n < len(s.held) && s.held[n] }

// HasKey reports whether the set holds key's shard.
func (s ShardSet) HasKey(k Key) bool { return s.Has(Shard(k, s.count)) }

// List returns the shards in the set in ascending order.
func (s ShardSet) List() []int {
	var out []int
	for i, h := range s.held {
		if h {
			out = append(out, i)
		}
	}
	return out
}

// Empty reports whether the set holds no shard.
func (s ShardSet) Empty() bool { return !slices.Contains(s.held, true) }

// String formats the set as ParseShardSet reads it.
func (s ShardSet) String() string {
	l := s.List()
	switch len(l) {
	case 0:
		return "none"
	case s.count:
		return "all"
	}
	parts := make([]string, len(l))
	for i, n := range l {
		parts[i] = strconv.Itoa(n)
	}
	return strings.Join(parts, ",")
}

// ErrShardCount is returned for a shard count outside 1..256.
var ErrShardCount = errors.New("shard count must be between 1 and 256")

// Constants are the settings every node of one network must share, because
// a node's verdict (Reject, which costs the sender peer score) depends on
// them: the shard count (which topic a key belongs to), the MLS validation
// mode and the longest KeyPackage lifetime accepted (both decide whether a
// record is valid at all). MaxPayloadSize is fixed by the protocol version.
// Local policy (retention, clock skew, quota per device, store budget) only
// ever leads to Ignore, so it may differ between nodes.
//
// The constants are part of every topic, protocol ID and DHT key through
// NetworkID: two nodes that differ in any of them never share a topic or a
// stream protocol, so a setting can never make an honest peer look hostile.
type Constants struct {
	ShardCount            int
	MLS                   MLSMode
	MaxKeyPackageLifetime time.Duration
}

// DefaultConstants are the constants of a network run with default flags.
func DefaultConstants() Constants {
	return Constants{ShardCount: DefaultShardCount, MLS: MLSStrict, MaxKeyPackageLifetime: DefaultMaxKeyPackageLifetime}
}

// Validate reports whether the constants are usable.
func (c Constants) Validate() error {
	if c.ShardCount < 1 || c.ShardCount > 256 {
		return ErrShardCount
	}
	if c.MLS != MLSStrict && c.MLS != MLSOff {
		return fmt.Errorf("mls validation must be %q or %q, got %q", MLSStrict, MLSOff, c.MLS)
	}
	if c.MaxKeyPackageLifetime <= 0 || c.MaxKeyPackageLifetime%time.Second != 0 {
		return fmt.Errorf("max KeyPackage lifetime must be a positive whole number of seconds, got %v", c.MaxKeyPackageLifetime)
	}
	return nil
}

// Tag is the constants as a short readable string: "s{S}-{mls}-l{seconds}",
// e.g. "s8-strict-l7776000" for the defaults. Two nodes interoperate exactly
// when their network names and tags are equal.
func (c Constants) Tag() string {
	return fmt.Sprintf("s%d-%s-l%d", c.ShardCount, c.MLS, int64(c.MaxKeyPackageLifetime/time.Second))
}

// NetworkID is what the topic, protocol and DHT names embed in place of the
// bare network name: "{network}/{tag}", e.g. "kpnode-dev/s8-strict-l7776000".
func (c Constants) NetworkID(network string) string { return network + "/" + c.Tag() }

// ParseNetworkID splits a NetworkID into its network name and tag.
func ParseNetworkID(id string) (network, tag string, ok bool) {
	network, tag, ok = strings.Cut(id, "/")
	return network, tag, ok && network != "" && tag != ""
}
