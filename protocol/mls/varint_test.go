package mls

import (
	"errors"
	"testing"
)

func TestVarint(t *testing.T) {
	tests := []struct {
		in   []byte
		want int
		rule Rule // "" for success
	}{
		// RFC 9420 §2.1.2 examples.
		{in: []byte{0x25}, want: 37},
		{in: []byte{0x7b, 0xbd}, want: 15293},
		{in: []byte{0x9d, 0x7f, 0x3e, 0x7d}, want: 494878333},
		// Boundaries.
		{in: []byte{0x00}, want: 0},
		{in: []byte{0x3f}, want: 63},
		{in: []byte{0x40, 0x40}, want: 64},
		{in: []byte{0x7f, 0xff}, want: 16383},
		{in: []byte{0x80, 0x00, 0x40, 0x00}, want: 16384},
		{in: []byte{0xbf, 0xff, 0xff, 0xff}, want: maxVarint},
		// Non-minimal encodings.
		{in: []byte{0x40, 0x00}, rule: RuleNonMinimalLength},
		{in: []byte{0x40, 0x3f}, rule: RuleNonMinimalLength},
		{in: []byte{0x80, 0x00, 0x00, 0x3f}, rule: RuleNonMinimalLength},
		{in: []byte{0x80, 0x00, 0x3f, 0xff}, rule: RuleNonMinimalLength},
		// Reserved prefix and truncation.
		{in: []byte{0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01}, rule: RuleMalformed},
		{in: []byte{0xff}, rule: RuleMalformed},
		{in: []byte{}, rule: RuleMalformed},
		{in: []byte{0x40}, rule: RuleMalformed},
		{in: []byte{0x80, 0x00, 0x40}, rule: RuleMalformed},
	}
	for _, tc := range tests {
		r := reader{s: tc.in, end: len(tc.in)}
		got, err := r.varint("test")
		if tc.rule != "" {
			if err == nil || err.Rule != tc.rule {
				t.Errorf("%x: got %d, %v; want rule %s", tc.in, got, err, tc.rule)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%x: got %d, %v; want %d", tc.in, got, err, tc.want)
			continue
		}
		if !r.empty() {
			t.Errorf("%x: %d bytes left", tc.in, len(r.s))
		}
		if enc := appendVarint(nil, tc.want); string(enc) != string(tc.in) {
			t.Errorf("appendVarint(%d) = %x, want %x", tc.want, enc, tc.in)
		}
	}
}

func TestOpaqueCapacity(t *testing.T) {
	in := []byte{0x02, 0xaa, 0xbb, 0xcc}
	r := reader{s: in, end: len(in)}
	v, err := r.opaque("test")
	if err != nil {
		t.Fatal(err)
	}
	if len(v) != 2 || cap(v) != 2 {
		t.Fatalf("len %d cap %d, want 2 and 2", len(v), cap(v))
	}
	_ = append(v, 0x00)
	if in[3] != 0xcc {
		t.Error("appending to a parsed field overwrote the input")
	}
	if _, err := r.opaque("test"); err == nil || !errors.Is(err, RuleMalformed) {
		t.Errorf("vector past the end: %v", err)
	}
}

func TestIsGREASE(t *testing.T) {
	n := 0
	for v := range 1 << 16 {
		if isGREASE(uint16(v)) {
			n++
			if v>>8 != v&0xff || v&0x0f != 0x0a {
				t.Errorf("%#04x is not of the form 0xXAXA", v)
			}
		}
	}
	if n != 15 || !isGREASE(0x0A0A) || !isGREASE(0xEAEA) || isGREASE(0xFAFA) {
		t.Errorf("%d GREASE values", n)
	}
}
