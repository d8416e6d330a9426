// AVX2, FMA and F16C kernels for the forward pass. Each has a portable Go
// twin in kernels.go; callers handle the tails these leave (n not a
// multiple of 8).

#include "textflag.h"

// HSUM reduces the eight floats of Y into the low lane of X (Y's low half),
// using T as scratch.
#define HSUM(Y, X, T) \
	VEXTRACTF128 $1, Y, T; \
	VADDPS T, X, X; \
	VHADDPS X, X, X; \
	VHADDPS X, X, X

// func dotF32AVX2(a, b *float32, n int) float32
TEXT ·dotF32AVX2(SB), NOSPLIT, $0-28
	MOVQ a+0(FP), SI
	MOVQ b+8(FP), DI
	MOVQ n+16(FP), CX
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3

dot32:
	CMPQ CX, $32
	JL   dot8
	VMOVUPS (SI), Y4
	VMOVUPS 32(SI), Y5
	VMOVUPS 64(SI), Y6
	VMOVUPS 96(SI), Y7
	VFMADD231PS (DI), Y4, Y0
	VFMADD231PS 32(DI), Y5, Y1
	VFMADD231PS 64(DI), Y6, Y2
	VFMADD231PS 96(DI), Y7, Y3
	ADDQ $128, SI
	ADDQ $128, DI
	SUBQ $32, CX
	JMP  dot32

dot8:
	CMPQ CX, $8
	JL   dotdone
	VMOVUPS (SI), Y4
	VFMADD231PS (DI), Y4, Y0
	ADDQ $32, SI
	ADDQ $32, DI
	SUBQ $8, CX
	JMP  dot8

dotdone:
	VADDPS Y1, Y0, Y0
	VADDPS Y3, Y2, Y2
	VADDPS Y2, Y0, Y0
	HSUM(Y0, X0, X1)
	VZEROUPPER
	MOVSS X0, ret+24(FP)
	RET

// func axpyF32AVX2(a float32, x, y *float32, n int)
TEXT ·axpyF32AVX2(SB), NOSPLIT, $0-32
	VBROADCASTSS a+0(FP), Y0
	MOVQ x+8(FP), SI
	MOVQ y+16(FP), DI
	MOVQ n+24(FP), CX

axpy32:
	CMPQ CX, $32
	JL   axpy8
	VMOVUPS (DI), Y1
	VMOVUPS 32(DI), Y2
	VMOVUPS 64(DI), Y3
	VMOVUPS 96(DI), Y4
	VFMADD231PS (SI), Y0, Y1
	VFMADD231PS 32(SI), Y0, Y2
	VFMADD231PS 64(SI), Y0, Y3
	VFMADD231PS 96(SI), Y0, Y4
	VMOVUPS Y1, (DI)
	VMOVUPS Y2, 32(DI)
	VMOVUPS Y3, 64(DI)
	VMOVUPS Y4, 96(DI)
	ADDQ $128, SI
	ADDQ $128, DI
	SUBQ $32, CX
	JMP  axpy32

axpy8:
	CMPQ CX, $8
	JL   axpydone
	VMOVUPS (DI), Y1
	VFMADD231PS (SI), Y0, Y1
	VMOVUPS Y1, (DI)
	ADDQ $32, SI
	ADDQ $32, DI
	SUBQ $8, CX
	JMP  axpy8

axpydone:
	VZEROUPPER
	RET

// func gemm4x3F32AVX2(x *float32, ldx int, w *float32, ldw int, k int, out *float32, ldo int)
//
// Twelve accumulators (4 rows of x by 3 rows of w) stay in Y0..Y11; each
// step loads 3 weight vectors once and 4 input vectors once for 12 FMAs.
TEXT ·gemm4x3F32AVX2(SB), NOSPLIT, $0-56
	MOVQ x+0(FP), SI
	MOVQ ldx+8(FP), R8
	SHLQ $2, R8
	LEAQ (R8)(R8*2), R9
	MOVQ w+16(FP), DI
	MOVQ ldw+24(FP), R10
	SHLQ $2, R10
	MOVQ k+32(FP), CX
	SHRQ $3, CX
	MOVQ out+40(FP), DX
	MOVQ ldo+48(FP), R11
	SHLQ $2, R11
	LEAQ (R11)(R11*2), R12
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	VXORPS Y8, Y8, Y8
	VXORPS Y9, Y9, Y9
	VXORPS Y10, Y10, Y10
	VXORPS Y11, Y11, Y11
	TESTQ CX, CX
	JZ    gemmstore

gemmloop:
	VMOVUPS (DI), Y12
	VMOVUPS (DI)(R10*1), Y13
	VMOVUPS (DI)(R10*2), Y14
	VMOVUPS (SI), Y15
	VFMADD231PS Y12, Y15, Y0
	VFMADD231PS Y13, Y15, Y1
	VFMADD231PS Y14, Y15, Y2
	VMOVUPS (SI)(R8*1), Y15
	VFMADD231PS Y12, Y15, Y3
	VFMADD231PS Y13, Y15, Y4
	VFMADD231PS Y14, Y15, Y5
	VMOVUPS (SI)(R8*2), Y15
	VFMADD231PS Y12, Y15, Y6
	VFMADD231PS Y13, Y15, Y7
	VFMADD231PS Y14, Y15, Y8
	VMOVUPS (SI)(R9*1), Y15
	VFMADD231PS Y12, Y15, Y9
	VFMADD231PS Y13, Y15, Y10
	VFMADD231PS Y14, Y15, Y11
	ADDQ $32, SI
	ADDQ $32, DI
	DECQ CX
	JNZ  gemmloop

gemmstore:
	HSUM(Y0, X0, X15)
	HSUM(Y1, X1, X15)
	HSUM(Y2, X2, X15)
	MOVSS X0, (DX)
	MOVSS X1, 4(DX)
	MOVSS X2, 8(DX)
	HSUM(Y3, X3, X15)
	HSUM(Y4, X4, X15)
	HSUM(Y5, X5, X15)
	MOVSS X3, (DX)(R11*1)
	MOVSS X4, 4(DX)(R11*1)
	MOVSS X5, 8(DX)(R11*1)
	HSUM(Y6, X6, X15)
	HSUM(Y7, X7, X15)
	HSUM(Y8, X8, X15)
	MOVSS X6, (DX)(R11*2)
	MOVSS X7, 4(DX)(R11*2)
	MOVSS X8, 8(DX)(R11*2)
	HSUM(Y9, X9, X15)
	HSUM(Y10, X10, X15)
	HSUM(Y11, X11, X15)
	MOVSS X9, (DX)(R12*1)
	MOVSS X10, 4(DX)(R12*1)
	MOVSS X11, 8(DX)(R12*1)
	VZEROUPPER
	RET

// func dotF16AVX2(w *uint16, x *float32, n int) float32
TEXT ·dotF16AVX2(SB), NOSPLIT, $0-28
	MOVQ w+0(FP), SI
	MOVQ x+8(FP), DI
	MOVQ n+16(FP), CX
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3

f16dot32:
	CMPQ CX, $32
	JL   f16dot8
	VCVTPH2PS (SI), Y4
	VCVTPH2PS 16(SI), Y5
	VCVTPH2PS 32(SI), Y6
	VCVTPH2PS 48(SI), Y7
	VFMADD231PS (DI), Y4, Y0
	VFMADD231PS 32(DI), Y5, Y1
	VFMADD231PS 64(DI), Y6, Y2
	VFMADD231PS 96(DI), Y7, Y3
	ADDQ $64, SI
	ADDQ $128, DI
	SUBQ $32, CX
	JMP  f16dot32

f16dot8:
	CMPQ CX, $8
	JL   f16dotdone
	VCVTPH2PS (SI), Y4
	VFMADD231PS (DI), Y4, Y0
	ADDQ $16, SI
	ADDQ $32, DI
	SUBQ $8, CX
	JMP  f16dot8

f16dotdone:
	VADDPS Y1, Y0, Y0
	VADDPS Y3, Y2, Y2
	VADDPS Y2, Y0, Y0
	HSUM(Y0, X0, X1)
	VZEROUPPER
	MOVSS X0, ret+24(FP)
	RET

// Q8PAIR multiplies the 32 weights at off(SI) with the 32 activations at
// off(DI) into eight int32 partial sums in R. The sign trick makes the
// bytes fit VPMADDUBSW (unsigned × signed): |x| (at off(R8), computed
// once per input) times w carrying x's sign. Pair sums stay below 2·127²,
// inside int16. Y15 holds int16 ones.
#define Q8PAIR(off, R) \
	VMOVDQU off(SI), Y5; \
	VPSIGNB off(DI), Y5, Y5; \
	VMOVDQU off(R8), Y6; \
	VPMADDUBSW Y5, Y6, R; \
	VPMADDWD Y15, R, R

// func dotQ8AVX2(wq *int8, ws *uint16, xq *int8, xa *int8, xd *float32, ng int) float32
//
// Eight blocks per step: their partial sums are reduced with a tree of
// horizontal adds into one vector of eight block dots, which is converted
// and scaled by the eight weight scales (one F16C conversion) times the
// eight activation scales.
TEXT ·dotQ8AVX2(SB), NOSPLIT, $0-52
	MOVQ wq+0(FP), SI
	MOVQ ws+8(FP), BX
	MOVQ xq+16(FP), DI
	MOVQ xa+24(FP), R8
	MOVQ xd+32(FP), DX
	MOVQ ng+40(FP), CX
	VXORPS Y0, Y0, Y0
	VPCMPEQW Y15, Y15, Y15
	VPSRLW $15, Y15, Y15
	TESTQ CX, CX
	JZ    q8done

q8loop:
	Q8PAIR(0, Y1)
	Q8PAIR(32, Y2)
	VPHADDD Y2, Y1, Y1
	Q8PAIR(64, Y2)
	Q8PAIR(96, Y3)
	VPHADDD Y3, Y2, Y2
	VPHADDD Y2, Y1, Y1
	Q8PAIR(128, Y2)
	Q8PAIR(160, Y3)
	VPHADDD Y3, Y2, Y2
	Q8PAIR(192, Y3)
	Q8PAIR(224, Y4)
	VPHADDD Y4, Y3, Y3
	VPHADDD Y3, Y2, Y2
	VPERM2I128 $0x20, Y2, Y1, Y3
	VPERM2I128 $0x31, Y2, Y1, Y4
	VPADDD Y4, Y3, Y3
	VCVTDQ2PS Y3, Y3
	VCVTPH2PS (BX), Y4
	VMULPS (DX), Y4, Y4
	VFMADD231PS Y3, Y4, Y0
	ADDQ $256, SI
	ADDQ $256, DI
	ADDQ $256, R8
	ADDQ $16, BX
	ADDQ $32, DX
	DECQ CX
	JNZ  q8loop

q8done:
	HSUM(Y0, X0, X1)
	VZEROUPPER
	MOVSS X0, ret+48(FP)
	RET

// func f16ToF32AVX2(dst *float32, src *uint16, n int)
TEXT ·f16ToF32AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $3, CX
	JZ   f16done

f16loop:
	VCVTPH2PS (SI), Y0
	VMOVUPS Y0, (DI)
	ADDQ $16, SI
	ADDQ $32, DI
	DECQ CX
	JNZ  f16loop

f16done:
	VZEROUPPER
	RET

// func dequantQ8AVX2(dst *float32, q *int8, sc *uint16, nb int)
TEXT ·dequantQ8AVX2(SB), NOSPLIT, $0-32
	MOVQ dst+0(FP), DI
	MOVQ q+8(FP), SI
	MOVQ sc+16(FP), BX
	MOVQ nb+24(FP), CX
	TESTQ CX, CX
	JZ    dqdone

dqloop:
	VPBROADCASTW (BX), X0
	VCVTPH2PS X0, Y0
	VPMOVSXBD (SI), Y1
	VPMOVSXBD 8(SI), Y2
	VPMOVSXBD 16(SI), Y3
	VPMOVSXBD 24(SI), Y4
	VCVTDQ2PS Y1, Y1
	VCVTDQ2PS Y2, Y2
	VCVTDQ2PS Y3, Y3
	VCVTDQ2PS Y4, Y4
	VMULPS Y0, Y1, Y1
	VMULPS Y0, Y2, Y2
	VMULPS Y0, Y3, Y3
	VMULPS Y0, Y4, Y4
	VMOVUPS Y1, (DI)
	VMOVUPS Y2, 32(DI)
	VMOVUPS Y3, 64(DI)
	VMOVUPS Y4, 96(DI)
	ADDQ $32, SI
	ADDQ $2, BX
	ADDQ $128, DI
	DECQ CX
	JNZ  dqloop

dqdone:
	VZEROUPPER
	RET

// func attnOut4AVX2(o *float32, ldo int, p *float32, ldp int, v *float32, n int, hs int)
//
// o[i][c] = Σ_t p[i][t]·v[t][c] for 4 rows i and hs columns c (hs a
// multiple of 16; v rows hs apart): 16 columns at a time, each value of v
// loaded once for the 4 rows.
TEXT ·attnOut4AVX2(SB), NOSPLIT, $0-56
	MOVQ o+0(FP), DX
	MOVQ ldo+8(FP), R11
	SHLQ $2, R11
	LEAQ (R11)(R11*2), R12
	MOVQ p+16(FP), R8
	MOVQ ldp+24(FP), R9
	SHLQ $2, R9
	LEAQ (R9)(R9*2), R10
	MOVQ v+32(FP), R13
	MOVQ n+40(FP), R14
	MOVQ hs+48(FP), R15
	SHLQ $2, R15
	XORQ AX, AX // column offset in bytes

aocol:
	CMPQ AX, R15
	JGE  aodone
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	LEAQ (R13)(AX*1), SI // v + column
	MOVQ R8, DI          // p
	MOVQ R14, CX
	TESTQ CX, CX
	JZ    aostore

aot:
	VMOVUPS (SI), Y8
	VMOVUPS 32(SI), Y9
	VBROADCASTSS (DI), Y10
	VFMADD231PS Y8, Y10, Y0
	VFMADD231PS Y9, Y10, Y1
	VBROADCASTSS (DI)(R9*1), Y11
	VFMADD231PS Y8, Y11, Y2
	VFMADD231PS Y9, Y11, Y3
	VBROADCASTSS (DI)(R9*2), Y12
	VFMADD231PS Y8, Y12, Y4
	VFMADD231PS Y9, Y12, Y5
	VBROADCASTSS (DI)(R10*1), Y13
	VFMADD231PS Y8, Y13, Y6
	VFMADD231PS Y9, Y13, Y7
	ADDQ R15, SI
	ADDQ $4, DI
	DECQ CX
	JNZ  aot

aostore:
	LEAQ (DX)(AX*1), BX
	VMOVUPS Y0, (BX)
	VMOVUPS Y1, 32(BX)
	VMOVUPS Y2, (BX)(R11*1)
	VMOVUPS Y3, 32(BX)(R11*1)
	VMOVUPS Y4, (BX)(R11*2)
	VMOVUPS Y5, 32(BX)(R11*2)
	VMOVUPS Y6, (BX)(R12*1)
	VMOVUPS Y7, 32(BX)(R12*1)
	ADDQ $64, AX
	JMP  aocol

aodone:
	VZEROUPPER
	RET

// Constants of expAVX2 (Cephes' expf): clamp bounds, log2(e), ln2 split
// in two, and the polynomial for e^r on [-ln2/2, ln2/2].
DATA expc<>+0(SB)/4, $0xc2aeac4f  // -87.33654
DATA expc<>+4(SB)/4, $0x3fb8aa3b  // log2(e)
DATA expc<>+8(SB)/4, $0x3f318000  // 0.693359375
DATA expc<>+12(SB)/4, $0xb95e8083 // -2.12194440e-4
DATA expc<>+16(SB)/4, $0x39506967 // 1.9875691500e-4
DATA expc<>+20(SB)/4, $0x3ab743ce // 1.3981999507e-3
DATA expc<>+24(SB)/4, $0x3c088908 // 8.3334519073e-3
DATA expc<>+28(SB)/4, $0x3d2aa9c1 // 4.1665795894e-2
DATA expc<>+32(SB)/4, $0x3e2aaaaa // 1.6666665459e-1
DATA expc<>+36(SB)/4, $0x3f000000 // 5.0000001201e-1
DATA expc<>+40(SB)/4, $0x3f800000 // 1
DATA expc<>+44(SB)/4, $0x0000007f // 127
DATA expc<>+48(SB)/4, $0x42b0c0a5 // 88.3762626647949
GLOBL expc<>(SB), RODATA|NOPTR, $52

// EXP sets Y2 = e^Y0 (Y0 clamped by the caller), using Y1, Y3 and Y4;
// Y9..Y13 hold 127, 1, -C2, C1 and log2(e) (expc). Y0 = r = x - n·ln2 on
// [-ln2/2, ln2/2], e^r by Cephes' polynomial, times 2^n built in the
// exponent bits.
#define EXP \
	VMULPS Y13, Y0, Y1; \
	VROUNDPS $0, Y1, Y1; \
	VFNMADD231PS Y12, Y1, Y0; \
	VFNMADD231PS Y11, Y1, Y0; \
	VBROADCASTSS expc<>+16(SB), Y2; \
	VBROADCASTSS expc<>+20(SB), Y3; \
	VFMADD213PS Y3, Y0, Y2; \
	VBROADCASTSS expc<>+24(SB), Y3; \
	VFMADD213PS Y3, Y0, Y2; \
	VBROADCASTSS expc<>+28(SB), Y3; \
	VFMADD213PS Y3, Y0, Y2; \
	VBROADCASTSS expc<>+32(SB), Y3; \
	VFMADD213PS Y3, Y0, Y2; \
	VBROADCASTSS expc<>+36(SB), Y3; \
	VFMADD213PS Y3, Y0, Y2; \
	VMULPS Y0, Y0, Y4; \
	VFMADD213PS Y0, Y4, Y2; \
	VADDPS Y10, Y2, Y2; \
	VCVTPS2DQ Y1, Y1; \
	VPADDD Y9, Y1, Y1; \
	VPSLLD $23, Y1, Y1; \
	VMULPS Y1, Y2, Y2

// func expSumAVX2(x *float32, n int, m float32) float32
//
// x[i] = e^(x[i]-m) for n values (a multiple of 8); returns their sum.
// Relative error about 2e-7 (Cephes' single-precision exp); arguments
// below -87.3 give e^-87.3 instead of a denormal.
TEXT ·expSumAVX2(SB), NOSPLIT, $0-28
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	VBROADCASTSS m+16(FP), Y15
	VBROADCASTSS expc<>+0(SB), Y14
	VBROADCASTSS expc<>+4(SB), Y13
	VBROADCASTSS expc<>+8(SB), Y12
	VBROADCASTSS expc<>+12(SB), Y11
	VBROADCASTSS expc<>+40(SB), Y10
	VPBROADCASTD expc<>+44(SB), Y9
	VXORPS Y8, Y8, Y8 // sum
	SHRQ $3, CX
	JZ   expdone

exploop:
	VMOVUPS (SI), Y0
	VSUBPS Y15, Y0, Y0
	VMAXPS Y14, Y0, Y0
	EXP
	VMOVUPS Y2, (SI)
	VADDPS Y2, Y8, Y8
	ADDQ $32, SI
	DECQ CX
	JNZ  exploop

expdone:
	HSUM(Y8, X8, X0)
	VZEROUPPER
	MOVSS X8, ret+24(FP)
	RET

// func maxF32AVX2(x *float32, n int) float32 (n a positive multiple of 8)
TEXT ·maxF32AVX2(SB), NOSPLIT, $0-20
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	SHRQ $3, CX
	VMOVUPS (SI), Y0
	ADDQ $32, SI
	DECQ CX
	JZ   maxdone

maxloop:
	VMAXPS (SI), Y0, Y0
	ADDQ $32, SI
	DECQ CX
	JNZ  maxloop

maxdone:
	VEXTRACTF128 $1, Y0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0x4e, X0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0xb1, X0, X1
	VMAXPS X1, X0, X0
	VZEROUPPER
	MOVSS X0, ret+16(FP)
	RET

// func swigluAVX2(gate, up *float32, n int)
//
// g[i] = silu(g[i])·u[i] = g[i]·u[i]/(1+e^-g[i]) for n values (a multiple
// of 8), with expSumAVX2's exponential.
TEXT ·swigluAVX2(SB), NOSPLIT, $0-24
	MOVQ gate+0(FP), DI
	MOVQ up+8(FP), SI
	MOVQ n+16(FP), CX
	VBROADCASTSS expc<>+0(SB), Y14
	VBROADCASTSS expc<>+4(SB), Y13
	VBROADCASTSS expc<>+8(SB), Y12
	VBROADCASTSS expc<>+12(SB), Y11
	VBROADCASTSS expc<>+40(SB), Y10
	VPBROADCASTD expc<>+44(SB), Y9
	VBROADCASTSS expc<>+48(SB), Y8
	VXORPS Y7, Y7, Y7
	SHRQ $3, CX
	JZ   swidone

swiloop:
	VMOVUPS (DI), Y6
	VSUBPS Y6, Y7, Y0 // -g
	VMAXPS Y14, Y0, Y0
	VMINPS Y8, Y0, Y0
	EXP // e^-g
	VADDPS Y10, Y2, Y2 // 1 + e^-g
	VMULPS (SI), Y6, Y6
	VDIVPS Y2, Y6, Y6
	VMOVUPS Y6, (DI)
	ADDQ $32, DI
	ADDQ $32, SI
	DECQ CX
	JNZ  swiloop

swidone:
	VZEROUPPER
	RET
