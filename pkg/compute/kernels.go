package compute

import "math"

// dot is the inner product of a and b (len(b) >= len(a)).
func dot(a, b []float32) float32 {
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
	y = y[:len(x)]
	for i, v := range x {
		y[i] += a * v
	}
}

// rmsnorm writes x normalised by its root mean square and scaled by w to out.
func rmsnorm(out, x, w []float32) {
	var ss float32
	for _, v := range x {
		ss += v * v
	}
	ss /= float32(len(x))
	ss += 1e-5
	inv := float32(1 / math.Sqrt(float64(ss)))
	for i := range out[:len(x)] {
		out[i] = w[i] * (inv * x[i])
	}
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

// silu is x·sigmoid(x).
func silu(x float32) float32 {
	return x * (1 / (1 + float32(math.Exp(float64(-x)))))
}

// matmul computes out[r][o] = Σ_i x[r][i]·W[o][i] for rows r of x (rows×W.Cols)
// into out (rows×W.Rows), splitting the output columns over the pool.
func matmul(p *Pool, out, x []float32, rows int, w *Matrix) {
	in, o := w.Cols, w.Rows
	wf := w.F32
	p.For(o, 16, func(lo, hi int) {
		for j := lo; j < hi; j++ {
			wr := wf[j*in : (j+1)*in]
			for r := 0; r < rows; r++ {
				out[r*o+j] = dot(wr, x[r*in:(r+1)*in])
			}
		}
	})
}
