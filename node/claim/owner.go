package claim

import (
	"bytes"
	"crypto/sha256"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/kpnode/kpnode/protocol"
)

// Owner returns the owner of ref among holders: the holder h with the
// greatest SHA-256(peer ID bytes ‖ ref) (rendezvous hashing), or "" when
// holders is empty. Two nodes with the same view of the holders agree on
// every ref's owner, so each hands out only the refs it owns and
// concurrent claims at different holders do not collide; a holder that
// leaves moves only its own refs to others.
func Owner(holders []peer.ID, ref protocol.Ref) peer.ID {
	var best peer.ID
	var bestScore [sha256.Size]byte
	for _, h := range holders {
		s := ownerScore(h, ref)
		if best == "" || bytes.Compare(s[:], bestScore[:]) > 0 || (s == bestScore && h > best) {
			best, bestScore = h, s
		}
	}
	return best
}

func ownerScore(h peer.ID, ref protocol.Ref) [sha256.Size]byte {
	d := sha256.New()
	d.Write([]byte(h))
	d.Write(ref[:])
	var out [sha256.Size]byte
	d.Sum(out[:0])
	return out
}
