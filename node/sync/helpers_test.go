package sync

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	gosync "sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-msgio/pbio"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// testShards is the network of the tests: 4 shards, shard 0 held, so a
// record of another shard is easy to make.
const testShards = 4

var testPolicy = func() protocol.Policy {
	p := protocol.DefaultPolicy()
	p.MLS = protocol.MLSOff
	return p
}()

// storeIngester is the node's ingest path without its metrics: validate
// with the policy, then store.
type storeIngester struct{ s *storage.Store }

func (i storeIngester) IngestBundle(ctx context.Context, b *protocol.Bundle, _ ingest.Source) (storage.PutOutcome, protocol.BundleInfo, error) {
	info, err := testPolicy.ValidateBundle(b, time.Now())
	if err != nil {
		return 0, info, err
	}
	outcome, err := i.s.PutBundle(ctx, &storage.Bundle{Bundle: *b, BundleInfo: info})
	return outcome, info, err
}

func (i storeIngester) IngestAccount(ctx context.Context, a *protocol.AccountBundle, rule storage.AccountRule, _ ingest.Source) (*storage.Account, storage.PutOutcome, error) {
	lamport, err := testPolicy.ValidateAccount(a)
	if err != nil {
		return nil, 0, err
	}
	rec := &storage.Account{AccountBundle: *a, Lamport: lamport}
	outcome, err := i.s.PutAccount(ctx, rec, rule)
	if err != nil {
		return nil, 0, err
	}
	return rec, outcome, nil
}

// penalties records the penalties sessions give.
type penalties struct {
	mu  gosync.Mutex
	got []string // proto/reason
}

func (p *penalties) Penalize(_ peer.ID, proto, reason string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, proto+"/"+reason)
}

// reset forgets the penalties recorded so far.
func (p *penalties) reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = nil
}

func (p *penalties) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.got...)
}

// side is one node's side of the tests: a real Badger store in a temp dir
// behind Set, the ingest path, recorded penalties.
type side struct {
	store *storage.Store
	pen   *penalties
	local *Local
}

func newSide(t testing.TB, roundTimeout time.Duration) *side {
	t.Helper()
	st := nodetest.OpenStore(t, storage.Options{MaxPerDevice: 8, Retention: testPolicy.Retention, ShardCount: testShards})
	shards, err := protocol.ParseShardSet("0", testShards)
	if err != nil {
		t.Fatal(err)
	}
	pen := &penalties{}
	return &side{store: st, pen: pen, local: &Local{Set: st, Ingester: storeIngester{st}, Penalizer: pen,
		Shards: shards, MLS: protocol.MLSOff, RoundTimeout: roundTimeout, Refused: NewRefused(time.Hour),
		Metrics: NewMetrics(nil), Log: slog.New(slog.DiscardHandler)}}
}

// keyIn returns a new key pair whose public key is in shard.
func keyIn(shard int) ed25519.PrivateKey {
	for {
		pub, priv, _ := ed25519.GenerateKey(rand.Reader)
		if protocol.Shard(protocol.Key(pub), testShards) == shard {
			return priv
		}
	}
}

// newBundle signs an opaque bundle of a new device in shard.
func newBundle(shard int) protocol.Bundle {
	kp := make([]byte, 64)
	rand.Read(kp)
	return protocol.SignBundle(keyIn(shard), uint64(time.Now().UnixMilli()), kp)
}

func newAccount(shard int, lamport uint64) protocol.AccountBundle {
	return protocol.SignAccount(keyIn(shard), protocol.EncodeAccountPayload(lamport, nil))
}

func (s *side) putBundles(t testing.TB, bs ...protocol.Bundle) {
	t.Helper()
	for i := range bs {
		if _, _, err := s.local.Ingester.IngestBundle(t.Context(), &bs[i], ingest.SourceHTTP); err != nil {
			t.Fatal(err)
		}
	}
}

func (s *side) putAccounts(t testing.TB, as ...protocol.AccountBundle) {
	t.Helper()
	for i := range as {
		if _, _, err := s.local.Ingester.IngestAccount(t.Context(), &as[i], storage.AccountConverge, ingest.SourceHTTP); err != nil {
			t.Fatal(err)
		}
	}
}

func (s *side) digest(kind storage.SetKind) protocol.Digest { return s.store.ShardDigest(kind, 0) }

// bundleID is the sync item ID of b.
func bundleID(b *protocol.Bundle) uint64 {
	item, ok := claimedBundleItem(b, protocol.MLSOff)
	if !ok {
		panic("unreadable bundle")
	}
	return protocol.ItemID(item)
}

// session runs an initiator and a responder over the two ends of a
// net.Pipe and returns what each Run returned. The initiator's end is
// closed when it is done, as a service closes its stream.
func session(ctx context.Context, in *Initiator, rs *Responder) (inErr, rsErr error) {
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- rs.Run(ctx, b)
		b.Close()
	}()
	inErr = in.Run(ctx, a)
	a.Close()
	return inErr, <-done
}

// fakeResponder answers the requests read from c with answer until it
// returns nil, the stream fails or ctx ends; it returns the requests it
// read. It closes c when done.
func fakeResponder(ctx context.Context, c net.Conn, answer func(round int, req *pb.SyncRequest) *pb.SyncResponse) <-chan []*pb.SyncRequest {
	out := make(chan []*pb.SyncRequest, 1)
	go func() {
		defer c.Close()
		stop := context.AfterFunc(ctx, func() { c.Close() })
		defer stop()
		var reqs []*pb.SyncRequest
		defer func() { out <- reqs }()
		r, w := pbio.NewDelimitedReader(c, maxRequest), pbio.NewDelimitedWriter(skipEmpty{c})
		for round := 0; ; round++ {
			var req pb.SyncRequest
			if r.ReadMsg(&req) != nil {
				return
			}
			reqs = append(reqs, &req)
			resp := answer(round, &req)
			if resp == nil || w.WriteMsg(resp) != nil {
				return
			}
		}
	}()
	return out
}

// rawInitiator is a hostile initiator's end of a session.
type rawInitiator struct {
	c net.Conn
	r pbio.ReadCloser
	w pbio.WriteCloser
}

func newRawInitiator(c net.Conn) *rawInitiator {
	return &rawInitiator{c: c, r: pbio.NewDelimitedReader(c, maxResponse), w: pbio.NewDelimitedWriter(skipEmpty{c})}
}

// round sends req and reads the answer; an error means the session ended.
func (ri *rawInitiator) round(req *pb.SyncRequest) (*pb.SyncResponse, error) {
	_ = ri.c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := ri.w.WriteMsg(req); err != nil {
		return nil, err
	}
	var resp pb.SyncResponse
	if err := ri.r.ReadMsg(&resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// serveRaw runs a Responder on one end of a net.Pipe and returns the other
// end, and the channel that gets what Run returned.
func serveRaw(ctx context.Context, s *side, p peer.ID) (*rawInitiator, <-chan error) {
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- NewResponder(s.local, p).Run(ctx, b)
		b.Close()
	}()
	return newRawInitiator(a), done
}

var emptyFingerprint = func() []byte { fp := (protocol.Digest{}).Fingerprint(); return fp[:] }()

// isClosed reports whether err says the stream ended (the peer closed).
func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe) || errors.Is(err, io.ErrUnexpectedEOF)
}

func (i storeIngester) IngestClaim(ctx context.Context, n *protocol.ClaimNotice, _ ingest.Source) (storage.PutOutcome, protocol.ClaimInfo, error) {
	info, err := testPolicy.ValidateClaim(n, time.Now())
	if err != nil {
		return 0, info, err
	}
	o, err := i.s.PutClaim(ctx, n, info)
	return o, info, err
}

func (i storeIngester) IngestConsume(ctx context.Context, n *protocol.ConsumeNotice, _ ingest.Source) (storage.PutOutcome, protocol.ConsumeInfo, error) {
	info, err := testPolicy.ValidateConsume(n, time.Now())
	if err != nil {
		return 0, info, err
	}
	o, err := i.s.PutConsume(ctx, n, info)
	return o, info, err
}
