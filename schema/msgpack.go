package schema

import (
	"errors"
	"fmt"
	"math"
)

// The msgpack primitives of the wire format: the writers the encoder uses and the bounds-checked
// reader the decoder uses, side by side.

// Hand-written append-style msgpack writers: no reflection and no allocation beyond growing dst. Every
// integer takes its smallest encoding (non-negative values use the unsigned forms), so output is
// deterministic and golden vectors can be compared byte for byte.

func appendUint(b []byte, v uint64) []byte {
	switch {
	case v <= 0x7f:
		return append(b, byte(v))
	case v <= 0xff:
		return append(b, 0xcc, byte(v))
	case v <= 0xffff:
		return append(b, 0xcd, byte(v>>8), byte(v))
	case v <= 0xffffffff:
		return append(b, 0xce, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return append(b, 0xcf, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32),
		byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

func appendInt(b []byte, v int64) []byte {
	switch {
	case v >= 0:
		return appendUint(b, uint64(v))
	case v >= -32:
		return append(b, byte(v))
	case v >= -128:
		return append(b, 0xd0, byte(v))
	case v >= -32768:
		return append(b, 0xd1, byte(v>>8), byte(v))
	case v >= -1<<31:
		return append(b, 0xd2, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return append(b, 0xd3, byte(v>>56), byte(v>>48), byte(v>>40), byte(v>>32),
		byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

func appendStrHeader(b []byte, n int) []byte {
	switch {
	case n <= 31:
		return append(b, 0xa0|byte(n))
	case n <= 0xff:
		return append(b, 0xd9, byte(n))
	case n <= 0xffff:
		return append(b, 0xda, byte(n>>8), byte(n))
	}
	return append(b, 0xdb, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

func appendStr(b []byte, s string) []byte {
	return append(appendStrHeader(b, len(s)), s...)
}

func appendArrayHeader(b []byte, n int) []byte {
	switch {
	case n <= 15:
		return append(b, 0x90|byte(n))
	case n <= 0xffff:
		return append(b, 0xdc, byte(n>>8), byte(n))
	}
	return append(b, 0xdd, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

func appendMapHeader(b []byte, n int) []byte {
	switch {
	case n <= 15:
		return append(b, 0x80|byte(n))
	case n <= 0xffff:
		return append(b, 0xde, byte(n>>8), byte(n))
	}
	return append(b, 0xdf, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

const mpNil = 0xc0

// Maximum encoded sizes, for Size's upper bound.
const (
	maxUintLen   = 9
	maxHeaderLen = 5 // str, array and map headers
)

// maxSkipDepth bounds the nesting of unknown values the decoder skips, so hostile input cannot exhaust
// the stack.
const maxSkipDepth = 32

// reader is a bounds-checked cursor over a msgpack message. Its methods return short descriptions of
// what was wrong; DecodeBatch wraps them with ErrMalformed and the location.
type reader struct {
	b []byte
	p int
}

var errTruncated = errors.New("truncated")

func (r *reader) rem() int { return len(r.b) - r.p }

func typeName(c byte) string {
	switch {
	case c <= 0x7f, c >= 0xe0, c >= 0xcc && c <= 0xd3:
		return "int"
	case c <= 0x8f, c == 0xde, c == 0xdf:
		return "map"
	case c <= 0x9f, c == 0xdc, c == 0xdd:
		return "array"
	case c <= 0xbf, c >= 0xd9 && c <= 0xdb:
		return "string"
	case c == 0xc0:
		return "nil"
	case c == 0xc2, c == 0xc3:
		return "bool"
	case c >= 0xc4 && c <= 0xc6:
		return "bin"
	case c == 0xca, c == 0xcb:
		return "float"
	case c == 0xc1:
		return "reserved byte 0xc1"
	}
	return "ext"
}

func (r *reader) typeErr(want string) error {
	if r.p >= len(r.b) {
		return errTruncated
	}
	return fmt.Errorf("expected %s, got %s (0x%02x) at offset %d", want, typeName(r.b[r.p]), r.b[r.p], r.p)
}

// be reads an n-byte big-endian unsigned value following the type byte.
func (r *reader) be(n int) (uint64, error) {
	if r.rem() < 1+n {
		return 0, errTruncated
	}
	var v uint64
	for _, c := range r.b[r.p+1 : r.p+1+n] {
		v = v<<8 | uint64(c)
	}
	r.p += 1 + n
	return v, nil
}

func (r *reader) isNil() bool { return r.p < len(r.b) && r.b[r.p] == mpNil }

// readInt reads any msgpack integer encoding whose value fits in int64.
func (r *reader) readInt() (int64, error) {
	if r.p >= len(r.b) {
		return 0, errTruncated
	}
	c := r.b[r.p]
	switch {
	case c <= 0x7f:
		r.p++
		return int64(c), nil
	case c >= 0xe0:
		r.p++
		return int64(int8(c)), nil
	case c >= 0xcc && c <= 0xcf:
		v, err := r.be(1 << (c - 0xcc))
		if err != nil {
			return 0, err
		}
		if v > math.MaxInt64 {
			return 0, fmt.Errorf("integer %d overflows int64 at offset %d", v, r.p)
		}
		return int64(v), nil
	case c >= 0xd0 && c <= 0xd3:
		n := 1 << (c - 0xd0)
		v, err := r.be(n)
		if err != nil {
			return 0, err
		}
		shift := 64 - 8*n // sign-extend
		return int64(v<<shift) >> shift, nil
	}
	return 0, r.typeErr("int")
}

// readUint reads any msgpack integer encoding whose value is non-negative and at most max.
func (r *reader) readUint(max uint64) (uint64, error) {
	if r.p >= len(r.b) {
		return 0, errTruncated
	}
	c := r.b[r.p]
	var v uint64
	switch {
	case c <= 0x7f:
		r.p++
		v = uint64(c)
	case c >= 0xcc && c <= 0xcf:
		var err error
		if v, err = r.be(1 << (c - 0xcc)); err != nil {
			return 0, err
		}
	case c >= 0xe0 || c >= 0xd0 && c <= 0xd3:
		s, err := r.readInt()
		if err != nil {
			return 0, err
		}
		if s < 0 {
			return 0, fmt.Errorf("negative value %d where an unsigned integer is required", s)
		}
		v = uint64(s)
	default:
		return 0, r.typeErr("unsigned int")
	}
	if v > max {
		return 0, fmt.Errorf("value %d out of range (max %d)", v, max)
	}
	return v, nil
}

// readStr returns the bytes of a string, aliasing the input.
func (r *reader) readStr() ([]byte, error) {
	if r.p >= len(r.b) {
		return nil, errTruncated
	}
	c := r.b[r.p]
	var n uint64
	switch {
	case c >= 0xa0 && c <= 0xbf:
		n = uint64(c & 0x1f)
		r.p++
	case c >= 0xd9 && c <= 0xdb:
		var err error
		if n, err = r.be(1 << (c - 0xd9)); err != nil {
			return nil, err
		}
	default:
		return nil, r.typeErr("string")
	}
	if n > uint64(r.rem()) {
		return nil, fmt.Errorf("string of %d bytes truncated (%d left)", n, r.rem())
	}
	s := r.b[r.p : r.p+int(n)]
	r.p += int(n)
	return s, nil
}

// readLen reads an array (isMap false) or map header. The count is checked against the bytes left
// (every element takes at least one byte, a map pair two), so loops over it are bounded by the input.
func (r *reader) readLen(isMap bool) (int, error) {
	if r.p >= len(r.b) {
		return 0, errTruncated
	}
	c := r.b[r.p]
	var n uint64
	fix, b16, b32, what, per := byte(0x90), byte(0xdc), byte(0xdd), "array", uint64(1)
	if isMap {
		fix, b16, b32, what, per = 0x80, 0xde, 0xdf, "map", 2
	}
	switch {
	case c&0xf0 == fix:
		n = uint64(c & 0x0f)
		r.p++
	case c == b16:
		var err error
		if n, err = r.be(2); err != nil {
			return 0, err
		}
	case c == b32:
		var err error
		if n, err = r.be(4); err != nil {
			return 0, err
		}
	default:
		return 0, r.typeErr(what)
	}
	if n*per > uint64(r.rem()) {
		return 0, fmt.Errorf("%s of %d elements cannot fit in the %d bytes left", what, n, r.rem())
	}
	return int(n), nil
}

func isStrByte(c byte) bool { return c >= 0xa0 && c <= 0xbf || c >= 0xd9 && c <= 0xdb }

// skip passes over one value of any type, nested at most maxSkipDepth deep. The string keys of the
// maps in it are bounded by MaxKeyLen, like every map key.
func (r *reader) skip(depth int) error { return r.skipValue(depth, true) }

// skipValue is skip; boundKeys false leaves the key bounds to a later, closer look at the value (the
// decoder's first pass over the values of known keys, which its second pass decodes).
func (r *reader) skipValue(depth int, boundKeys bool) error {
	if depth > maxSkipDepth {
		return fmt.Errorf("values nested deeper than %d at offset %d", maxSkipDepth, r.p)
	}
	if r.p >= len(r.b) {
		return errTruncated
	}
	c := r.b[r.p]
	var n uint64 // payload bytes after the header
	var err error
	switch {
	case c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3:
		r.p++
		return nil
	case c <= 0x8f || c == 0xde || c == 0xdf:
		m, err := r.readLen(true)
		if err != nil {
			return err
		}
		for i := 0; i < 2*m; i++ {
			if boundKeys && i%2 == 0 && r.p < len(r.b) && isStrByte(r.b[r.p]) {
				// A key of an unknown map is bounded like every map key.
				if _, err := readBounded(r, MaxKeyLen); err != nil {
					return fmt.Errorf("map key: %v", err)
				}
				continue
			}
			if err := r.skipValue(depth+1, boundKeys); err != nil {
				return err
			}
		}
		return nil
	case c <= 0x9f || c == 0xdc || c == 0xdd:
		m, err := r.readLen(false)
		if err != nil {
			return err
		}
		for i := 0; i < m; i++ {
			if err := r.skipValue(depth+1, boundKeys); err != nil {
				return err
			}
		}
		return nil
	case c <= 0xbf || c >= 0xd9 && c <= 0xdb:
		_, err := r.readStr()
		return err
	case c >= 0xc4 && c <= 0xc6: // bin 8/16/32
		n, err = r.be(1 << (c - 0xc4))
	case c >= 0xc7 && c <= 0xc9: // ext 8/16/32: length, then type byte
		n, err = r.be(1 << (c - 0xc7))
		n++
	case c == 0xca:
		n, r.p = 4, r.p+1
	case c == 0xcb:
		n, r.p = 8, r.p+1
	case c >= 0xcc && c <= 0xd3:
		n, r.p = 1<<((c-0xcc)&3), r.p+1
	case c >= 0xd4 && c <= 0xd8: // fixext 1..16 plus type byte
		n, r.p = 1+1<<(c-0xd4), r.p+1
	default: // 0xc1, never used
		return fmt.Errorf("invalid msgpack byte 0x%02x at offset %d", c, r.p)
	}
	if err != nil {
		return err
	}
	if n > uint64(r.rem()) {
		return errTruncated
	}
	r.p += int(n)
	return nil
}
