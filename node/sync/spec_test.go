package sync

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
)

// The item ID example of protocol/README.md: hash bytes 01 02 … 08 are the
// ID 0x0102030405060708, whose fixed64 wire bytes are 08 07 … 01.
func TestSyncItemIDByteOrder(t *testing.T) {
	var h [32]byte
	for i := range 8 {
		h[i] = byte(i + 1)
	}
	id := protocol.ItemID(h)
	if id != 0x0102030405060708 {
		t.Fatalf("item ID %#x", id)
	}
	wire, err := proto.Marshal(&pb.SyncListing{Ids: []uint64{id}})
	if err != nil {
		t.Fatal(err)
	}
	// Field 2, packed: tag 0x12, length 8, then the little-endian value.
	if want := []byte{0x12, 8, 8, 7, 6, 5, 4, 3, 2, 1}; !bytes.Equal(wire, want) {
		t.Fatalf("wire % x, want % x", wire, want)
	}
}
