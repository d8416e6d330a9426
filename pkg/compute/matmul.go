package compute

import "github.com/tessera-grid/tessera/pkg/model"

// Matrix products, out[r][j] = Σ_i x[r][i]·W[j][i], run as one parallel
// loop over W's rows, so each worker streams its own rows of W from memory
// once per batch:
//
//   - a few rows of x (decode): each row of W is read once and multiplied
//     with every x row while it is in cache; q8_0 weights are multiplied
//     with x quantized to q8 blocks, as llama.cpp does, so the inner loop
//     is integer;
//   - four or more rows (prefill): a register-blocked kernel computes
//     4 rows of x by 3 rows of W at a time over tiles of W that stay in the
//     core's cache while every block of x passes; quantized tiles are first
//     expanded to float32 in per-worker scratch, which costs one pass over
//     the tile against rows passes of arithmetic.

// gemmMinRows is the batch size from which products use the blocked kernel.
const gemmMinRows = 4

// gemmTile is the rows of W a prefill chunk covers (a multiple of 3).
const gemmTile = 48

// mmPart is one product of a fused loop: out (rows × w.Rows) = x · wᵀ.
type mmPart struct {
	out []float32
	w   *Matrix
}

// matmulTask computes up to three products of the same input in one loop
// over their concatenated output rows. With swiglu set, parts 0 and 1 are a
// feed-forward gate and up projection: both are computed for the same rows
// and combined as silu(gate)·up into part 0's output.
type matmulTask struct {
	x      []float32
	rows   int
	xq, xa []int8
	xd     []float32
	parts  [3]mmPart
	np     int
	swiglu bool
	tiles  [][]float32
}

var _ task = (*matmulTask)(nil)

// matmul runs the products in t (set up by the caller) over the pool.
// scratch provides the quantized input and per-worker tiles.
func (s *Stage) matmul(t *matmulTask) {
	in := t.parts[0].w.Cols
	sc := &s.s
	quant, q8, total := false, false, 0
	for _, p := range t.parts[:t.np] {
		quant = quant || p.w.DType != F32
		q8 = q8 || p.w.DType == Q8_0
		total += p.w.Rows
	}
	if t.swiglu {
		total = t.parts[0].w.Rows
	}
	workers := s.pool.Workers()
	if t.rows < gemmMinRows {
		if q8 {
			nb := t.rows * in / model.Q8Block
			sc.xq = growI8(sc.xq, t.rows*in)
			sc.xa = growI8(sc.xa, t.rows*in)
			sc.xd = grow(sc.xd, nb)
			quantizeQ8(sc.xq, sc.xa, sc.xd, t.x[:t.rows*in])
			t.xq, t.xa, t.xd = sc.xq, sc.xa, sc.xd
		}
		grain := max(16, total/(workers*8))
		s.pool.run(t, total, grain)
		return
	}
	if quant {
		if len(sc.tiles) < workers {
			sc.tiles = make([][]float32, workers)
		}
		for i := range sc.tiles {
			sc.tiles[i] = grow(sc.tiles[i], gemmTile*in)
		}
		t.tiles = sc.tiles
	}
	s.pool.run(t, total, gemmTile)
}

func growI8(b []int8, n int) []int8 {
	if cap(b) < n {
		return make([]int8, n)
	}
	return b[:n]
}

func (t *matmulTask) run(w, lo, hi int) {
	if t.swiglu {
		t.product(w, t.parts[0], lo, hi)
		t.product(w, t.parts[1], lo, hi)
		o := t.parts[0].w.Rows
		for r := 0; r < t.rows; r++ {
			swiglu(t.parts[0].out[r*o+lo:r*o+hi], t.parts[1].out[r*o+lo:r*o+hi])
		}
		return
	}
	base := 0
	for _, p := range t.parts[:t.np] {
		plo, phi := max(lo-base, 0), min(hi-base, p.w.Rows)
		if plo < phi {
			t.product(w, p, plo, phi)
		}
		base += p.w.Rows
	}
}

// product computes rows [lo, hi) of W for every row of x.
func (t *matmulTask) product(w int, p mmPart, lo, hi int) {
	m, in, o := p.w, p.w.Cols, p.w.Rows
	if t.rows < gemmMinRows {
		t.vector(p, lo, hi)
		return
	}
	var tile []float32
	switch m.DType {
	case F32:
		tile = m.F32[lo*in : hi*in]
	case F16:
		tile = t.tiles[w][:(hi-lo)*in]
		f16ToF32(tile, f16s(m.Data[lo*2*in:hi*2*in]))
	case Q8_0:
		nb := in / model.Q8Block
		tile = t.tiles[w][:(hi-lo)*in]
		dequantQ8(tile, m.q[lo*in:hi*in], m.scales[lo*nb:hi*nb])
	}
	gemmBlock(p.out[lo:], o, t.x, in, t.rows, tile, hi-lo)
}

// vector computes rows [lo, hi) of W against the few rows of x, reading
// each row of W once.
func (t *matmulTask) vector(p mmPart, lo, hi int) {
	m, in, o := p.w, p.w.Cols, p.w.Rows
	switch m.DType {
	case F32:
		for j := lo; j < hi; j++ {
			wr := m.F32[j*in : (j+1)*in]
			for r := 0; r < t.rows; r++ {
				p.out[r*o+j] = dot(wr, t.x[r*in:(r+1)*in])
			}
		}
	case F16:
		for j := lo; j < hi; j++ {
			wr := f16s(m.Data[j*2*in : (j+1)*2*in])
			for r := 0; r < t.rows; r++ {
				p.out[r*o+j] = dotF16(wr, t.x[r*in:(r+1)*in])
			}
		}
	case Q8_0:
		nb := in / model.Q8Block
		for j := lo; j < hi; j++ {
			wq, ws := m.q[j*in:(j+1)*in], m.scales[j*nb:(j+1)*nb]
			for r := 0; r < t.rows; r++ {
				p.out[r*o+j] = dotQ8(wq, ws, t.xq[r*in:(r+1)*in], t.xa[r*in:(r+1)*in], t.xd[r*nb:(r+1)*nb])
			}
		}
	}
}

// gemmBlock writes out[r*ldo+j] = x_r·w_j for every row r of x (rows × in)
// and the nw rows of w (nw × in).
func gemmBlock(out []float32, ldo int, x []float32, in, rows int, w []float32, nw int) {
	r := 0
	for ; r+4 <= rows; r += 4 {
		xr := x[r*in:]
		j := 0
		for ; j+3 <= nw; j += 3 {
			gemm4x3(out[r*ldo+j:], ldo, xr, in, w[j*in:], in, in)
		}
		for ; j < nw; j++ {
			for rr := r; rr < r+4; rr++ {
				out[rr*ldo+j] = dot(w[j*in:(j+1)*in], x[rr*in:(rr+1)*in])
			}
		}
	}
	for ; r < rows; r++ {
		for j := 0; j < nw; j++ {
			out[r*ldo+j] = dot(w[j*in:(j+1)*in], x[r*in:(r+1)*in])
		}
	}
}
