package ingest_test

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kpnode/kpnode/node/ingest"
	"github.com/kpnode/kpnode/protocol"
	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
	"github.com/kpnode/kpnode/protocol/pb"
	"github.com/kpnode/kpnode/storage"
)

// The rows of the verdict table in protocol/README.md, "Gossip", in order;
// each is checked against the README's own text (readmeTable).
const (
	rowStored    = iota // stored, or a newer timestamp for a known ref: Accept
	rowMalformed        // undecodable, wrong sizes, no record, key of another shard: Reject
	rowRule             // any validation rule except the four transient ones: Reject
	rowTransient        // the four rules of this node's clock and retention: Ignore
	rowLocal            // duplicate, over quota, stale, store full, any local failure: Ignore
	rowNotice           // a notice on a bundle not held or consumed, a tombstone quota, a notice rate: Ignore
	tableRows
)

// rowPhrase is a phrase of each row's outcome cell, so that a reordered or
// reworded README table fails here rather than passing against old rows.
var rowPhrase = [tableRows]string{
	rowStored:    "stored, or a newer timestamp for a known ref",
	rowMalformed: "undecodable, wrong sizes",
	rowRule:      "any validation rule except the five below",
	rowTransient: "this node's clock and retention",
	rowLocal:     "duplicate, over quota",
	rowNotice:    "a notice naming a bundle not held here",
}

type tableRow struct {
	outcome string // the outcome cell
	verdict ingest.Verdict
}

// readmeTable reads the Gossip verdict table of protocol/README.md.
func readmeTable(t *testing.T) []tableRow {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "protocol", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var rows []tableRow
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "| outcome | verdict |":
			in = true
		case !in || strings.HasPrefix(line, "| ---"):
		case !strings.HasPrefix(line, "|"):
			in = false
		default:
			cells := strings.Split(strings.Trim(line, "|"), "|")
			if len(cells) != 2 {
				t.Fatalf("README verdict table row %q: %d cells", line, len(cells))
			}
			row := tableRow{outcome: strings.TrimSpace(cells[0])}
			switch strings.Fields(cells[1])[0] {
			case "Accept":
				row.verdict = ingest.Accept
			case "Reject":
				row.verdict = ingest.Reject
			case "Ignore":
				row.verdict = ingest.Ignore
			default:
				t.Fatalf("README verdict table row %q: unknown verdict", line)
			}
			rows = append(rows, row)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return rows
}

// ruleConsts returns the values of the constants of type Rule declared in
// the non-test files of the package in dir: every rule, including one added
// without a row here.
func ruleConsts(t *testing.T, dir string) []string {
	t.Helper()
	fset := token.NewFileSet()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, filepath.Join(dir, e.Name()), nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				if id, ok := vs.Type.(*ast.Ident); !ok || id.Name != "Rule" {
					continue
				}
				for _, v := range vs.Values {
					lit, ok := v.(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						t.Fatalf("%s: a Rule constant that is not a string literal", e.Name())
					}
					s, _ := strconv.Unquote(lit.Value)
					out = append(out, s)
				}
			}
		}
	}
	return out
}

// allRules is every rule a *protocol.ValidationError can carry: protocol's
// own, and "mls_" plus each rule of protocol/mls.
func allRules(t *testing.T) []protocol.Rule {
	t.Helper()
	var rules []protocol.Rule
	for _, r := range ruleConsts(t, filepath.Join("..", "..", "protocol")) {
		rules = append(rules, protocol.Rule(r))
	}
	mlsRules := ruleConsts(t, filepath.Join("..", "..", "protocol", "mls"))
	var listed []string
	for _, r := range mls.Rules() {
		listed = append(listed, string(r))
	}
	slices.Sort(listed)
	if got := slices.Sorted(slices.Values(mlsRules)); !slices.Equal(got, listed) {
		t.Fatalf("mls.Rules() lists %v, the package declares %v", listed, got)
	}
	for _, r := range mlsRules {
		rules = append(rules, protocol.RuleMLS+"_"+protocol.Rule(r))
	}
	if len(rules) < 20 {
		t.Fatalf("found only %d rules: %v", len(rules), rules)
	}
	return rules
}

// realErrors produces ingest results with the real parts: protocol.Policy
// (MLS off and strict), a Badger store in a temporary directory, the pb
// conversions.
type realErrors struct {
	t      *testing.T
	now    time.Time
	off    protocol.Policy
	strict protocol.Policy
	store  *storage.Store // MaxPerDevice 1
	full   *storage.Store // MaxBytes 1
}

func newRealErrors(t *testing.T) *realErrors {
	open := func(name string, o storage.Options) *storage.Store {
		o.Dir = filepath.Join(t.TempDir(), name)
		o.NoSync, o.MinFreeDisk = true, -1
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
		s, err := storage.Open(o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	r := &realErrors{t: t, now: time.Now(), off: protocol.DefaultPolicy(), strict: protocol.DefaultPolicy()}
	r.off.MLS, r.strict.MLS = protocol.MLSOff, protocol.MLSStrict
	r.store = open("store", storage.Options{MaxPerDevice: 1})
	r.full = open("full", storage.Options{MaxBytes: 1})
	return r
}

func (r *realErrors) ms(d time.Duration) uint64 { return uint64(r.now.Add(d).UnixMilli()) }

// validate runs a bundle through the policy only.
func (r *realErrors) validate(p protocol.Policy, b protocol.Bundle) (storage.PutOutcome, error) {
	_, err := p.ValidateBundle(&b, r.now)
	return 0, err
}

// put runs a bundle through the policy (MLS off) and then the store.
func (r *realErrors) put(s *storage.Store, b protocol.Bundle) (storage.PutOutcome, error) {
	info, err := r.off.ValidateBundle(&b, r.now)
	if err != nil {
		return 0, err
	}
	return s.PutBundle(context.Background(), &storage.Bundle{Bundle: b, BundleInfo: info})
}

func (r *realErrors) putAccount(a protocol.AccountBundle, rule storage.AccountRule) (storage.PutOutcome, error) {
	lamport, err := r.off.ValidateAccount(&a)
	if err != nil {
		return 0, err
	}
	return r.store.PutAccount(context.Background(), &storage.Account{AccountBundle: a, Lamport: lamport}, rule)
}

// kp is a real KeyPackage signed by signer with the given lifetime.
func (r *realErrors) kp(signer ed25519.PrivateKey, notBefore, notAfter time.Duration) []byte {
	kp, _, err := mlstest.Generate(mlstest.Options{Signer: signer, NotBefore: r.now.Add(notBefore), NotAfter: r.now.Add(notAfter)})
	if err != nil {
		r.t.Fatal(err)
	}
	return kp
}

func key() ed25519.PrivateKey {
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	return priv
}

// VerdictOf is the one mapping of ingest results to verdicts, pinned row by
// row against the table in protocol/README.md ("Gossip"): every validation
// rule protocol and protocol/mls declare (a rule added without a row here
// fails), the transient ones, malformed messages, and every outcome and
// error of the store; real errors from protocol.Policy, the pb conversions
// and a Badger store wherever they are cheap to produce.
func TestVerdictTable(t *testing.T) {
	readme := readmeTable(t)
	if len(readme) != tableRows {
		t.Fatalf("protocol/README.md's Gossip verdict table has %d rows, this test knows %d: add the new row here", len(readme), tableRows)
	}
	for i, phrase := range rowPhrase {
		if !strings.Contains(readme[i].outcome, phrase) {
			t.Fatalf("README verdict table row %d is %q, expected it to say %q", i+1, readme[i].outcome, phrase)
		}
	}

	r := newRealErrors(t)
	ctx := context.Background()
	ve := func(rule protocol.Rule) error { return &protocol.ValidationError{Rule: rule, Field: "x", Detail: "y"} }
	mlsVE := func(rule mls.Rule) error {
		return &protocol.ValidationError{Rule: protocol.RuleMLS + "_" + protocol.Rule(rule), Field: "key_package", Detail: "y", Err: &mls.Error{Rule: rule}}
	}
	hand := func(err error) func() (storage.PutOutcome, error) {
		return func() (storage.PutOutcome, error) { return 0, err }
	}

	dev := key()
	stored := protocol.SignBundle(dev, r.ms(-time.Minute), []byte("kp-stored"))
	notPoint := protocol.SignBundle(dev, r.ms(0), []byte("kp"))
	for {
		rand.Read(notPoint.DeviceID[:])
		if _, err := r.off.ValidateBundle(&notPoint, r.now); protocol.RuleOf(err) == protocol.RuleKeyNotPoint {
			break
		}
	}
	forged := protocol.SignBundle(dev, r.ms(0), []byte("kp"))
	forged.Signature[0] ^= 1
	acct := key()
	// The store holds lamport 2 for acct; 1 is stale.
	if _, err := r.putAccount(protocol.SignAccount(acct, protocol.EncodeAccountPayload(2, nil)), storage.AccountConverge); err != nil {
		t.Fatal(err)
	}
	badProto := proto.Unmarshal([]byte{0xff, 0xff, 0xff}, &pb.GossipMessage{})
	if badProto == nil {
		t.Fatal("garbage decoded")
	}

	type tc struct {
		name string
		row  int
		// rule, if set, is the rule the result must carry; is, an error it
		// must wrap; outcome, the store's outcome it must report.
		rule    protocol.Rule
		is      error
		outcome storage.PutOutcome
		do      func() (storage.PutOutcome, error)
	}
	cases := []tc{
		// Accept.
		{name: "stored (real store)", row: rowStored, outcome: storage.Stored, do: func() (storage.PutOutcome, error) { return r.put(r.store, stored) }},
		{name: "refreshed: a newer timestamp for a known ref (real store)", row: rowStored, outcome: storage.Refreshed, do: func() (storage.PutOutcome, error) {
			return r.put(r.store, protocol.SignBundle(dev, r.ms(0), []byte("kp-stored")))
		}},
		// Malformed messages.
		{name: "undecodable (real proto error)", row: rowMalformed, do: hand(fmt.Errorf("%w: %v", protocol.ErrMalformed, badProto))},
		{name: "wrong sizes (real pb.ToBundle)", row: rowMalformed, do: func() (storage.PutOutcome, error) {
			_, err := pb.ToBundle(&pb.Bundle{DeviceId: make([]byte, 31), Signature: make([]byte, 64)})
			return 0, err
		}},
		{name: "no record of the topic's kind (real pb.ToAccount)", row: rowMalformed, do: func() (storage.PutOutcome, error) {
			_, err := pb.ToAccount(nil)
			return 0, err
		}},
		{name: "key of another shard", row: rowMalformed, do: hand(fmt.Errorf("%w: device is in shard 1, not 2", protocol.ErrMalformed))},
		{name: "malformed, wrapped again", row: rowMalformed, do: hand(fmt.Errorf("device x: %w", fmt.Errorf("%w: no bundle", protocol.ErrMalformed)))},
		// Validation rules, real where cheap.
		{name: "key_not_point (real)", row: rowRule, rule: protocol.RuleKeyNotPoint, do: func() (storage.PutOutcome, error) { return r.validate(r.off, notPoint) }},
		{name: "signature (real)", row: rowRule, rule: protocol.RuleSignature, do: func() (storage.PutOutcome, error) { return r.validate(r.off, forged) }},
		{name: "payload_too_short (real)", row: rowRule, rule: protocol.RulePayloadTooShort, do: func() (storage.PutOutcome, error) {
			return r.validate(r.off, protocol.Bundle{DeviceID: stored.DeviceID, Payload: []byte{1}, Signature: [64]byte(ed25519.Sign(dev, []byte{1}))})
		}},
		{name: "payload_too_large (real; a network constant)", row: rowRule, rule: protocol.RulePayloadTooLarge, do: func() (storage.PutOutcome, error) {
			return r.validate(r.off, protocol.SignBundle(dev, r.ms(0), make([]byte, protocol.MaxPayloadSize)))
		}},
		{name: "account_header (real)", row: rowRule, rule: protocol.RuleAccountHeader, do: func() (storage.PutOutcome, error) {
			return r.putAccount(protocol.SignAccount(acct, []byte("x")), storage.AccountConverge)
		}},
		{name: "signature, wrapped", row: rowRule, rule: protocol.RuleSignature, do: hand(fmt.Errorf("bundle: %w", ve(protocol.RuleSignature)))},
		{name: "mls, unclassified", row: rowRule, rule: protocol.RuleMLS, do: hand(ve(protocol.RuleMLS))},
		{name: "mls_malformed (real)", row: rowRule, rule: "mls_malformed", do: func() (storage.PutOutcome, error) {
			return r.validate(r.strict, protocol.SignBundle(dev, r.ms(0), []byte{0xff, 0xff}))
		}},
		{name: "mls_signature_key (real: a KeyPackage of another key)", row: rowRule, rule: "mls_signature_key", do: func() (storage.PutOutcome, error) {
			return r.validate(r.strict, protocol.SignBundle(dev, r.ms(0), r.kp(key(), -time.Hour, 24*time.Hour)))
		}},
		{name: "mls_lifetime_too_long (real; a network constant)", row: rowRule, rule: "mls_lifetime_too_long", do: func() (storage.PutOutcome, error) {
			return r.validate(r.strict, protocol.SignBundle(dev, r.ms(0), r.kp(dev, -time.Hour, 365*24*time.Hour)))
		}},
		// Transient rules: this node's clock and retention.
		{name: "timestamp_future (real)", row: rowTransient, rule: protocol.RuleTimestampFuture, do: func() (storage.PutOutcome, error) {
			return r.validate(r.off, protocol.SignBundle(dev, r.ms(time.Hour), []byte("kp")))
		}},
		{name: "timestamp_expired (real)", row: rowTransient, rule: protocol.RuleTimestampExpired, do: func() (storage.PutOutcome, error) {
			return r.validate(r.off, protocol.SignBundle(dev, r.ms(-40*24*time.Hour), []byte("kp")))
		}},
		{name: "mls_lifetime_not_yet_valid (real)", row: rowTransient, rule: "mls_lifetime_not_yet_valid", do: func() (storage.PutOutcome, error) {
			return r.validate(r.strict, protocol.SignBundle(dev, r.ms(0), r.kp(dev, 24*time.Hour, 48*time.Hour)))
		}},
		{name: "mls_lifetime_expired (real)", row: rowTransient, rule: "mls_lifetime_expired", do: func() (storage.PutOutcome, error) {
			return r.validate(r.strict, protocol.SignBundle(dev, r.ms(0), r.kp(dev, -48*time.Hour, -24*time.Hour)))
		}},
		{name: "timestamp_future, wrapped", row: rowTransient, rule: protocol.RuleTimestampFuture, do: hand(fmt.Errorf("x: %w", ve(protocol.RuleTimestampFuture)))},
		// The MLS rules that take a crafted KeyPackage to break: the error
		// protocol.Policy builds from protocol/mls's.
		{name: "mls_non_minimal_length", row: rowRule, rule: "mls_non_minimal_length", do: hand(mlsVE(mls.RuleNonMinimalLength))},
		{name: "mls_trailing_bytes", row: rowRule, rule: "mls_trailing_bytes", do: hand(mlsVE(mls.RuleTrailingBytes))},
		{name: "mls_version", row: rowRule, rule: "mls_version", do: hand(mlsVE(mls.RuleVersion))},
		{name: "mls_cipher_suite", row: rowRule, rule: "mls_cipher_suite", do: hand(mlsVE(mls.RuleCipherSuite))},
		{name: "mls_key_size", row: rowRule, rule: "mls_key_size", do: hand(mlsVE(mls.RuleKeySize))},
		{name: "mls_leaf_source", row: rowRule, rule: "mls_leaf_source", do: hand(mlsVE(mls.RuleLeafSource))},
		{name: "mls_leaf_signature", row: rowRule, rule: "mls_leaf_signature", do: hand(mlsVE(mls.RuleLeafSignature))},
		{name: "mls_keypackage_signature", row: rowRule, rule: "mls_keypackage_signature", do: hand(mlsVE(mls.RuleKeyPackageSignature))},
		{name: "mls_init_key_equals_encryption_key", row: rowRule, rule: "mls_init_key_equals_encryption_key", do: hand(mlsVE(mls.RuleInitKeyReuse))},
		{name: "mls_credential", row: rowRule, rule: "mls_credential", do: hand(mlsVE(mls.RuleCredential))},
		{name: "mls_unsupported_extension", row: rowRule, rule: "mls_unsupported_extension", do: hand(mlsVE(mls.RuleUnsupportedExtension))},
		// This node's state and failures.
		{name: "duplicate (real store)", row: rowLocal, outcome: storage.Duplicate, do: func() (storage.PutOutcome, error) {
			return r.put(r.store, protocol.SignBundle(dev, r.ms(0), []byte("kp-stored")))
		}},
		{name: "over quota, --max-per-device 1 (real store)", row: rowLocal, outcome: storage.OverQuota, do: func() (storage.PutOutcome, error) {
			return r.put(r.store, protocol.SignBundle(dev, r.ms(-time.Hour), []byte("kp-older")))
		}},
		{name: "stale account lamport (real store)", row: rowLocal, is: storage.ErrStale, do: func() (storage.PutOutcome, error) {
			return r.putAccount(protocol.SignAccount(acct, protocol.EncodeAccountPayload(1, nil)), storage.AccountConverge)
		}},
		{name: "store full (real store over its budget)", row: rowLocal, is: storage.ErrStoreFull, do: func() (storage.PutOutcome, error) {
			return r.put(r.full, protocol.SignBundle(key(), r.ms(0), []byte("kp")))
		}},
		{name: "store full, disk (wrapped)", row: rowLocal, do: hand(fmt.Errorf("put: %w: disk full: %w", storage.ErrStoreFull, errors.New("no space left on device")))},
		{name: "store miss", row: rowLocal, do: hand(storage.ErrNotFound)},
		{name: "context cancelled (real store)", row: rowLocal, is: context.Canceled, do: func() (storage.PutOutcome, error) {
			cctx, cancel := context.WithCancel(ctx)
			cancel()
			b := protocol.SignBundle(key(), r.ms(0), []byte("kp"))
			info, _ := r.off.ValidateBundle(&b, r.now)
			return r.store.PutBundle(cctx, &storage.Bundle{Bundle: b, BundleInfo: info})
		}},
		{name: "deadline", row: rowLocal, do: hand(context.DeadlineExceeded)},
		{name: "a wrapped local error", row: rowLocal, do: hand(fmt.Errorf("store: write: %w", errors.New("input/output error")))},
		// Notices: the stateless rules (real protocol.Policy), the rules the
		// node builds from the store's answer, and the store's refusals.
		{name: "claim_notice_length (real)", row: rowRule, rule: protocol.RuleClaimNoticeLength, do: func() (storage.PutOutcome, error) {
			n := protocol.SignClaim(dev, r.ms(0), stored.DeviceID, protocol.Ref{1})
			n.Payload = n.Payload[:len(n.Payload)-1]
			_, err := r.off.ValidateClaim(&n, r.now)
			return 0, err
		}},
		{name: "claim_layout (real: a signed payload of the right length, another domain)", row: rowRule, rule: protocol.RuleClaimLayout, do: func() (storage.PutOutcome, error) {
			p := protocol.ClaimPayload(r.ms(0), stored.DeviceID, protocol.Ref{1})
			p[0] = 'K'
			n := protocol.ClaimNotice{NodeKey: stored.DeviceID, Payload: p, Signature: [64]byte(ed25519.Sign(dev, p))}
			_, err := r.off.ValidateClaim(&n, r.now)
			return 0, err
		}},
		{name: "claim notice, forged signature (real)", row: rowRule, rule: protocol.RuleSignature, do: func() (storage.PutOutcome, error) {
			n := protocol.SignClaim(dev, r.ms(0), stored.DeviceID, protocol.Ref{1})
			n.Signature[3] ^= 1
			_, err := r.off.ValidateClaim(&n, r.now)
			return 0, err
		}},
		{name: "foreign_ref (as the node builds it from storage.ErrForeignRef, strict MLS)", row: rowRule, rule: protocol.RuleForeignRef, do: hand(&protocol.ValidationError{
			Rule: protocol.RuleForeignRef, Field: "payload", Detail: "ref of another device", Err: storage.ErrForeignRef})},
		{name: "consume_too_large (real)", row: rowRule, rule: protocol.RuleConsumeTooLarge, do: func() (storage.PutOutcome, error) {
			n := protocol.SignConsume(dev, r.ms(0), make([]protocol.Ref, protocol.MaxConsumeRefs+1))
			_, err := r.off.ValidateConsume(&n, r.now)
			return 0, err
		}},
		{name: "consume_layout (real: a ref twice)", row: rowRule, rule: protocol.RuleConsumeLayout, do: func() (storage.PutOutcome, error) {
			n := protocol.SignConsume(dev, r.ms(0), []protocol.Ref{{1}, {1}})
			_, err := r.off.ValidateConsume(&n, r.now)
			return 0, err
		}},
		{name: "consume notice, timestamp_future (real)", row: rowTransient, rule: protocol.RuleTimestampFuture, do: func() (storage.PutOutcome, error) {
			n := protocol.SignConsume(dev, r.ms(time.Hour), []protocol.Ref{{1}})
			_, err := r.off.ValidateConsume(&n, r.now)
			return 0, err
		}},
		{name: "consume_foreign_ref (as the node builds it from storage.ErrForeignRef)", row: rowTransient, rule: protocol.RuleConsumeForeignRef, do: hand(&protocol.ValidationError{
			Rule: protocol.RuleConsumeForeignRef, Field: "payload", Detail: "names a keypackage of another device", Err: storage.ErrForeignRef})},
		{name: "claim on a ref not held", row: rowNotice, is: storage.ErrRefNotHeld, do: hand(fmt.Errorf("device x: %w", storage.ErrRefNotHeld))},
		{name: "claim on a consumed ref", row: rowNotice, is: storage.ErrConsumed, do: hand(storage.ErrConsumed)},
		{name: "consume over the device's tombstone quota", row: rowNotice, is: storage.ErrConsumeQuota, do: hand(fmt.Errorf("node: %w", storage.ErrConsumeQuota))},
		{name: "notice over a rate limit", row: rowNotice, is: ingest.ErrNoticeRate, do: hand(fmt.Errorf("claim: %w", ingest.ErrNoticeRate))},
		{name: "claim notice over its origin's rate for the device (Reject only when the origin forwards it and keeps doing it: the validator decides)", row: rowNotice, is: ingest.ErrNoticeRate, do: hand(ingest.ErrClaimRate)},
		{name: "claim notice, a ref of another device with MLS off (store's error, not a rule)", row: rowLocal, is: storage.ErrForeignRef, do: hand(storage.ErrForeignRef)},
	}
	// Every rule has a case: a rule added to protocol or protocol/mls
	// without a case here fails, so its verdict is decided, not defaulted.
	covered := map[protocol.Rule]bool{}
	for _, c := range cases {
		covered[c.rule] = true
	}
	transient := map[protocol.Rule]bool{}
	for _, m := range regexp.MustCompile("`([a-z_]+)`").FindAllStringSubmatch(readme[rowTransient].outcome, -1) {
		transient[protocol.Rule(m[1])] = true
	}
	if len(transient) != 5 {
		t.Fatalf("README's transient row names %d rules, want 5: %q", len(transient), readme[rowTransient].outcome)
	}
	rules := allRules(t)
	for _, rule := range rules {
		if !covered[rule] {
			t.Errorf("rule %q has no case in the verdict table: decide its verdict (protocol/README.md, \"Gossip\") and add a case", rule)
		}
	}
	for _, c := range cases {
		if c.rule != "" && !slices.Contains(rules, c.rule) {
			t.Errorf("%s: rule %q is declared by neither protocol nor protocol/mls", c.name, c.rule)
		}
		if c.rule != "" && transient[c.rule] != (c.row == rowTransient) {
			t.Errorf("%s: in row %d, but README's transient row says %v", c.name, c.row+1, transient[c.rule])
		}
	}
	for rule := range transient {
		if !slices.Contains(rules, rule) {
			t.Errorf("README's transient row names %q, which is no rule", rule)
		}
	}

	seen := [tableRows]int{}
	for _, c := range cases {
		outcome, err := c.do()
		if c.rule != "" {
			if got := protocol.RuleOf(err); got != c.rule {
				t.Errorf("%s: the error carries rule %q (%v), want %q", c.name, got, err, c.rule)
				continue
			}
			var v *protocol.ValidationError
			errors.As(err, &v)
			if v.Transient() != (c.row == rowTransient) {
				t.Errorf("%s: Transient() = %v, but the README puts it in row %d", c.name, v.Transient(), c.row+1)
			}
		}
		// Each case produces what it is named for.
		switch {
		case c.outcome != 0 && (err != nil || outcome != c.outcome):
			t.Errorf("%s: got %v, %v, want %v", c.name, outcome, err, c.outcome)
		case c.is != nil && !errors.Is(err, c.is):
			t.Errorf("%s: %v does not wrap %v", c.name, err, c.is)
		case c.row == rowMalformed && !errors.Is(err, protocol.ErrMalformed):
			t.Errorf("%s: %v is not ErrMalformed", c.name, err)
		case c.row == rowStored && c.outcome == 0, (c.row == rowLocal || c.row == rowNotice) && c.outcome == 0 && err == nil:
			t.Errorf("%s: the case names no outcome or error", c.name)
		}
		if got, want := ingest.VerdictOf(outcome, err), readme[c.row].verdict; got != want {
			t.Errorf("%s (README row %d, %q): VerdictOf(%v, %v) = %v, want %v", c.name, c.row+1, readme[c.row].outcome, outcome, err, got, want)
		}
		seen[c.row]++
	}
	for i, n := range seen {
		if n == 0 {
			t.Errorf("README verdict table row %d (%q) has no case", i+1, readme[i].outcome)
		}
	}
	t.Logf("%d cases, %d rules, per README row %v", len(cases), len(rules), seen)
}
