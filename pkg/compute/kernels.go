package compute

import (
	"math"
	"unsafe"

	"github.com/tessera-grid/tessera/pkg/model"
)

// The kernels below pick the vector version when the processor has it
// (see simd) and otherwise, or for a tail shorter than one vector, run the
// portable Go loop; both add in different orders, so results differ in
// the last bits only.

// dot is the inner product of a and b (len(b) >= len(a)).
func dot(a, b []float32) float32 {
	n := len(a)
	if n == 0 {
		return 0
	}
	b = b[:n]
	var s float32
	v := 0
	if simd.avx2 && n >= 8 {
		v = n &^ 7
		s = dotF32AVX2(&a[0], &b[0], v)
	}
	return s + dotGo(a[v:], b[v:])
}

func dotGo(a, b []float32) float32 {
	b = b[:len(a)]
	var s0, s1, s2, s3 float32
	i := 0
	for ; i+4 <= len(a); i += 4 {
		s0 += a[i] * b[i]
		s1 += a[i+1] * b[i+1]
		s2 += a[i+2] * b[i+2]
		s3 += a[i+3] * b[i+3]
	}
	for ; i < len(a); i++ {
		s0 += a[i] * b[i]
	}
	return (s0 + s1) + (s2 + s3)
}

// axpy adds a*x to y.
func axpy(a float32, x, y []float32) {
	n := len(x)
	y = y[:n]
	v := 0
	if simd.avx2 && n >= 8 {
		v = n &^ 7
		axpyF32AVX2(a, &x[0], &y[0], v)
	}
	for i := v; i < n; i++ {
		y[i] += a * x[i]
	}
}

// gemm4x3 writes out[r*ldo+j] = x_r·w_j for 4 rows of x and 3 of w, each
// k values long.
func gemm4x3(out []float32, ldo int, x []float32, ldx int, w []float32, ldw int, k int) {
	v := 0
	if simd.avx2 && k >= 8 {
		v = k &^ 7
		// The kernel reads 4 rows of x and 3 of w: check the last ones fit.
		_ = x[3*ldx+v-1]
		_ = w[2*ldw+v-1]
		_ = out[3*ldo+2]
		gemm4x3F32AVX2(&x[0], ldx, &w[0], ldw, v, &out[0], ldo)
	} else {
		for r := 0; r < 4; r++ {
			for j := 0; j < 3; j++ {
				out[r*ldo+j] = 0
			}
		}
	}
	if v == k {
		return
	}
	for r := 0; r < 4; r++ {
		for j := 0; j < 3; j++ {
			out[r*ldo+j] += dotGo(x[r*ldx+v:r*ldx+k], w[j*ldw+v:j*ldw+k])
		}
	}
}

// f16s views b (little-endian half-precision values) as uint16s.
func f16s(b []byte) []uint16 {
	if len(b) < 2 {
		return nil
	}
	return unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), len(b)/2)
}

// dotF16 is Σ w[i]·x[i] with w half-precision.
func dotF16(w []uint16, x []float32) float32 {
	n := len(w)
	if n == 0 {
		return 0
	}
	x = x[:n]
	var s float32
	v := 0
	if simd.avx2 && n >= 8 {
		v = n &^ 7
		s = dotF16AVX2(&w[0], &x[0], v)
	}
	for i := v; i < n; i++ {
		s += model.F32FromF16(w[i]) * x[i]
	}
	return s
}

// f16ToF32 widens src into dst.
func f16ToF32(dst []float32, src []uint16) {
	n := len(src)
	dst = dst[:n]
	v := 0
	if simd.avx2 && n >= 8 {
		v = n &^ 7
		f16ToF32AVX2(&dst[0], &src[0], v)
	}
	for i := v; i < n; i++ {
		dst[i] = model.F32FromF16(src[i])
	}
}

// dotQ8 is the dot product of q8_0 weights (values wq, half-precision
// scales ws) with activations quantized per block of 32 (values xq, their
// absolute values xa, scales xd).
func dotQ8(wq []int8, ws []uint16, xq, xa []int8, xd []float32) float32 {
	n := len(wq)
	xq, xa = xq[:n], xa[:n]
	var s float32
	v := 0
	if simd.avx2 && n >= 8*model.Q8Block {
		ng := n / (8 * model.Q8Block)
		v = ng * 8 * model.Q8Block
		_ = ws[ng*8-1]
		_ = xd[ng*8-1]
		s = dotQ8AVX2(&wq[0], &ws[0], &xq[0], &xa[0], &xd[0], ng)
	}
	if v < n {
		b := v / model.Q8Block
		s += dotQ8Go(wq[v:], ws[b:], xq[v:], xd[b:])
	}
	return s
}

func dotQ8Go(wq []int8, ws []uint16, xq []int8, xd []float32) float32 {
	var s float32
	for b := 0; b*model.Q8Block < len(wq); b++ {
		w := wq[b*model.Q8Block : (b+1)*model.Q8Block]
		q := xq[b*model.Q8Block : (b+1)*model.Q8Block]
		var acc int32
		for i, v := range w {
			acc += int32(v) * int32(q[i])
		}
		s += model.F32FromF16(ws[b]) * xd[b] * float32(acc)
	}
	return s
}

// dequantQ8 expands q8_0 values q with scales sc into dst.
func dequantQ8(dst []float32, q []int8, sc []uint16) {
	nb := len(q) / model.Q8Block
	if nb == 0 {
		return
	}
	dst = dst[:nb*model.Q8Block]
	if simd.avx2 {
		_ = sc[nb-1]
		dequantQ8AVX2(&dst[0], &q[0], &sc[0], nb)
		return
	}
	for i := range dst {
		dst[i] = model.F32FromF16(sc[i/model.Q8Block]) * float32(q[i])
	}
}

// quantizeQ8 quantizes x (a multiple of 32 values) per block of 32 into
// values q, their absolute values a, and scales d, as llama.cpp quantizes
// activations for q8_0 matrix products: d = max|x|/127, q = round(x/d).
func quantizeQ8(q, a []int8, d []float32, x []float32) {
	for b := 0; b*model.Q8Block < len(x); b++ {
		blk := x[b*model.Q8Block : (b+1)*model.Q8Block]
		var amax float32
		for _, v := range blk {
			amax = max(amax, v, -v)
		}
		s := amax / 127
		d[b] = s
		inv := float32(0)
		if s != 0 {
			inv = 1 / s
		}
		qb := q[b*model.Q8Block : (b+1)*model.Q8Block]
		ab := a[b*model.Q8Block : (b+1)*model.Q8Block]
		for i, v := range blk {
			r := int8(roundHalfAway(v * inv))
			qb[i] = r
			ab[i] = max(r, -r)
		}
	}
}

// roundHalfAway rounds to the nearest integer, halves away from zero (C's
// roundf), without the cost of math.Round's generality.
func roundHalfAway(v float32) float32 {
	if v < 0 {
		return -float32(int32(-v + 0.5))
	}
	return float32(int32(v + 0.5))
}

// rmsnorm writes x normalised by its root mean square and scaled by w to out.
func rmsnorm(out, x, w []float32) {
	ss := dot(x, x)
	ss /= float32(len(x))
	ss += 1e-5
	inv := float32(1 / math.Sqrt(float64(ss)))
	for i := range out[:len(x)] {
		out[i] = w[i] * (inv * x[i])
	}
}

// expScaled replaces x by e^(scale·x - max) and returns the sum: softmax
// without its final division, which callers fold into later arithmetic.
func expScaled(x []float32, scale float32) float32 {
	n := len(x)
	for i := range x {
		x[i] *= scale
	}
	v := 0
	var m float32
	if simd.avx2 && n >= 8 {
		v = n &^ 7
		m = maxF32AVX2(&x[0], v)
	} else {
		m = x[0]
	}
	for _, e := range x[v:] {
		m = max(m, e)
	}
	var sum float32
	if v > 0 {
		sum = expSumAVX2(&x[0], v, m)
	}
	for i := v; i < n; i++ {
		e := float32(math.Exp(float64(x[i] - m)))
		x[i] = e
		sum += e
	}
	return sum
}

// softmax normalises x in place.
func softmax(x []float32) {
	if len(x) == 0 {
		return
	}
	m := x[0]
	for _, v := range x[1:] {
		if v > m {
			m = v
		}
	}
	var sum float32
	for i, v := range x {
		e := float32(math.Exp(float64(v - m)))
		x[i] = e
		sum += e
	}
	inv := 1 / sum
	for i := range x {
		x[i] *= inv
	}
}

// swiglu replaces g by silu(g)·u, the SwiGLU feed-forward activation.
func swiglu(g, u []float32) {
	n := len(g)
	u = u[:n]
	v := 0
	if simd.avx2 && n >= 8 {
		v = n &^ 7
		swigluAVX2(&g[0], &u[0], v)
	}
	for i := v; i < n; i++ {
		g[i] = silu(g[i]) * u[i]
	}
}

// silu is x·sigmoid(x).
func silu(x float32) float32 {
	return x * (1 / (1 + float32(math.Exp(float64(-x)))))
}
