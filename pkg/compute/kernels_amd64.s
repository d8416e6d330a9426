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

// Q8BLOCK multiplies one q8_0 weight block at off(SI) by the activation
// block at off2(DI) with scale at off3(DX) and accumulates into ACC: the
// sign trick makes the weights unsigned (|w|) and moves their signs onto
// x, so that VPMADDUBSW (unsigned × signed bytes) can form the products.
// Y15 holds int16 ones.
#define Q8BLOCK(off, off2, off3, ACC) \
	MOVWLZX off(SI), AX; \
	VMOVD AX, X4; \
	VCVTPH2PS X4, X4; \
	VMULSS off3(DX), X4, X4; \
	VBROADCASTSS X4, Y4; \
	VMOVDQU off+2(SI), Y5; \
	VMOVDQU off2(DI), Y6; \
	VPSIGNB Y5, Y6, Y6; \
	VPABSB Y5, Y5; \
	VPMADDUBSW Y6, Y5, Y5; \
	VPMADDWD Y15, Y5, Y5; \
	VCVTDQ2PS Y5, Y5; \
	VFMADD231PS Y5, Y4, ACC

// func dotQ8AVX2(w *byte, xq *int8, xd *float32, nb int) float32
TEXT ·dotQ8AVX2(SB), NOSPLIT, $0-36
	MOVQ w+0(FP), SI
	MOVQ xq+8(FP), DI
	MOVQ xd+16(FP), DX
	MOVQ nb+24(FP), CX
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VPCMPEQW Y15, Y15, Y15
	VPSRLW $15, Y15, Y15

q8dot2:
	CMPQ CX, $2
	JL   q8dot1
	Q8BLOCK(0, 0, 0, Y0)
	Q8BLOCK(34, 32, 4, Y1)
	ADDQ $68, SI
	ADDQ $64, DI
	ADDQ $8, DX
	SUBQ $2, CX
	JMP  q8dot2

q8dot1:
	TESTQ CX, CX
	JZ    q8dotdone
	Q8BLOCK(0, 0, 0, Y0)

q8dotdone:
	VADDPS Y1, Y0, Y0
	HSUM(Y0, X0, X1)
	VZEROUPPER
	MOVSS X0, ret+32(FP)
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

// func dequantQ8AVX2(dst *float32, src *byte, nb int)
TEXT ·dequantQ8AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ nb+16(FP), CX
	TESTQ CX, CX
	JZ    dqdone

dqloop:
	MOVWLZX (SI), AX
	VMOVD AX, X0
	VCVTPH2PS X0, X0
	VBROADCASTSS X0, Y0
	VPMOVSXBD 2(SI), Y1
	VPMOVSXBD 10(SI), Y2
	VPMOVSXBD 18(SI), Y3
	VPMOVSXBD 26(SI), Y4
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
	ADDQ $34, SI
	ADDQ $128, DI
	DECQ CX
	JNZ  dqloop

dqdone:
	VZEROUPPER
	RET
