package compute

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/tessera-grid/tessera/pkg/model"
)

func randVec(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64())
	}
	return v
}

// close reports whether got is within rel of want, relative to scale.
func closeTo(got, want, scale float64, rel float64) bool {
	return math.Abs(got-want) <= rel*math.Max(1, scale)
}

// withPortable runs fn with the vector kernels switched off.
func withPortable(t *testing.T, fn func()) {
	t.Helper()
	saved := simd
	simd.avx2 = false
	defer func() { simd = saved }()
	fn()
}

// The vector kernels agree with a float64 reference, for every length
// around the vector width (tails included), as do the portable ones.
func TestKernelsAgreeWithReference(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	check := func(t *testing.T) {
		for _, n := range []int{0, 1, 7, 8, 9, 31, 32, 33, 64, 100, 172, 768} {
			a, b := randVec(r, n), randVec(r, n)
			var want, scale float64
			for i := range a {
				want += float64(a[i]) * float64(b[i])
				scale += math.Abs(float64(a[i]) * float64(b[i]))
			}
			if got := dot(a, b); !closeTo(float64(got), want, scale, 1e-5) {
				t.Fatalf("dot n=%d: %v, want %v", n, got, want)
			}
			y := randVec(r, n)
			y0 := append([]float32{}, y...)
			axpy(0.5, a, y)
			for i := range y {
				if w := y0[i] + 0.5*a[i]; math.Abs(float64(y[i]-w)) > 1e-5 {
					t.Fatalf("axpy n=%d [%d]: %v, want %v", n, i, y[i], w)
				}
			}
			// Half precision: the reference uses the rounded weights.
			h := f16s(model.AppendF16(nil, a))
			want = 0
			for i := range h {
				want += float64(model.F32FromF16(h[i])) * float64(b[i])
			}
			if got := dotF16(h, b); !closeTo(float64(got), want, scale, 1e-5) {
				t.Fatalf("dotF16 n=%d: %v, want %v", n, got, want)
			}
			wide := make([]float32, n)
			f16ToF32(wide, h)
			for i := range wide {
				if wide[i] != model.F32FromF16(h[i]) {
					t.Fatalf("f16ToF32 n=%d [%d]", n, i)
				}
			}
		}
		for _, k := range []int{1, 8, 13, 64, 172, 768} {
			x, w := randVec(r, 4*(k+3)), randVec(r, 3*(k+5))
			out := make([]float32, 4*7)
			gemm4x3(out, 7, x, k+3, w, k+5, k)
			for i := 0; i < 4; i++ {
				for j := 0; j < 3; j++ {
					want := dotGo(x[i*(k+3):i*(k+3)+k], w[j*(k+5):j*(k+5)+k])
					if got := out[i*7+j]; !closeTo(float64(got), float64(want), float64(k), 1e-5) {
						t.Fatalf("gemm4x3 k=%d [%d,%d]: %v, want %v", k, i, j, got, want)
					}
				}
			}
		}
		for _, nb := range []int{1, 2, 3, 8, 9, 24, 64} {
			w := randVec(r, 32*nb)
			x := randVec(r, 32*nb)
			raw, err := model.AppendQ8_0(nil, w)
			if err != nil {
				t.Fatal(err)
			}
			m, err := NewMatrix(1, 32*nb, Q8_0, raw)
			if err != nil {
				t.Fatal(err)
			}
			xq, xa, xd := make([]int8, 32*nb), make([]int8, 32*nb), make([]float32, nb)
			quantizeQ8(xq, xa, xd, x)
			want := dotQ8Go(m.q, m.scales, xq, xd)
			if got := dotQ8(m.q, m.scales, xq, xa, xd); !closeTo(float64(got), float64(want), 32*float64(nb), 1e-5) {
				t.Fatalf("dotQ8 nb=%d: %v, want %v", nb, got, want)
			}
			// Quantization error stays small against the exact product.
			exact := dotGo(w, x)
			if math.Abs(float64(want-exact)) > 0.04*math.Sqrt(32*float64(nb)) {
				t.Fatalf("dotQ8 nb=%d: %v far from exact %v", nb, want, exact)
			}
			deq := make([]float32, 32*nb)
			m.Row(0, deq)
			ref := make([]float32, 32*nb)
			model.DequantizeQ8_0(ref, raw)
			for i := range deq {
				if deq[i] != ref[i] {
					t.Fatalf("dequantQ8 nb=%d [%d]: %v, want %v", nb, i, deq[i], ref[i])
				}
				if math.Abs(float64(deq[i]-w[i])) > 0.03 {
					t.Fatalf("q8_0 value %d: %v from %v", i, deq[i], w[i])
				}
			}
		}
		for _, n := range []int{1, 5, 8, 13, 64, 300} {
			x := randVec(r, n)
			for i := range x {
				x[i] *= 10
			}
			ref := append([]float32{}, x...)
			sum := expScaled(x, 0.5)
			m := ref[0] * 0.5
			for _, v := range ref {
				m = max(m, v*0.5)
			}
			var want float64
			for i, v := range ref {
				e := math.Exp(float64(v*0.5 - m))
				want += e
				if math.Abs(float64(x[i])-e) > 1e-6*math.Max(e, 1e-30)+1e-37 {
					t.Fatalf("expScaled n=%d [%d]: %v, want %v", n, i, x[i], e)
				}
			}
			if math.Abs(float64(sum)-want) > 1e-5*want {
				t.Fatalf("expScaled n=%d sum %v, want %v", n, sum, want)
			}
		}
		for _, n := range []int{1, 8, 13, 100} {
			g, u := randVec(r, n), randVec(r, n)
			for i := range g {
				g[i] *= 30 // reach both ends of the exponential
			}
			g0 := append([]float32{}, g...)
			swiglu(g, u)
			for i := range g {
				x := float64(g0[i])
				want := x / (1 + math.Exp(-x)) * float64(u[i])
				if math.Abs(float64(g[i])-want) > 1e-5*math.Max(1, math.Abs(want)) {
					t.Fatalf("swiglu n=%d [%d] of %v: %v, want %v", n, i, x, g[i], want)
				}
			}
		}
		if simd.avx2 {
			for _, n := range []int{1, 7, 40} {
				const hs, ldo, ldp = 32, 40, 50
				p, v := randVec(r, 4*ldp), randVec(r, n*hs)
				o := make([]float32, 4*ldo)
				attnOut4AVX2(&o[0], ldo, &p[0], ldp, &v[0], n, hs)
				for i := 0; i < 4; i++ {
					for c := 0; c < hs; c++ {
						var want float32
						for k := 0; k < n; k++ {
							want += p[i*ldp+k] * v[k*hs+c]
						}
						if math.Abs(float64(o[i*ldo+c]-want)) > 1e-4 {
							t.Fatalf("attnOut4 n=%d [%d,%d]: %v, want %v", n, i, c, o[i*ldo+c], want)
						}
					}
				}
			}
		}
	}
	t.Run(KernelName(), check)
	if simd.avx2 {
		t.Run("portable", func(t *testing.T) { withPortable(t, func() { check(t) }) })
	}
}

// The processor's F16C conversion and the portable one agree on all 65536
// half-precision values, and rounding float32 to half round-trips them.
func TestF16ConversionExhaustive(t *testing.T) {
	src := make([]uint16, 1<<16)
	for i := range src {
		src[i] = uint16(i)
	}
	got := make([]float32, len(src))
	f16ToF32(got, src)
	for i, h := range src {
		want := model.F32FromF16(h)
		if math.Float32bits(got[i]) != math.Float32bits(want) && !(math.IsNaN(float64(want)) && math.IsNaN(float64(got[i]))) {
			t.Fatalf("half %#04x: %v, portable %v", h, got[i], want)
		}
		if !math.IsNaN(float64(want)) && model.F16FromF32(want) != h {
			t.Fatalf("half %#04x: round trip gives %#04x", h, model.F16FromF32(want))
		}
	}
	// Ties round to even; overflow saturates to infinity.
	for _, tc := range []struct {
		in   float32
		want uint16
	}{
		{1 + 1.0/2048, 0x3c00}, {1 + 3.0/2048, 0x3c02}, {65520, 0x7c00}, {65504, 0x7bff}, {-2, 0xc000}, {5.960464477539063e-08, 0x0001},
	} {
		if got := model.F16FromF32(tc.in); got != tc.want {
			t.Fatalf("F16FromF32(%v) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
}
