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

// Ridge penalties of the refit, relative to the mean diagonal of the
// normal equations: the down projection's correction (shrunk toward the
// dense W2) and the compensation maps.
const (
	downRidge = 1e-4
	compRidge = 1e-3
)

// fitRefit fits, for every number k of active groups in ks (each below
// g's group count), each layer's down projection refitted for k groups
// (g.Down) and the compensation of each chosen set of k groups (g.Comp), a
// layer at a time on the selective model's own hidden states over the
// calibration sequences, so that each layer also corrects what the layers
// before it left out:
//
//  1. the target is the dense model's residual after the layer minus the
//     selective model's residual after its attention: what the layer's FFN
//     should add;
//  2. the chosen groups' down projection is refitted, one matrix for
//     every set of k groups (a group holder needs to know only k), by
//     ridge regression of the target on each row's chosen activations
//     (and a constant per set), shrunk toward the dense W2;
//  3. what remains is fitted per chosen set by a linear map of the
//     normalized input x, truncated to rank compRank: the compensation the
//     stage node adds.
//
// dense is the whole dense model in one stage.
func fitRefit(ck *model.Checkpoint, calib [][]int32, g *model.FFNGrouping, dense *Stage, pool *Pool, ks []int) error {
	c := ck.Config
	G := g.Groups()
	g.Down = make([][][]float32, c.Layers)
	g.Comp = make([][]*model.FFNComp, c.Layers)
	for l := range g.Down {
		g.Down[l] = make([][]float32, G)
		g.Comp[l] = make([]*model.FFNComp, 1<<G)
	}
	// One selective model per k, each run a layer at a time beside one
	// dense pass over the same sequences.
	items := func() []*Item {
		out := make([]*Item, len(calib))
		for i, seq := range calib {
			out[i] = &Item{Cache: NewCache(c, c.Layers), N: len(seq), Tokens: seq}
		}
		return out
	}
	sels := make([]*Stage, len(ks))
	passes := make([]*Pass, len(ks))
	unfitted := *g
	unfitted.Down, unfitted.Comp = nil, nil
	for i, k := range ks {
		var err error
		if sels[i], err = selectiveStage(ck, &unfitted, k, false, pool); err != nil {
			return err
		}
		if passes[i], err = sels[i].Begin(items()); err != nil {
			return err
		}
	}
	dp, err := dense.Begin(items())
	if err != nil {
		return err
	}
	for l := 0; l < c.Layers; l++ {
		if err := dp.Trunk(l); err != nil {
			return err
		}
		if err := dp.FFN(); err != nil {
			return err
		}
		for i, k := range ks {
			sp := passes[i]
			if err := sp.Trunk(l); err != nil {
				return err
			}
			down, comps := fitLayerRefit(ck, l, g.Neurons[l], sp, dp.Residual, k)
			g.Down[l][k] = down
			for m, cp := range comps {
				if cp != nil {
					g.Comp[l][m] = cp
				}
			}
			// The selective model runs the layer as fitted, for the next.
			lay := sels[i].Layers[l]
			useDown(lay.Experts, g.Neurons[l], down, c.Dim, c.HiddenDim)
			lay.Comp = comps
			sels[i].compensate(lay, sp)
			if err := sp.FFN(); err != nil {
				return err
			}
		}
	}
	return nil
}

// fitLayerRefit fits layer l's down projection for k active groups and
// the compensation of each set of k groups (see fitRefit) from the
// selective pass sp, after the layer's trunk, and the dense model's
// residual after the layer, target.
func fitLayerRefit(ck *model.Checkpoint, l int, groups [][]int, sp *Pass, target []float32, k int) ([]float32, []*model.FFNComp) {
	c := ck.Config
	d, h, G := c.Dim, c.HiddenDim, len(groups)
	w1, w2, w3 := ck.W1[l], ck.W2[l], ck.W3[l]
	rows := sp.Rows
	// Each row's set, chosen activations and the target less the dense
	// down projection of those activations.
	sets := make([]int, rows)
	ys := make([]float64, rows*d)
	acts := make([][]float32, rows)
	nf := h + 1<<G // features: activations (zero unless chosen), set
	ata := make([]float64, nf*nf)
	aty := make([]float64, nf*d)
	idx := make([]int, 0, h+1)
	val := make([]float64, 0, h+1)
	for r := 0; r < rows; r++ {
		x := sp.Normed[r*d : (r+1)*d]
		m := chosenSet(sp.Choices[r*k : (r+1)*k])
		sets[r] = m
		y := ys[r*d : (r+1)*d]
		for i := range y {
			y[i] = float64(target[r*d+i] - sp.Residual[r*d+i])
		}
		idx, val = idx[:0], val[:0]
		for gi, ns := range groups {
			if m&(1<<gi) == 0 {
				continue
			}
			for _, n := range ns {
				a := float64(silu(dot(w1[n*d:(n+1)*d], x)) * dot(w3[n*d:(n+1)*d], x))
				idx, val = append(idx, n), append(val, a)
				for i := range y {
					y[i] -= float64(w2[i*h+n]) * a
				}
			}
		}
		acts[r] = make([]float32, len(val))
		for j, v := range val {
			acts[r][j] = float32(v)
		}
		idx, val = append(idx, h+m), append(val, 1)
		for a, ia := range idx {
			va := val[a]
			row := ata[ia*nf:]
			for b, ib := range idx {
				row[ib] += va * val[b]
			}
			ty := aty[ia*d : (ia+1)*d]
			for i, yi := range y {
				ty[i] += va * yi
			}
		}
	}
	delta := solveRidge(ata, aty, nf, d, downRidge) // nf × d
	down := make([]float32, d*h)
	for i := 0; i < d; i++ {
		for n := 0; n < h; n++ {
			down[i*h+n] = w2[i*h+n] + float32(delta[n*d+i])
		}
	}
	// What the refitted groups leave: a linear map of x per chosen set.
	n := d + 1
	type acc struct {
		ata, aty []float64
		rows     int
	}
	accs := make([]*acc, 1<<G)
	feat := make([]float64, n)
	for r := 0; r < rows; r++ {
		m := sets[r]
		y := ys[r*d : (r+1)*d]
		j := 0
		for gi, ns := range groups {
			if m&(1<<gi) == 0 {
				continue
			}
			for _, nn := range ns {
				a := float64(acts[r][j])
				j++
				for i := range y {
					y[i] -= delta[nn*d+i] * a
				}
			}
		}
		for i, v := range sp.Normed[r*d : (r+1)*d] {
			feat[i] = float64(v)
		}
		feat[d] = 1
		a := accs[m]
		if a == nil {
			a = &acc{ata: make([]float64, n*n), aty: make([]float64, n*d)}
			accs[m] = a
		}
		a.rows++
		for i, fi := range feat {
			row := a.ata[i*n : (i+1)*n]
			for j, fj := range feat {
				row[j] += fi * fj
			}
			ty := a.aty[i*d : (i+1)*d]
			for j, yj := range y {
				ty[j] += fi * yj
			}
		}
	}
	rank := compRank(d, h, G)
	comps := make([]*model.FFNComp, 1<<G)
	for m, a := range accs {
		if a == nil || a.rows < n {
			continue
		}
		coef := solveRidge(a.ata, a.aty, n, d, compRidge) // y ≈ coefᵀ·[x, 1]
		mat := make([]float64, d*d)                       // y = mat·x + b
		b := make([]float32, d)
		for i := 0; i < d; i++ {
			for j := 0; j < d; j++ {
				mat[i*d+j] = coef[j*d+i]
			}
			b[i] = float32(coef[d*d+i])
		}
		u, v := lowRank(mat, d, rank)
		comps[m] = &model.FFNComp{R: rank, U: u, V: v, B: b}
	}
	return down, comps
}

// solveRidge solves (ata + λ·mean(diag ata)·I)·X = aty for X (n × m);
// ata and aty are overwritten.
func solveRidge(ata, aty []float64, n, m int, lambda float64) []float64 {
	var tr float64
	for i := 0; i < n; i++ {
		tr += ata[i*n+i]
	}
	pen := lambda*tr/float64(n) + 1e-12
	for i := 0; i < n; i++ {
		ata[i*n+i] += pen
	}
	return solveMulti(ata, aty, n, m)
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

// compRank is the rank of the compensation maps for a model of width d
// with hidden FFN neurons in groups groups: the largest that keeps the
// scorer and the compensation within a tenth of the dense FFN's
// arithmetic (23 for stories260K's 64 and 172 in 4 groups), at least 1.
func compRank(d, hidden, groups int) int {
	budget := 6*d*hidden/10 - groups*(2*d+1) - 2*d
	return max(1, min(d, budget/(4*d)))
}

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
