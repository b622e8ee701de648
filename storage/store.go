package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"

	"github.com/kpnode/kpnode/protocol"
)

// Sentinel errors callers branch on.
var (
	// ErrNotFound: no bundle for the device, or no account bundle.
	ErrNotFound = errors.New("storage: not found")
	// ErrStale: an account bundle does not supersede the stored one.
	ErrStale = errors.New("storage: stale account bundle")
	// ErrClosed: the store has been closed.
	ErrClosed = errors.New("storage: closed")
)

// Bundle is a validated bundle as the store keeps it: the record the
// device signed, what validation derived from it, and when this node first
// stored it. (protocol.BundleInfo.NotAfterMS is 0 when MLS validation is off:
// such a bundle never expires by lifetime; past NotAfterMS a bundle is no
// longer served, and ClockSkew later it is pruned.)
type Bundle struct {
	protocol.Bundle
	protocol.BundleInfo
	ReceivedAtMS int64 // local time the bundle was first stored, Unix ms
	// Claimed is set by reads (Bundles, BundlesUpTo) when a claim notice
	// holds the ref; PutBundle ignores it.
	Claimed bool
}

// Account is a validated account bundle as the store keeps it.
type Account struct {
	protocol.AccountBundle
	Lamport     uint64
	UpdatedAtMS int64 // local time of the last accepted upsert, Unix ms
}

// PutOutcome says what PutBundle or PutAccount did with a valid record.
type PutOutcome int

// The outcomes of a put.
const (
	// Stored: the record is new and now held.
	Stored PutOutcome = iota + 1
	// Refreshed: the same ref was held with an older timestamp and now
	// carries the newer one.
	Refreshed
	// Duplicate: the record (or a newer copy of the same ref) is already held.
	Duplicate
	// OverQuota: the device already holds MaxPerDevice newer bundles.
	OverQuota
)

func (o PutOutcome) String() string {
	switch o {
	case Stored:
		return "stored"
	case Refreshed:
		return "refreshed"
	case Duplicate:
		return "duplicate"
	case OverQuota:
		return "over_quota"
	}
	return fmt.Sprintf("PutOutcome(%d)", int(o))
}

// AccountRule selects how PutAccount compares with a stored account bundle.
type AccountRule int

const (
	// AccountMustIncrease stores only a strictly greater lamport; anything
	// else is ErrStale (chat-store's HTTP rule, answered with 409).
	AccountMustIncrease AccountRule = iota + 1
	// AccountConverge applies the network rule: greater lamport wins, equal
	// lamport the smaller payload hash, so every node converges.
	AccountConverge
)

// Options configure a Store.
type Options struct {
	// Dir is the Badger directory. Required unless InMemory.
	Dir string
	// InMemory keeps the whole store in memory (Badger's in-memory mode,
	// with small memtables and caches so a store costs a few MiB): nothing
	// is written to disk and everything is lost on Close. For simulations
	// and tests where Badger's persistence is not under test. Dir is
	// ignored and the free-disk check is off.
	InMemory bool
	// MaxPerDevice caps the bundles kept per device (newest kept). Default 100.
	MaxPerDevice int
	// Retention is how long a bundle is kept after its signed timestamp and
	// an account bundle after its last update. Default 30 days.
	Retention time.Duration
	// PruneInterval is how often the background loop prunes. Default 1 h.
	PruneInterval time.Duration
	// NoSync turns off fsync on commit. Off by default: every acknowledged
	// write is on disk.
	NoSync bool
	// Logger receives the store's and Badger's logs. Default slog.Default().
	Logger *slog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// ShardCount is the network's S, for the per-shard sync digests.
	// Default protocol.DefaultShardCount.
	ShardCount int
	// ClockSkew is the validation policy's clock skew: a bundle whose
	// KeyPackage lifetime ended is held (not served) until ClockSkew after
	// its end, since until then a peer's validation still accepts it and
	// sync would bring it back. 0 means protocol.DefaultClockSkew; negative
	// means none.
	ClockSkew time.Duration
	// MaxBytes bounds the logical bytes held (payloads plus a fixed
	// overhead per record); see budget.go for the eviction order. 0 means
	// DefaultMaxBytes, negative no budget.
	MaxBytes int64
	// MinFreeDisk is the free space (bytes, on the filesystem of Dir) below
	// which writes are refused with ErrStoreFull. Badger writes its value
	// log and memtables through memory maps of sparse files, so a disk that
	// fills under it kills the process (SIGBUS) instead of failing a
	// write; this reserve keeps the node clear of that. 0 means
	// DefaultMinFreeDisk, negative no check.
	MinFreeDisk int64
	// LifetimePruneInterval is how often the background loop prunes the
	// bundles whose KeyPackage lifetime has ended (a cheap indexed scan).
	// Default 1 min.
	LifetimePruneInterval time.Duration
	// MaxConsumedPerDevice bounds the live consume tombstones of one
	// device: a consume notice that would take it over is OverQuota.
	// Default DefaultMaxConsumedPerDevice.
	MaxConsumedPerDevice int
	// MaxConsumeBytes bounds the part of MaxBytes that consume notices and
	// their tombstones may take: they are never evicted, and anyone can
	// mint device keys, so without it notices could fill the store for a
	// whole retention. Over it a consume notice tombstones only the refs
	// held (their bundles deleted), or is ErrStoreFull when it names none
	// (Store.PutConsume). 0 means
	// MaxBytes/8 (none when MaxBytes is negative), negative none.
	MaxConsumeBytes int64
}

// Defaults of Options.
const (
	DefaultMaxPerDevice  = 100
	DefaultRetention     = protocol.DefaultRetention
	DefaultPruneInterval = time.Hour
	DefaultLifetimePrune = time.Minute
)

func (o *Options) setDefaults() {
	if o.MaxPerDevice == 0 {
		o.MaxPerDevice = DefaultMaxPerDevice
	}
	if o.Retention == 0 {
		o.Retention = DefaultRetention
	}
	if o.PruneInterval == 0 {
		o.PruneInterval = DefaultPruneInterval
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.ShardCount == 0 {
		o.ShardCount = protocol.DefaultShardCount
	}
	switch {
	case o.ClockSkew == 0:
		o.ClockSkew = protocol.DefaultClockSkew
	case o.ClockSkew < 0:
		o.ClockSkew = 0
	}
	if o.MaxBytes == 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.MinFreeDisk == 0 {
		o.MinFreeDisk = DefaultMinFreeDisk
	}
	if o.LifetimePruneInterval == 0 {
		o.LifetimePruneInterval = DefaultLifetimePrune
	}
	if o.MaxConsumeBytes == 0 {
		o.MaxConsumeBytes = -1
		if o.MaxBytes > 0 {
			o.MaxConsumeBytes = max(o.MaxBytes/8, 1)
		}
	}
	if o.MaxConsumedPerDevice == 0 {
		o.MaxConsumedPerDevice = DefaultMaxConsumedPerDevice
	}
}

// Validate reports whether the options are usable (after defaults).
func (o Options) Validate() error {
	switch {
	case o.Dir == "" && !o.InMemory:
		return errors.New("storage: Dir is required")
	case o.MaxPerDevice < 1:
		return fmt.Errorf("storage: MaxPerDevice must be at least 1, got %d", o.MaxPerDevice)
	case o.Retention <= 0:
		return fmt.Errorf("storage: Retention must be positive, got %v", o.Retention)
	case o.PruneInterval <= 0:
		return fmt.Errorf("storage: PruneInterval must be positive, got %v", o.PruneInterval)
	case o.LifetimePruneInterval <= 0:
		return fmt.Errorf("storage: LifetimePruneInterval must be positive, got %v", o.LifetimePruneInterval)
	case o.MaxConsumedPerDevice < 1:
		return fmt.Errorf("storage: MaxConsumedPerDevice must be at least 1, got %d", o.MaxConsumedPerDevice)
	case o.ShardCount < 1 || o.ShardCount > 256:
		return fmt.Errorf("storage: %w", protocol.ErrShardCount)
	}
	return nil
}

// Counts are the numbers of records held.
type Counts struct {
	Devices  int64 // devices with at least one bundle
	Bundles  int64
	Accounts int64
	Claims   int64 // claim records (one per claimed ref)
	Consumed int64 // consume tombstones (one per consumed device and ref)
}

// Store is a Badger-backed bundle and account store. It is safe for
// concurrent use. Start runs background pruning; Close stops it and closes
// the database.
type Store struct {
	opts Options
	db   *badger.DB
	log  *slog.Logger

	locks                      keyLocks
	bundles, devices, accounts atomic.Int64
	claims, tombs              atomic.Int64
	bytes                      atomic.Int64 // logical bytes held, for MaxBytes
	consumeBytes               atomic.Int64 // of which consume notices and tombstones, for MaxConsumeBytes
	digests                    *shardDigests
	repaired                   Repairs      // what the check on Open fixed
	scanned                    atomic.Int64 // items visited by sync scans, for tests
	diskFree                   func() (int64, error)

	mu      sync.Mutex // guards started and closed
	started bool
	closed  bool
	stop    chan struct{} // closed by Close
	done    chan struct{} // closed when the prune loop has returned
}

// Open opens (or creates) the store in opts.Dir and counts what it holds.
func Open(opts Options) (*Store, error) {
	opts.setDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	bo := badger.DefaultOptions(opts.Dir).
		WithLogger(badgerLogger{opts.Logger}).
		WithSyncWrites(!opts.NoSync).
		// Sized for a node beside a chat client as well as a full node: the
		// defaults (64 MiB memtables ×5, 256 MiB block cache) cost far more
		// RAM than 100k bundles of a few KB need.
		WithMemTableSize(32 << 20).
		WithNumMemtables(3).
		WithBlockCacheSize(32 << 20).
		WithIndexCacheSize(16 << 20).
		WithNumCompactors(2).
		WithValueLogFileSize(256 << 20).
		// KeyPackages (about 3 KB) go to the value log, keys and small
		// records stay in the LSM tree: compactions then move kilobytes of
		// keys instead of every payload, which keeps write amplification
		// and the memory compactions need low (process heap about 100 MiB
		// with 100k bundles instead of about 470 MiB).
		WithValueThreshold(1 << 10)
	diskFreeOf := func() (int64, error) { return diskFree(opts.Dir) }
	if opts.InMemory {
		bo = inMemoryOptions(bo)
		diskFreeOf = func() (int64, error) { return 0, errors.ErrUnsupported }
	}
	db, err := badger.Open(bo)
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", opts.Dir, err)
	}
	s := &Store{opts: opts, db: db, log: opts.Logger, stop: make(chan struct{}), done: make(chan struct{}),
		digests: newShardDigests(opts.ShardCount), diskFree: diskFreeOf}
	migrated, err := s.openSchema()
	if err != nil {
		db.Close()
		return nil, err
	}
	if s.repaired, err = s.checkConsistency(migrated); err != nil {
		db.Close()
		return nil, err
	}
	if migrated {
		if err := s.setSchema(); err != nil {
			db.Close()
			return nil, fmt.Errorf("storage: set schema: %w", err)
		}
	}
	if err := s.recount(); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// inMemoryOptions turns bo into Badger's in-memory mode sized for many
// stores in one process (a simulated network of hundreds of nodes): small
// memtables, no block cache (nothing is read from files), a small index
// cache, one compactor.
func inMemoryOptions(bo badger.Options) badger.Options {
	return bo.WithDir("").WithValueDir("").
		WithInMemory(true).
		WithSyncWrites(false).
		WithMemTableSize(2 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(4).
		WithBaseTableSize(512 << 10).
		WithBaseLevelSize(2 << 20).
		// No compression, so no block cache: tables are in memory already.
		WithCompression(options.None).
		WithBlockCacheSize(0).
		WithIndexCacheSize(0).
		WithNumCompactors(2).
		WithValueLogFileSize(1 << 20).
		// No value log in memory: every value stays in the LSM tree, so the
		// threshold must exceed the largest record (a 64 KiB payload and
		// its fields) and stay under the batch size (15% of a memtable).
		WithValueThreshold(256 << 10).
		WithNumGoroutines(1)
}

// recount sets the counters from a key-only scan.
func (s *Store) recount() error {
	return s.db.View(func(txn *badger.Txn) error {
		var bundles, devices, accounts int64
		var lastDev []byte
		dig := newShardDigests(s.opts.ShardCount)
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixBundle, '/'}})
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()
			if len(k) != bundleKeyLen {
				it.Close()
				return fmt.Errorf("%w: bundle key of %d bytes", errCorrupt, len(k))
			}
			bundles++
			if dev := keyGroup(k); !bytes.Equal(dev, lastDev) {
				devices++
				lastDev = append(lastDev[:0], dev...)
			}
			if err := dig.addBundleKey(k); err != nil {
				it.Close()
				return err
			}
		}
		it.Close()
		var size int64
		it = txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixAccount, '/'}, PrefetchValues: true})
		for it.Rewind(); it.Valid(); it.Next() {
			accounts++
			a, err := accountFromItem(it.Item())
			if err != nil {
				it.Close()
				return err
			}
			dig.addAccount(a)
			size += accountBytes(a)
		}
		it.Close()
		// r/ values (inline, 20 bytes) carry each bundle's size.
		it = txn.NewIterator(badger.IteratorOptions{Prefix: []byte{prefixRef, '/'}})
		for it.Rewind(); it.Valid(); it.Next() {
			rv, err := refFromItem(it.Item())
			if err != nil {
				it.Close()
				return err
			}
			size += int64(rv.Bytes)
		}
		it.Close()
		claims, tombs, noticeBytes, consumeSize, err := recountNotices(txn, dig)
		if err != nil {
			return err
		}
		s.bytes.Store(size + noticeBytes)
		s.consumeBytes.Store(consumeSize)
		s.claims.Store(claims)
		s.tombs.Store(tombs)
		s.digests.replace(dig)
		s.bundles.Store(bundles)
		s.devices.Store(devices)
		s.accounts.Store(accounts)
		return nil
	})
}

// Counts returns how many devices, bundles and accounts the store holds.
func (s *Store) Counts() Counts {
	return Counts{Devices: s.devices.Load(), Bundles: s.bundles.Load(), Accounts: s.accounts.Load(),
		Claims: s.claims.Load(), Consumed: s.tombs.Load()}
}

// DiskSize returns the sizes of Badger's LSM tree and value log in bytes.
func (s *Store) DiskSize() (lsm, vlog int64) { return s.db.Size() }

// Start runs a prune now and then every PruneInterval until ctx ends or
// Close is called. Calling it again does nothing.
func (s *Store) Start(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started || s.closed {
		return
	}
	s.started = true
	go s.pruneLoop(ctx)
}

// Close stops the prune loop and closes the database. It is safe to call
// more than once.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	started := s.started
	s.mu.Unlock()
	close(s.stop)
	if started {
		<-s.done
	}
	return s.db.Close()
}

// pruneLoop runs the retention prune every PruneInterval and the lifetime
// prune every LifetimePruneInterval.
func (s *Store) pruneLoop(ctx context.Context) {
	defer close(s.done)
	t := time.NewTicker(s.opts.PruneInterval)
	defer t.Stop()
	lt := time.NewTicker(s.opts.LifetimePruneInterval)
	defer lt.Stop()
	retention := true
	for {
		if retention {
			if st, err := s.Prune(ctx); err != nil {
				s.log.Warn("prune failed", "err", err)
			} else if st.Bundles+st.Accounts > 0 {
				s.log.Info("pruned expired records", "bundles", st.Bundles, "lifetime_ended", st.LifetimeEnded, "accounts", st.Accounts)
			}
			s.gcValueLog()
		} else if n, err := s.pruneLifetimes(ctx); err != nil {
			s.log.Warn("lifetime prune failed", "err", err)
		} else if n > 0 {
			s.log.Debug("pruned bundles whose KeyPackage lifetime ended", "bundles", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-s.stop:
			return
		case <-t.C:
			retention = true
		case <-lt.C:
			retention = false
		}
	}
}

// update runs fn in a read-write transaction, retrying on conflicts with
// concurrent writers. fn must reset any state it reports on each call.
func (s *Store) update(ctx context.Context, fn func(txn *badger.Txn) error) error {
	backoff := 50 * time.Microsecond
	for attempt := 0; ; attempt++ {
		err := s.db.Update(fn)
		if !errors.Is(err, badger.ErrConflict) || attempt >= 64 {
			if errors.Is(err, badger.ErrDBClosed) {
				return ErrClosed
			}
			return mapWriteErr(err)
		}
		// Back off with jitter so that writers colliding on one key spread out.
		t := time.NewTimer(backoff/2 + time.Duration(rand.Int64N(int64(backoff))))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, 20*time.Millisecond)
	}
}

// keyLocks serialise writers of one device's bundles or one account within
// this process, so a burst of writes to one key queues instead of
// conflicting in Badger; transactions still detect conflicts with pruning.
type keyLocks [256]sync.Mutex

func (l *keyLocks) lock(k protocol.Key) func() {
	m := &l[k[0]]
	m.Lock()
	return m.Unlock
}

// PutBundle stores a validated bundle unless it is already held (same ref
// with the same or a newer timestamp) or the device already holds
// MaxPerDevice newer bundles. When the device is full, the oldest bundles
// are evicted to make room. Every put of a device also evicts it down to
// MaxPerDevice, so a quota lowered between restarts takes effect on the
// device's next write.
func (s *Store) PutBundle(ctx context.Context, b *Bundle) (outcome PutOutcome, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if b.ReceivedAtMS == 0 {
		b.ReceivedAtMS = s.opts.Now().UnixMilli()
	}
	if b.NotAfterMS < 0 {
		b.NotAfterMS = 1 // ended before 1970: ended
	}
	if err := s.checkDisk(len(b.Payload)); err != nil {
		return 0, fmt.Errorf("storage: put bundle: %w", err)
	}
	defer s.locks.lock(b.DeviceID)()
	var (
		dBundles, dDevice, dBytes int64
		added, removed            [][]byte // b/ keys, for the sync digests
		nd                        noticeDelta
	)
	nowMS := s.opts.Now().UnixMilli()
	err = s.update(ctx, func(txn *badger.Txn) error {
		outcome, dBundles, dDevice, dBytes = 0, 0, 0, 0
		added, removed = nil, nil
		nd.reset()
		// A consumed bundle never comes back while its tombstone lives.
		if until, ok, err := consumedUntil(txn, b.DeviceID, b.Ref); err != nil {
			return err
		} else if ok && until > nowMS {
			return ErrConsumed
		}
		rk := refKey(b.DeviceID, b.Ref)
		var oldKey []byte
		switch item, err := txn.Get(rk); {
		case err == nil:
			old, err := refFromItem(item)
			if err != nil {
				return err
			}
			if old.TS >= b.TimestampMS {
				outcome = Duplicate
				return nil
			}
			oldKey = bundleKey(prefixBundle, b.DeviceID, old.TS, b.Ref)
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		// The count is read so that concurrent writers of the device
		// conflict; the keys themselves are the truth, so a count that
		// drifted (or a quota lowered since they were written) is repaired
		// here instead of trusted.
		if _, err := getCount(txn, b.DeviceID); err != nil {
			return err
		}
		keys, err := deviceKeys(txn, b.DeviceID)
		if err != nil {
			return err
		}
		wasEmpty := len(keys) == 0
		if oldKey != nil {
			// The ref's entry moves to the new timestamp (or goes, below).
			rv, err := deleteBundleRecord(txn, oldKey, false, &nd)
			if err != nil {
				return err
			}
			dBytes -= int64(rv.Bytes)
			if removeKey(&keys, oldKey) {
				removed = append(removed, oldKey)
				dBundles--
			}
			outcome = Refreshed
		}
		newKey := bundleKey(prefixBundle, b.DeviceID, b.TimestampMS, b.Ref)
		// pos: how many held bundles sort before (are newer than) this one.
		pos := sort.Search(len(keys), func(i int) bool { return bytes.Compare(keys[i], newKey) > 0 })
		max := s.opts.MaxPerDevice
		keep := max - 1 // room for the new bundle
		if pos >= max {
			// Older than MaxPerDevice held bundles: not stored. A refresh
			// gets here only when its old copy was already beyond a
			// lowered quota; that copy is gone, and so is its ref entry,
			// so the ref can come back later.
			outcome, keep = OverQuota, max
			if oldKey != nil {
				if err := txn.Delete(rk); err != nil {
					return err
				}
				freed, err := dropRefRecords(txn, b.DeviceID, b.Ref, &nd)
				if err != nil {
					return err
				}
				dBytes -= freed
			}
		}
		if len(keys) > keep {
			for _, k := range keys[keep:] {
				rv, err := deleteBundleRecord(txn, k, true, &nd)
				if err != nil {
					return err
				}
				dBytes -= int64(rv.Bytes)
				removed = append(removed, k)
				dBundles--
			}
			keys = keys[:keep]
		}
		if outcome == OverQuota {
			// keys is not empty here: an empty device takes any bundle.
			return setCount(txn, b.DeviceID, len(keys))
		}
		dBytes += int64(bundleBytes(b))
		if over := s.over(dBytes); over > 0 {
			if !b.usable(s.opts.Now().UnixMilli()) {
				// Held only so that it is not pulled again: not worth a
				// usable bundle's place.
				return fmt.Errorf("%w: no room for a bundle whose KeyPackage lifetime has ended", ErrStoreFull)
			}
			ev, err := s.makeRoom(txn, over, b.TimestampMS, &b.DeviceID)
			if err != nil {
				return err
			}
			dBytes -= ev.freed
			dBundles -= ev.bundles
			dDevice -= ev.emptied
			removed = append(removed, ev.removed...)
			nd.added, nd.removed = append(nd.added, ev.notices.added...), append(nd.removed, ev.notices.removed...)
			nd.claims += ev.notices.claims
		}
		if err := setCount(txn, b.DeviceID, len(keys)+1); err != nil {
			return err
		}
		if err := txn.Set(timeKey(newKey), nil); err != nil {
			return err
		}
		if err := txn.Set(newKey, encodeBundleValue(b)); err != nil {
			return err
		}
		if b.LastResort {
			if err := txn.Set(bundleKey(prefixLastResort, b.DeviceID, b.TimestampMS, b.Ref), nil); err != nil {
				return err
			}
		}
		if err := txn.Set(rk, refValue{TS: b.TimestampMS, NotAfterMS: b.NotAfterMS, Bytes: bundleBytes(b)}.encode()); err != nil {
			return err
		}
		if err := txn.Set(globalRefKey(b.Ref, b.DeviceID), nil); err != nil {
			return err
		}
		if b.NotAfterMS != 0 {
			if err := txn.Set(lifetimeKey(b.NotAfterMS, newKey), nil); err != nil {
				return err
			}
		}
		added = append(added, newKey)
		dBundles++
		if wasEmpty {
			dDevice++
		}
		if outcome == 0 {
			outcome = Stored
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("storage: put bundle: %w", err)
	}
	s.bundles.Add(dBundles)
	s.devices.Add(dDevice)
	s.bytes.Add(dBytes)
	s.digests.updateBundles(added, removed)
	s.applyNotices(&nd)
	return outcome, nil
}

// getCount reads a device's bundle count (0 when it has none).
func getCount(txn *badger.Txn, dev protocol.Key) (int, error) {
	item, err := txn.Get(countKey(dev))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	var n int
	err = item.Value(func(v []byte) error {
		if len(v) != 4 {
			return fmt.Errorf("%w: count value of %d bytes", errCorrupt, len(v))
		}
		n = int(binary.BigEndian.Uint32(v))
		return nil
	})
	return n, err
}

// setCount writes a device's bundle count, deleting the key at zero.
func setCount(txn *badger.Txn, dev protocol.Key, n int) error {
	if n <= 0 {
		return txn.Delete(countKey(dev))
	}
	return txn.Set(countKey(dev), binary.BigEndian.AppendUint32(nil, uint32(n)))
}

// deviceKeys lists a device's b/ keys, newest first.
func deviceKeys(txn *badger.Txn, dev protocol.Key) ([][]byte, error) {
	it := txn.NewIterator(badger.IteratorOptions{Prefix: devicePrefix(prefixBundle, dev)})
	defer it.Close()
	var keys [][]byte
	for it.Rewind(); it.Valid(); it.Next() {
		keys = append(keys, it.Item().KeyCopy(nil))
	}
	return keys, nil
}

// removeKey removes k from *keys and reports whether it was there.
func removeKey(keys *[][]byte, k []byte) bool {
	for i, key := range *keys {
		if bytes.Equal(key, k) {
			*keys = append((*keys)[:i], (*keys)[i+1:]...)
			return true
		}
	}
	return false
}

// LatestBundle returns the bundle a chat client should get for a device: its
// latest usable last-resort bundle if it has one, else its latest usable
// bundle, where latest is the greatest signed timestamp (ties: smaller ref)
// and usable means its KeyPackage lifetime has not ended (NotAfterMS).
func (s *Store) LatestBundle(ctx context.Context, dev protocol.Key) (_ *Bundle, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	now := s.opts.Now().UnixMilli()
	var out *Bundle
	err = s.db.View(func(txn *badger.Txn) error {
		// Last-resort bundles first: l/ keys name them, newest first.
		it := txn.NewIterator(badger.IteratorOptions{Prefix: devicePrefix(prefixLastResort, dev)})
		for it.Rewind(); it.Valid(); it.Next() {
			item, err := txn.Get(bundleTwin(it.Item().Key()))
			if errors.Is(err, badger.ErrKeyNotFound) {
				continue
			}
			if err != nil {
				it.Close()
				return err
			}
			b, err := bundleFromItem(item)
			if err != nil {
				it.Close()
				return err
			}
			if b.usable(now) {
				out = b
				break
			}
		}
		it.Close()
		if out != nil {
			return setClaimed(txn, dev, out)
		}
		it = txn.NewIterator(badger.IteratorOptions{Prefix: devicePrefix(prefixBundle, dev), PrefetchValues: true, PrefetchSize: 4})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			b, err := bundleFromItem(it.Item())
			if err != nil {
				return err
			}
			if b.usable(now) {
				out = b
				return setClaimed(txn, dev, out)
			}
		}
		return ErrNotFound
	})
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, ErrNotFound
		}
		return nil, fmt.Errorf("storage: latest bundle: %w", err)
	}
	return out, nil
}

func bundleFromItem(item *badger.Item) (*Bundle, error) {
	dev, ts, ref, err := parseBundleKey(item.Key())
	if err != nil {
		return nil, err
	}
	b := &Bundle{Bundle: protocol.Bundle{DeviceID: dev}, BundleInfo: protocol.BundleInfo{TimestampMS: ts, Ref: ref}}
	if err := item.Value(func(v []byte) error { return decodeBundleValue(b, v) }); err != nil {
		return nil, err
	}
	return b, nil
}

// Bundles returns every usable bundle held for a device (KeyPackage
// lifetime not ended), newest first.
func (s *Store) Bundles(ctx context.Context, dev protocol.Key) (_ []*Bundle, err error) {
	bs, _, err := s.BundlesUpTo(ctx, dev, -1)
	return bs, err
}

// BundlesUpTo is Bundles bounded by memory: it returns the newest usable
// bundles whose payloads add up to at most maxBytes (negative: no bound)
// and reports whether it left any usable bundle out. It stops reading at
// the bound, so a caller's allocation follows maxBytes, not the device.
func (s *Store) BundlesUpTo(ctx context.Context, dev protocol.Key, maxBytes int) (_ []*Bundle, cut bool, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	now := s.opts.Now().UnixMilli()
	var out []*Bundle
	size := 0
	err = s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: devicePrefix(prefixBundle, dev), PrefetchValues: maxBytes < 0, PrefetchSize: 16})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if maxBytes >= 0 && size+int(it.Item().ValueSize())-bundleValueHdr > maxBytes {
				b, err := bundleFromItem(it.Item())
				if err != nil {
					return err
				}
				if b.usable(now) {
					cut = true
					return nil
				}
				continue
			}
			b, err := bundleFromItem(it.Item())
			if err != nil {
				return err
			}
			if b.usable(now) {
				out = append(out, b)
				size += len(b.Payload)
			}
		}
		return setClaimed(txn, dev, out...)
	})
	if err != nil {
		return nil, false, fmt.Errorf("storage: bundles: %w", err)
	}
	return out, cut, nil
}

// PutAccount stores a validated account bundle under rule. It sets
// UpdatedAtMS to now. A bundle that does not supersede the stored one is
// ErrStale (AccountConverge reports an identical bundle as Duplicate).
func (s *Store) PutAccount(ctx context.Context, a *Account, rule AccountRule) (_ PutOutcome, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if err := s.checkDisk(len(a.Payload)); err != nil {
		return 0, fmt.Errorf("storage: put account: %w", err)
	}
	defer s.locks.lock(a.AccountPub)()
	var outcome PutOutcome
	var dAccounts, dBytes, dBundles, dDevices int64
	var replaced *Account
	var evicted [][]byte
	var nd noticeDelta
	err = s.update(ctx, func(txn *badger.Txn) error {
		outcome, dAccounts, replaced = 0, 0, nil
		dBytes, dBundles, dDevices, evicted = 0, 0, 0, nil
		nd.reset()
		key := accountKey(a.AccountPub)
		switch item, err := txn.Get(key); {
		case err == nil:
			var old Account
			if err := item.Value(func(v []byte) error { return decodeAccountValue(&old, v) }); err != nil {
				return err
			}
			switch rule {
			case AccountMustIncrease:
				if a.Lamport <= old.Lamport {
					return ErrStale
				}
			case AccountConverge:
				if bytes.Equal(a.Payload, old.Payload) && a.Signature == old.Signature {
					outcome = Duplicate
					return nil
				}
				if !protocol.AccountSupersedes(a.Lamport, a.Payload, old.Lamport, old.Payload) {
					return ErrStale
				}
			default:
				return fmt.Errorf("unknown account rule %d", rule)
			}
			old.AccountPub = a.AccountPub
			replaced = &old
		case errors.Is(err, badger.ErrKeyNotFound):
			// A pruned account must not come back from a peer that has not
			// pruned it yet: only a newer lamport revives it.
			if lamport, ok, err := s.tombstone(txn, a.AccountPub); err != nil {
				return err
			} else if ok && a.Lamport <= lamport {
				return ErrStale
			} else if ok {
				if err := txn.Delete(tombstoneKey(a.AccountPub)); err != nil {
					return err
				}
			}
			dAccounts = 1
		default:
			return err
		}
		dBytes = accountBytes(a)
		if replaced != nil {
			dBytes -= accountBytes(replaced)
		}
		if over := s.over(dBytes); over > 0 {
			// Accounts are never evicted; bundles make room, any signed
			// timestamp being older than an account update.
			ev, err := s.makeRoom(txn, over, math.MaxUint64, nil)
			if err != nil {
				return err
			}
			dBytes -= ev.freed
			dBundles, dDevices, evicted = -ev.bundles, -ev.emptied, ev.removed
			nd = ev.notices
		}
		a.UpdatedAtMS = s.opts.Now().UnixMilli()
		outcome = Stored
		return txn.Set(key, encodeAccountValue(a))
	})
	if err != nil {
		if errors.Is(err, ErrStale) {
			return 0, ErrStale
		}
		return 0, fmt.Errorf("storage: put account: %w", err)
	}
	s.accounts.Add(dAccounts)
	s.bytes.Add(dBytes)
	s.bundles.Add(dBundles)
	s.devices.Add(dDevices)
	s.digests.updateBundles(nil, evicted)
	s.applyNotices(&nd)
	if outcome == Stored {
		s.digests.updateAccount(a, replaced)
	}
	return outcome, nil
}

// tombstone returns the lamport of a live tombstone for acct.
func (s *Store) tombstone(txn *badger.Txn, acct protocol.Key) (uint64, bool, error) {
	item, err := txn.Get(tombstoneKey(acct))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	var lamport uint64
	live := false
	err = item.Value(func(v []byte) error {
		if len(v) != 16 {
			return fmt.Errorf("%w: tombstone of %d bytes", errCorrupt, len(v))
		}
		lamport = binary.BigEndian.Uint64(v)
		live = int64(binary.BigEndian.Uint64(v[8:])) > s.opts.Now().UnixMilli()
		return nil
	})
	return lamport, live, err
}

// Account returns the account bundle held for an account key.
func (s *Store) Account(ctx context.Context, acct protocol.Key) (_ *Account, err error) {
	defer recoverCorrupt(&err)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	a := &Account{AccountBundle: protocol.AccountBundle{AccountPub: acct}}
	err = s.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(accountKey(acct))
		if err != nil {
			return err
		}
		return item.Value(func(v []byte) error { return decodeAccountValue(a, v) })
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("storage: account: %w", err)
	}
	return a, nil
}
