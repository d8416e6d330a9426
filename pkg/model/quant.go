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

// Q8_0 stores values in blocks of Q8Block: a float16 scale d followed by
// Q8Block signed bytes q, each value being d·q (the layout of ggml's
// block_q8_0, so that the bytes mean the same in both engines).
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

// AppendQ8_0 appends src (a multiple of Q8Block values) as q8_0 blocks:
// per block, d = max|x|/127 rounded to half precision and q = round(x/d).
func AppendQ8_0(dst []byte, src []float32) ([]byte, error) {
	if len(src)%Q8Block != 0 {
		return dst, fmt.Errorf("q8_0 needs a multiple of %d values, have %d", Q8Block, len(src))
	}
	for b := 0; b < len(src); b += Q8Block {
		blk := src[b : b+Q8Block]
		var amax float32
		for _, v := range blk {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		d := amax / 127
		dh := F16FromF32(d)
		// Quantize with the scale as stored, so that d·q is what a reader sees.
		id := float32(0)
		if ds := F32FromF16(dh); ds != 0 {
			id = 1 / ds
		}
		dst = binary.LittleEndian.AppendUint16(dst, dh)
		for _, v := range blk {
			q := math.Round(float64(v * id))
			q = max(-127, min(127, q))
			dst = append(dst, byte(int8(q)))
		}
	}
	return dst, nil
}

// DequantizeQ8_0 writes the values of q8_0 blocks src into dst.
func DequantizeQ8_0(dst []float32, src []byte) {
	for b := 0; b*Q8BlockBytes < len(src) && b*Q8Block < len(dst); b++ {
		blk := src[b*Q8BlockBytes:]
		d := F32FromF16(binary.LittleEndian.Uint16(blk))
		out := dst[b*Q8Block : b*Q8Block+Q8Block]
		for i := range out {
			out[i] = d * float32(int8(blk[2+i]))
		}
	}
}
