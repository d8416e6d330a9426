package compute

import (
	"fmt"
	"math"

	"github.com/tessera-grid/tessera/pkg/model"
)

// GroupComp is a split dense layer's compensation for one chosen set of
// neuron groups (model.FFNComp): the stage node adds it to the residual in
// the trunk step, where x and the choice are known, so the holders of the
// groups compute exactly what they would without it and a split layer
// gives the same result in one process and over the grid.
type GroupComp = model.FFNComp

// chosenSet is the bit set of the groups in ch.
func chosenSet(ch []Choice) int {
	m := 0
	for _, c := range ch {
		m |= 1 << c.Expert
	}
	return m
}

// compensate adds each row's compensation for its chosen set to the
// residual.
func (s *Stage) compensate(l *Layer, p *Pass) {
	dim := s.Config.Dim
	var tmp [256]float32
	for r := 0; r < p.Rows; r++ {
		m := chosenSet(p.Choices[r*p.K : (r+1)*p.K])
		if m >= len(l.Comp) || l.Comp[m] == nil {
			continue
		}
		c := l.Comp[m]
		p.items[s.s.rowItem[r]].CompFLOPs += int64(c.FLOPs(dim))
		x := p.Normed[r*dim : (r+1)*dim]
		out := p.Residual[r*dim : (r+1)*dim]
		t := tmp[:0]
		if c.R > len(tmp) {
			t = make([]float32, 0, c.R)
		}
		for i := 0; i < c.R; i++ {
			t = append(t, dot(c.V[i*dim:(i+1)*dim], x))
		}
		for j := 0; j < dim; j++ {
			v := c.B[j]
			u := c.U[j*c.R : (j+1)*c.R]
			for i := range u {
				v += u[i] * t[i]
			}
			out[j] += v
		}
	}
}

// compRidge is the ridge penalty of the compensation fit, relative to the
// number of rows.
const compRidge = 1e-3

// fitComp fits, for every set of fewer than all groups that the scorer
// chooses on some calibration rows (any k), the rank-rank map from the
// normalized input x to the summed output of the groups not chosen, by
// ridge regression on those rows, truncated to rank by subspace iteration.
// w2 is dim × h, act the rows' hidden activations, x their inputs.
func fitComp(w2, act, x []float32, rows, d, h int, groups [][]int, scorer, bias []float32, rank int) []*model.FFNComp {
	G := len(groups)
	n := d + 1
	type acc struct {
		ata, aty []float64
		rows     int
	}
	accs := make([]*acc, 1<<G)
	og := make([]float64, G*d)
	sc := make([]float32, G)
	ch := make([]Choice, G)
	feat := make([]float64, n)
	y := make([]float64, d)
	for r := 0; r < rows; r++ {
		xr := x[r*d : (r+1)*d]
		clear(og)
		for gi, ns := range groups {
			o := og[gi*d : (gi+1)*d]
			for _, nn := range ns {
				a := float64(act[r*h+nn])
				for i := 0; i < d; i++ {
					o[i] += float64(w2[i*h+nn]) * a
				}
			}
			sc[gi] = dot(scorer[gi*d:(gi+1)*d], xr) + bias[gi]
		}
		for i, v := range xr {
			feat[i] = float64(v)
		}
		feat[d] = 1
		for k := 1; k < G; k++ {
			topK(ch[:k], sc)
			m := chosenSet(ch[:k])
			a := accs[m]
			if a == nil {
				a = &acc{ata: make([]float64, n*n), aty: make([]float64, n*d)}
				accs[m] = a
			}
			a.rows++
			clear(y)
			for gi := 0; gi < G; gi++ {
				if m&(1<<gi) == 0 {
					for i := 0; i < d; i++ {
						y[i] += og[gi*d+i]
					}
				}
			}
			for i := 0; i < n; i++ {
				fi := feat[i]
				for j := 0; j < n; j++ {
					a.ata[i*n+j] += fi * feat[j]
				}
				for j := 0; j < d; j++ {
					a.aty[i*d+j] += fi * y[j]
				}
			}
		}
	}
	out := make([]*model.FFNComp, 1<<G)
	for m, a := range accs {
		if a == nil || a.rows < n {
			continue
		}
		for i := 0; i < d; i++ {
			a.ata[i*n+i] += compRidge * float64(a.rows)
		}
		coef := solveMulti(a.ata, a.aty, n, d) // n × d: y ≈ coefᵀ·[x, 1]
		mat := make([]float64, d*d)            // y = mat·x + b
		b := make([]float32, d)
		for i := 0; i < d; i++ {
			for j := 0; j < d; j++ {
				mat[i*d+j] = coef[j*d+i]
			}
			b[i] = float32(coef[d*d+i])
		}
		u, v := lowRank(mat, d, min(rank, d))
		out[m] = &model.FFNComp{R: min(rank, d), U: u, V: v, B: b}
	}
	return out
}

// solveMulti solves a·X = b for X (n × m), a symmetric positive definite
// n × n; a and b are overwritten.
func solveMulti(a, b []float64, n, m int) []float64 {
	for col := 0; col < n; col++ {
		p := col
		for r := col + 1; r < n; r++ {
			if math.Abs(a[r*n+col]) > math.Abs(a[p*n+col]) {
				p = r
			}
		}
		if p != col {
			for j := 0; j < n; j++ {
				a[col*n+j], a[p*n+j] = a[p*n+j], a[col*n+j]
			}
			for j := 0; j < m; j++ {
				b[col*m+j], b[p*m+j] = b[p*m+j], b[col*m+j]
			}
		}
		for r := col + 1; r < n; r++ {
			f := a[r*n+col] / a[col*n+col]
			for j := col; j < n; j++ {
				a[r*n+j] -= f * a[col*n+j]
			}
			for j := 0; j < m; j++ {
				b[r*m+j] -= f * b[col*m+j]
			}
		}
	}
	x := make([]float64, n*m)
	for r := n - 1; r >= 0; r-- {
		for c := 0; c < m; c++ {
			s := b[r*m+c]
			for j := r + 1; j < n; j++ {
				s -= a[r*n+j] * x[j*m+c]
			}
			x[r*m+c] = s / a[r*n+r]
		}
	}
	return x
}

// lowRank returns U (d × r) and V (r × d) with U·V the projection of the
// d × d matrix mat onto its top-r right singular subspace (subspace
// iteration from a fixed start, so the result is deterministic).
func lowRank(mat []float64, d, r int) (u, v []float32) {
	q := make([]float64, d*r) // columns are the subspace basis
	for i := 0; i < d; i++ {
		for j := 0; j < r; j++ {
			q[i*r+j] = math.Sin(float64(i*r+j+1) * 1.618)
		}
	}
	z := make([]float64, d*r)
	for it := 0; it < 60; it++ {
		// z = mat·q, then q = matᵀ·z, orthonormalized.
		mulInto(z, mat, q, d, r, false)
		mulInto(q, mat, z, d, r, true)
		orthonormalize(q, d, r)
	}
	mulInto(z, mat, q, d, r, false)
	u, v = make([]float32, d*r), make([]float32, r*d)
	for i := 0; i < d; i++ {
		for j := 0; j < r; j++ {
			u[i*r+j] = float32(z[i*r+j])
			v[j*d+i] = float32(q[i*r+j])
		}
	}
	return u, v
}

// mulInto sets dst (d × r) to mat·src, or matᵀ·src when trans is set.
func mulInto(dst, mat, src []float64, d, r int, trans bool) {
	clear(dst)
	for i := 0; i < d; i++ {
		for k := 0; k < d; k++ {
			w := mat[i*d+k]
			if trans {
				w = mat[k*d+i]
			}
			if w == 0 {
				continue
			}
			for j := 0; j < r; j++ {
				dst[i*r+j] += w * src[k*r+j]
			}
		}
	}
}

// orthonormalize makes q's r columns orthonormal (Gram-Schmidt, twice).
func orthonormalize(q []float64, d, r int) {
	for pass := 0; pass < 2; pass++ {
		for j := 0; j < r; j++ {
			for p := 0; p < j; p++ {
				var s float64
				for i := 0; i < d; i++ {
					s += q[i*r+j] * q[i*r+p]
				}
				for i := 0; i < d; i++ {
					q[i*r+j] -= s * q[i*r+p]
				}
			}
			var s float64
			for i := 0; i < d; i++ {
				s += q[i*r+j] * q[i*r+j]
			}
			s = math.Sqrt(s) + 1e-300
			for i := 0; i < d; i++ {
				q[i*r+j] /= s
			}
		}
	}
}

// compRank is the rank of the compensation maps for a model of width d:
// 5/16 of it (20 for stories260K's 64), which keeps their cost under a
// tenth of a dense FFN's for the usual hidden widths (≥ 2.5·d).
func compRank(d int) int { return max(1, d*5/16) }

// compFromFragment reads a split layer's compensation tensors
// (comp.<set>.{u,v,b}), nil when the fragment has none.
func compFromFragment(f *model.Fragment, groups, d int) ([]*GroupComp, error) {
	var out []*GroupComp
	for m := 0; m < 1<<groups; m++ {
		ti, _, err := f.Tensor(fmt.Sprintf("comp.%d.u", m))
		if err != nil {
			continue // no compensation for this set
		}
		if len(ti.Shape) != 2 || ti.Shape[0] != d {
			return nil, fmt.Errorf("comp.%d.u has shape %v, want [%d r]", m, ti.Shape, d)
		}
		c := &GroupComp{R: ti.Shape[1]}
		if c.U, err = f.F32(fmt.Sprintf("comp.%d.u", m), d, c.R); err != nil {
			return nil, err
		}
		if c.V, err = f.F32(fmt.Sprintf("comp.%d.v", m), c.R, d); err != nil {
			return nil, err
		}
		if c.B, err = f.F32(fmt.Sprintf("comp.%d.b", m), d); err != nil {
			return nil, err
		}
		if out == nil {
			out = make([]*GroupComp, 1<<groups)
		}
		out[m] = c
	}
	return out, nil
}
