package model

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Weight storage types of fragment tensors, as manifests spell them.
const (
	DTypeF32  = "f32"
	DTypeF16  = "f16"
	DTypeQ8_0 = "q8_0"
)

// Q8_0 stores values in blocks of Q8Block that share one scale d, each
// value being d·q with q a signed byte. A q8_0 tensor of n values is laid
// out as its n bytes q (in value order) followed by its n/Q8Block scales as
// little-endian float16: the same size as ggml's block_q8_0 array, but
// with values and scales apart, so that kernels read 32-byte aligned
// values and convert eight scales with one instruction.
const (
	Q8Block      = 32
	Q8BlockBytes = 2 + Q8Block
)

// F16FromF32 rounds f to the nearest IEEE 754 half-precision value (ties
// to even), saturating to infinity beyond the half range.
func F16FromF32(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	man := b & 0x7fffff
	switch {
	case exp == 0xff: // Inf or NaN; keep NaN a NaN.
		if man != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp-127 > 15:
		return sign | 0x7c00
	case exp-127 >= -14: // normal half
		h := uint32(exp-127+15)<<10 | man>>13
		rest := man & 0x1fff
		if rest > 0x1000 || (rest == 0x1000 && h&1 == 1) {
			h++ // may carry into the exponent, correctly rounding up
		}
		return sign | uint16(h)
	case exp-127 >= -25: // subnormal half
		man |= 0x800000
		shift := uint32(-14-(exp-127)) + 13
		h := man >> shift
		rest := man & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rest > half || (rest == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	return sign
}

// F32FromF16 widens a half-precision value.
func F32FromF16(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp == 0:
		if man == 0 {
			return math.Float32frombits(sign)
		}
		// Subnormal: normalise.
		e := uint32(127 - 15 + 1)
		for man&0x400 == 0 {
			man <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (man&0x3ff)<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
}

// AppendF16 appends src as little-endian half-precision values.
func AppendF16(dst []byte, src []float32) []byte {
	for _, v := range src {
		dst = binary.LittleEndian.AppendUint16(dst, F16FromF32(v))
	}
	return dst
}

// AppendQ8_0 appends src (a multiple of Q8Block values) as a q8_0 tensor:
// per block, d = max|x|/127 rounded to half precision and q = round(x/d).
func AppendQ8_0(dst []byte, src []float32) ([]byte, error) {
	if len(src)%Q8Block != 0 {
		return dst, fmt.Errorf("q8_0 needs a multiple of %d values, have %d", Q8Block, len(src))
	}
	start := len(dst)
	dst = append(dst, make([]byte, len(src)/Q8Block*Q8BlockBytes)...)
	qs, ds := dst[start:start+len(src)], dst[start+len(src):]
	for b := 0; b < len(src); b += Q8Block {
		blk := src[b : b+Q8Block]
		var amax float32
		for _, v := range blk {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		dh := F16FromF32(amax / 127)
		// Quantize with the scale as stored, so that d·q is what a reader sees.
		id := float32(0)
		if d := F32FromF16(dh); d != 0 {
			id = 1 / d
		}
		binary.LittleEndian.PutUint16(ds[b/Q8Block*2:], dh)
		for i, v := range blk {
			q := math.Round(float64(v * id))
			qs[b+i] = byte(int8(max(-127, min(127, q))))
		}
	}
	return dst, nil
}

// DequantizeQ8_0 writes the values of the q8_0 tensor src into dst.
func DequantizeQ8_0(dst []float32, src []byte) {
	n := len(src) / Q8BlockBytes * Q8Block
	qs, ds := src[:n], src[n:]
	for i := range dst[:n] {
		dst[i] = F32FromF16(binary.LittleEndian.Uint16(ds[i/Q8Block*2:])) * float32(int8(qs[i]))
	}
}
