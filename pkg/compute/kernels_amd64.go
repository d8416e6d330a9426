package compute

// haveAsm is true: kernels_amd64.s provides AVX2/FMA/F16C kernels, used
// when the processor has those features.
const haveAsm = true

// dotF32AVX2 returns Σ a[i]·b[i] over n values (n a multiple of 8).
//
//go:noescape
func dotF32AVX2(a, b *float32, n int) float32

// axpyF32AVX2 adds a·x to y over n values (n a multiple of 8).
//
//go:noescape
func axpyF32AVX2(a float32, x, y *float32, n int)

// gemm4x3F32AVX2 writes out[r·ldo+j] = Σ_k x[r·ldx+k]·w[j·ldw+k] for r < 4,
// j < 3 (k a multiple of 8; strides in values).
//
//go:noescape
func gemm4x3F32AVX2(x *float32, ldx int, w *float32, ldw int, k int, out *float32, ldo int)

// dotF16AVX2 returns Σ f16(w[i])·x[i] over n values (n a multiple of 8).
//
//go:noescape
func dotF16AVX2(w *uint16, x *float32, n int) float32

// dotQ8AVX2 returns the dot product of ng groups of eight q8_0 blocks
// (values wq, half-precision scales ws) with activations quantized per
// block (values xq, their absolute values xa, scales xd).
//
//go:noescape
func dotQ8AVX2(wq *int8, ws *uint16, xq *int8, xa *int8, xd *float32, ng int) float32

// f16ToF32AVX2 widens n half-precision values (n a multiple of 8).
//
//go:noescape
func f16ToF32AVX2(dst *float32, src *uint16, n int)

// dequantQ8AVX2 expands nb q8_0 blocks (values q, scales sc) into 32·nb
// values.
//
//go:noescape
func dequantQ8AVX2(dst *float32, q *int8, sc *uint16, nb int)

// attnOut4AVX2 writes o[i·ldo+c] = Σ_t p[i·ldp+t]·v[t·hs+c] for i < 4,
// c < hs (hs a multiple of 16).
//
//go:noescape
func attnOut4AVX2(o *float32, ldo int, p *float32, ldp int, v *float32, n int, hs int)

// expSumAVX2 replaces n values (a multiple of 8) by e^(x-m) and returns
// their sum.
//
//go:noescape
func expSumAVX2(x *float32, n int, m float32) float32

// maxF32AVX2 returns the largest of n values (a positive multiple of 8).
//
//go:noescape
func maxF32AVX2(x *float32, n int) float32

// swigluAVX2 replaces gate by silu(gate)·up over n values (a multiple of 8).
//
//go:noescape
func swigluAVX2(gate, up *float32, n int)
