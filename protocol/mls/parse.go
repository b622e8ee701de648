package mls

// Protocol code points used by this package (RFC 9420 §17, and
// draft-ietf-mls-extensions-04 for last_resort).
const (
	// VersionMLS10 is ProtocolVersion mls10.
	VersionMLS10 uint16 = 1
	// WireFormatKeyPackage is the MLSMessage wire_format mls_key_package.
	WireFormatKeyPackage uint16 = 5
	// CredentialBasic is the basic credential type.
	CredentialBasic uint16 = 1
	// CredentialX509 is the x509 credential type.
	CredentialX509 uint16 = 2
	// ExtensionLastResort is the last_resort_key_package extension type
	// (draft-ietf-mls-extensions-04/-05, OpenMLS ExtensionType::LastResort).
	ExtensionLastResort uint16 = 0x000A
)

// LeafNodeSource is the leaf_node_source of a LeafNode.
type LeafNodeSource uint8

// The leaf node sources. Only SourceKeyPackage is valid in a KeyPackage;
// the others are parsed so that Validate can report RuleLeafSource.
const (
	SourceKeyPackage LeafNodeSource = 1
	SourceUpdate     LeafNodeSource = 2
	SourceCommit     LeafNodeSource = 3
)

// A KeyPackage is a parsed RFC 9420 KeyPackage.
//
// All byte slices alias the input given to Parse; modifying that input
// modifies them. Each slice's capacity ends where the field ends, so
// appending to one never overwrites the input.
type KeyPackage struct {
	Version     uint16
	CipherSuite uint16
	InitKey     []byte
	LeafNode    LeafNode
	Extensions  []Extension
	Signature   []byte

	// TBS is the KeyPackageTBS, the bytes of Raw from version through
	// extensions, which Signature signs.
	TBS []byte
	// Raw is the bare encoded KeyPackage (without an MLSMessage header).
	// KeyPackageRef and both signatures are computed over it.
	Raw []byte

	// Wrapped reports whether the input was an MLSMessage. WrapperVersion
	// and WireFormat are the MLSMessage header fields; they are zero when
	// Wrapped is false.
	Wrapped        bool
	WrapperVersion uint16
	WireFormat     uint16
}

// A LeafNode is the leaf_node of a KeyPackage.
type LeafNode struct {
	EncryptionKey []byte
	SignatureKey  []byte
	Credential    Credential
	Capabilities  Capabilities
	Source        LeafNodeSource
	// Lifetime is set when Source is SourceKeyPackage.
	Lifetime Lifetime
	// ParentHash is set when Source is SourceCommit.
	ParentHash []byte
	Extensions []Extension
	Signature  []byte

	// TBS is the LeafNodeTBS for source key_package: the LeafNode bytes
	// from encryption_key through extensions, which Signature signs.
	TBS []byte
}

// Lifetime is a LeafNode's validity period in Unix seconds, both ends
// included.
type Lifetime struct {
	NotBefore uint64
	NotAfter  uint64
}

// A Credential is a basic or x509 credential. Parse rejects other types,
// since a credential has no outer length and cannot be skipped.
type Credential struct {
	Type uint16
	// Identity is the basic credential's identity.
	Identity []byte
	// Certificates is the x509 credential's DER chain, end-entity first.
	Certificates [][]byte
}

// Capabilities are the LeafNode's declared capabilities.
type Capabilities struct {
	Versions     []uint16
	CipherSuites []uint16
	Extensions   []uint16
	Proposals    []uint16
	Credentials  []uint16
}

// An Extension is one entry of an extension list.
type Extension struct {
	Type uint16
	Data []byte
}

// Parse decodes a bare KeyPackage or an MLSMessage-wrapped one
// (00 01 00 05 ‖ KeyPackage).
//
// It tries the wrapped form first and falls back to the bare form; either
// must consume the whole input. An input that parses only as an MLSMessage
// with another wire_format is returned with Wrapped set, so that Validate
// rejects it under RuleVersion. Parse checks structure only: minimal varint
// lengths, no 0b11 varint prefix, vectors filled exactly by their elements,
// known credential types, a known leaf_node_source and no trailing bytes.
//
// The error is always an *Error with Rule RuleMalformed,
// RuleNonMinimalLength, RuleTrailingBytes or RuleLeafSource.
func Parse(data []byte) (*KeyPackage, error) {
	wrapped := len(data) >= 4 && data[2] == 0 && data[3] == byte(WireFormatKeyPackage)
	if wrapped {
		kp, werr := parseWrapped(data)
		if werr == nil {
			return kp, nil
		}
		kp, berr := parseBare(data, 0)
		if berr == nil {
			return kp, nil
		}
		return nil, further(werr, berr)
	}
	kp, berr := parseBare(data, 0)
	if berr == nil {
		return kp, nil
	}
	if len(data) >= 4 {
		// Perhaps an MLSMessage of another wire format around a
		// KeyPackage. Only a complete parse counts: otherwise the bare
		// error is the relevant one.
		if kp, werr := parseWrapped(data); werr == nil {
			return kp, nil
		}
	}
	return nil, berr
}

// further returns the error of the attempt that got further into the
// input, preferring b (the bare attempt) on a tie.
func further(w, b *Error) *Error {
	if w.offset > b.offset {
		return w
	}
	return b
}

func parseWrapped(data []byte) (*KeyPackage, *Error) {
	kp, err := parseBare(data[4:], 4)
	if err != nil {
		return nil, err
	}
	kp.Wrapped = true
	kp.WrapperVersion = uint16(data[0])<<8 | uint16(data[1])
	kp.WireFormat = uint16(data[2])<<8 | uint16(data[3])
	return kp, nil
}

// parseBare parses a whole bare KeyPackage that starts at offset base of
// the input; offsets in its errors count from the start of the input.
func parseBare(data []byte, base int) (*KeyPackage, *Error) {
	r := reader{s: data, end: base + len(data)}
	kp, err := parseKeyPackage(&r)
	if err != nil {
		return nil, err
	}
	if !r.empty() {
		return nil, r.errorf(RuleTrailingBytes,
			"%d unexpected byte(s) after the KeyPackage, which ends at byte %d", len(r.s), r.pos())
	}
	return kp, nil
}

func parseKeyPackage(r *reader) (*KeyPackage, *Error) {
	in := r.s
	kp := new(KeyPackage)
	var err *Error
	if kp.Version, err = r.uint16("KeyPackage.version"); err != nil {
		return nil, err
	}
	if kp.CipherSuite, err = r.uint16("KeyPackage.cipher_suite"); err != nil {
		return nil, err
	}
	if kp.InitKey, err = r.opaque("KeyPackage.init_key"); err != nil {
		return nil, err
	}
	if err = parseLeafNode(r, &kp.LeafNode); err != nil {
		return nil, err
	}
	if kp.Extensions, err = parseExtensions(r, "KeyPackage.extensions"); err != nil {
		return nil, err
	}
	n := len(in) - len(r.s)
	kp.TBS = in[:n:n]
	if kp.Signature, err = r.opaque("KeyPackage.signature"); err != nil {
		return nil, err
	}
	n = len(in) - len(r.s)
	kp.Raw = in[:n:n]
	return kp, nil
}

func parseLeafNode(r *reader, ln *LeafNode) *Error {
	in := r.s
	var err *Error
	if ln.EncryptionKey, err = r.opaque("leaf_node.encryption_key"); err != nil {
		return err
	}
	if ln.SignatureKey, err = r.opaque("leaf_node.signature_key"); err != nil {
		return err
	}
	if err = parseCredential(r, &ln.Credential); err != nil {
		return err
	}
	if err = parseCapabilities(r, &ln.Capabilities); err != nil {
		return err
	}
	at := r.pos()
	src, err := r.uint8("leaf_node.leaf_node_source")
	if err != nil {
		return err
	}
	ln.Source = LeafNodeSource(src)
	switch ln.Source {
	case SourceKeyPackage:
		if ln.Lifetime.NotBefore, err = r.uint64("leaf_node.lifetime.not_before"); err != nil {
			return err
		}
		if ln.Lifetime.NotAfter, err = r.uint64("leaf_node.lifetime.not_after"); err != nil {
			return err
		}
	case SourceUpdate:
	case SourceCommit:
		if ln.ParentHash, err = r.opaque("leaf_node.parent_hash"); err != nil {
			return err
		}
	default:
		// The rest of the LeafNode depends on the source, so parsing
		// cannot go on.
		return r.errorf(RuleLeafSource,
			"leaf_node_source at byte %d is %d, which is not defined; a KeyPackage needs 1 (key_package)", at, src)
	}
	if ln.Extensions, err = parseExtensions(r, "leaf_node.extensions"); err != nil {
		return err
	}
	n := len(in) - len(r.s)
	ln.TBS = in[:n:n]
	if ln.Signature, err = r.opaque("leaf_node.signature"); err != nil {
		return err
	}
	return nil
}

func parseCredential(r *reader, c *Credential) *Error {
	at := r.pos()
	var err *Error
	if c.Type, err = r.uint16("leaf_node.credential.credential_type"); err != nil {
		return err
	}
	switch c.Type {
	case CredentialBasic:
		c.Identity, err = r.opaque("leaf_node.credential.identity")
		return err
	case CredentialX509:
		certs, err := r.vector("leaf_node.credential.certificates")
		if err != nil {
			return err
		}
		for !certs.empty() {
			cert, err := certs.opaque("leaf_node.credential.certificates[]")
			if err != nil {
				return err
			}
			c.Certificates = append(c.Certificates, cert)
		}
		return nil
	default:
		return r.errorf(RuleMalformed,
			"credential_type at byte %d is 0x%04X; only basic (1) and x509 (2) can be parsed", at, c.Type)
	}
}

func parseCapabilities(r *reader, c *Capabilities) *Error {
	lists := []struct {
		name string
		dst  *[]uint16
	}{
		{"leaf_node.capabilities.versions", &c.Versions},
		{"leaf_node.capabilities.cipher_suites", &c.CipherSuites},
		{"leaf_node.capabilities.extensions", &c.Extensions},
		{"leaf_node.capabilities.proposals", &c.Proposals},
		{"leaf_node.capabilities.credentials", &c.Credentials},
	}
	for _, l := range lists {
		v, err := r.opaque(l.name)
		if err != nil {
			return err
		}
		if len(v)%2 != 0 {
			return r.errorf(RuleMalformed,
				"%s ending at byte %d has odd length %d; it is a list of uint16", l.name, r.pos(), len(v))
		}
		if len(v) == 0 {
			continue
		}
		out := make([]uint16, len(v)/2)
		for i := range out {
			out[i] = uint16(v[2*i])<<8 | uint16(v[2*i+1])
		}
		*l.dst = out
	}
	return nil
}

func parseExtensions(r *reader, what string) ([]Extension, *Error) {
	v, err := r.vector(what)
	if err != nil {
		return nil, err
	}
	var exts []Extension
	for !v.empty() {
		var e Extension
		if e.Type, err = v.uint16(what + "[].extension_type"); err != nil {
			return nil, err
		}
		if e.Data, err = v.opaque(what + "[].extension_data"); err != nil {
			return nil, err
		}
		exts = append(exts, e)
	}
	return exts, nil
}
