package mls

import (
	"golang.org/x/crypto/cryptobyte"
)

// maxVarint is the largest value an RFC 9420 variable-length integer holds.
const maxVarint = 1<<30 - 1

// appendVarint appends the minimal RFC 9420 §2.1.2 encoding of n, which must
// be at most maxVarint.
func appendVarint(b []byte, n int) []byte {
	switch {
	case n < 1<<6:
		return append(b, byte(n))
	case n < 1<<14:
		return append(b, 0x40|byte(n>>8), byte(n))
	default:
		return append(b, 0x80|byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
}

// appendOpaque appends v as an opaque<V> vector.
func appendOpaque(b, v []byte) []byte {
	return append(appendVarint(b, len(v)), v...)
}

// A reader decodes TLS presentation language values from a suffix of the
// input. It knows the absolute offset of its end in the whole input, so
// errors can name the byte at which they occurred.
type reader struct {
	s   cryptobyte.String
	end int // offset, in the whole input, of the byte after s
}

// pos returns the offset, in the whole input, of the next unread byte.
func (r *reader) pos() int { return r.end - len(r.s) }

func (r *reader) empty() bool { return len(r.s) == 0 }

// errorf returns an *Error that remembers how far parsing got, so Parse
// can report the more relevant of its bare and wrapped attempts.
func (r *reader) errorf(rule Rule, format string, args ...any) *Error {
	e := newError(rule, format, args...)
	e.offset = r.pos()
	return e
}

func (r *reader) truncated(what string) *Error {
	return r.errorf(RuleMalformed, "input ends inside %s at byte %d", what, r.pos())
}

func (r *reader) uint8(what string) (uint8, *Error) {
	var v uint8
	if !r.s.ReadUint8(&v) {
		return 0, r.truncated(what)
	}
	return v, nil
}

func (r *reader) uint16(what string) (uint16, *Error) {
	var v uint16
	if !r.s.ReadUint16(&v) {
		return 0, r.truncated(what)
	}
	return v, nil
}

func (r *reader) uint64(what string) (uint64, *Error) {
	var v uint64
	if !r.s.ReadUint64(&v) {
		return 0, r.truncated(what)
	}
	return v, nil
}

// varint reads an RFC 9420 §2.1.2 variable-length integer. It rejects the
// reserved 0b11 prefix and any encoding longer than necessary.
func (r *reader) varint(what string) (int, *Error) {
	start := r.pos()
	var b0 uint8
	if !r.s.ReadUint8(&b0) {
		return 0, r.truncated("the length of " + what)
	}
	switch b0 >> 6 {
	case 0:
		return int(b0), nil
	case 1:
		var b1 uint8
		if !r.s.ReadUint8(&b1) {
			return 0, r.truncated("the length of " + what)
		}
		v := int(b0&0x3f)<<8 | int(b1)
		if v < 1<<6 {
			return 0, r.errorf(RuleNonMinimalLength,
				"length of %s at byte %d is %d in a 2-byte encoding; values below 64 must use 1 byte", what, start, v)
		}
		return v, nil
	case 2:
		var rest uint32
		if !r.s.ReadUint24(&rest) {
			return 0, r.truncated("the length of " + what)
		}
		v := int(b0&0x3f)<<24 | int(rest)
		if v < 1<<14 {
			return 0, r.errorf(RuleNonMinimalLength,
				"length of %s at byte %d is %d in a 4-byte encoding; values below 16384 must use 1 or 2 bytes", what, start, v)
		}
		return v, nil
	default:
		return 0, r.errorf(RuleMalformed,
			"length of %s at byte %d starts with 0x%02x: the varint prefix 0b11 is reserved", what, start, b0)
	}
}

// opaque reads an opaque<V> vector and returns its contents as a sub-slice
// of the input whose capacity ends with the vector.
func (r *reader) opaque(what string) ([]byte, *Error) {
	n, err := r.varint(what)
	if err != nil {
		return nil, err
	}
	if n > len(r.s) {
		return nil, r.errorf(RuleMalformed,
			"%s at byte %d has length %d but only %d bytes remain", what, r.pos(), n, len(r.s))
	}
	v := r.s[:n:n]
	r.s = r.s[n:]
	return v, nil
}

// vector reads a <V> vector and returns a reader over its contents.
func (r *reader) vector(what string) (reader, *Error) {
	v, err := r.opaque(what)
	if err != nil {
		return reader{}, err
	}
	return reader{s: v, end: r.pos()}, nil
}
