package compute

import (
	"fmt"
	"math"
	"slices"

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
// The dense model's residuals after every layer are computed first, in a
// stage of their own, and kept; then each k's selective model runs over
// the calibration text alone. Only one stage's scratch memory (sized for
// every calibration row at once) is held at a time, and none is left
// behind: the distillation's dense stage is not the one grown here.
func fitRefit(ck *model.Checkpoint, calib [][]int32, g *model.FFNGrouping, pool *Pool, ks []int) error {
	c := ck.Config
	G := g.Groups()
	g.Down = make([][][]float32, c.Layers)
	g.Comp = make([][]*model.FFNComp, c.Layers)
	for l := range g.Down {
		g.Down[l] = make([][]float32, G)
		g.Comp[l] = make([]*model.FFNComp, 1<<G)
	}
	items := func() []*Item {
		out := make([]*Item, len(calib))
		for i, seq := range calib {
			out[i] = &Item{Cache: NewCache(c, c.Layers), N: len(seq), Tokens: seq}
		}
		return out
	}
	targets, err := denseResiduals(ck, items(), pool)
	if err != nil {
		return err
	}
	unfitted := *g
	unfitted.Down, unfitted.Comp = nil, nil
	for _, k := range ks {
		sel, err := selectiveStage(ck, &unfitted, k, false, pool)
		if err != nil {
			return err
		}
		sp, err := sel.Begin(items())
		if err != nil {
			return err
		}
		for l := 0; l < c.Layers; l++ {
			if err := sp.Trunk(l); err != nil {
				return err
			}
			down, comps := fitLayerRefit(ck, l, g.Neurons[l], sp, targets[l], k, pool)
			g.Down[l][k] = down
			for m, cp := range comps {
				if cp != nil {
					g.Comp[l][m] = cp
				}
			}
			// The selective model runs the layer as fitted, for the next.
			lay := sel.Layers[l]
			useDown(lay.Experts, g.Neurons[l], down, c.Dim, c.HiddenDim)
			lay.Comp = comps
			sel.compensate(lay, sp)
			if err := sp.FFN(); err != nil {
				return err
			}
		}
	}
	return nil
}

// denseResiduals runs items through the dense model ck, a stage of its own,
// and returns the residual (rows × dim) after each layer.
func denseResiduals(ck *model.Checkpoint, items []*Item, pool *Pool) ([][]float32, error) {
	c := ck.Config
	dense, err := StageFromCheckpoint(ck, 0, c.Layers, pool)
	if err != nil {
		return nil, err
	}
	dp, err := dense.Begin(items)
	if err != nil {
		return nil, err
	}
	out := make([][]float32, c.Layers)
	for l := range out {
		if err := dp.Trunk(l); err != nil {
			return nil, err
		}
		if err := dp.FFN(); err != nil {
			return nil, err
		}
		out[l] = slices.Clone(dp.Residual)
	}
	return out, nil
}

// fitLayerRefit fits layer l's down projection for k active groups and
// the compensation of each set of k groups (see fitRefit) from the
// selective pass sp, after the layer's trunk, and the dense model's
// residual after the layer, target.
//
// The work is spread over the pool without changing a bit of the result:
// rows are independent where each is computed alone, and every sum over
// rows is taken by one worker in row order (a normal equation's rows are
// dealt out to workers, a compensation's sets likewise). Only the upper
// triangle of each symmetric normal matrix is summed, then mirrored.
func fitLayerRefit(ck *model.Checkpoint, l int, groups [][]int, sp *Pass, target []float32, k int, pool *Pool) ([]float32, []*model.FFNComp) {
	c := ck.Config
	d, h, G := c.Dim, c.HiddenDim, len(groups)
	w1, w2, w3 := ck.W1[l], ck.W2[l], ck.W3[l]
	rows := sp.Rows
	// Each row's set, chosen activations (in group order) and the target
	// less the dense down projection of those activations.
	sets := make([]int, rows)
	ys := make([]float64, rows*d)
	acts := make([][]float32, rows)
	pool.For(rows, 64, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			x := sp.Normed[r*d : (r+1)*d]
			m := chosenSet(sp.Choices[r*k : (r+1)*k])
			sets[r] = m
			y := ys[r*d : (r+1)*d]
			for i := range y {
				y[i] = float64(target[r*d+i] - sp.Residual[r*d+i])
			}
			var act []float32
			for gi, ns := range groups {
				if m&(1<<gi) == 0 {
					continue
				}
				for _, n := range ns {
					a32 := silu(dot(w1[n*d:(n+1)*d], x)) * dot(w3[n*d:(n+1)*d], x)
					act = append(act, a32)
					a := float64(a32)
					for i := range y {
						y[i] -= float64(w2[i*h+n]) * a
					}
				}
			}
			acts[r] = act
		}
	})
	// The features: activations (zero unless chosen), then one constant
	// per set.
	nf := h + 1<<G
	ata := make([]float64, nf*nf)
	aty := make([]float64, nf*d)
	// Each set's chosen neurons in ascending order, with where each one's
	// activation sits in a row's acts (group order), so that a row's upper
	// triangle is a contiguous run.
	type chosen struct{ idx, at []int }
	sorted := make([]*chosen, 1<<G)
	for _, m := range sets {
		if sorted[m] != nil {
			continue
		}
		cs := &chosen{}
		for gi, ns := range groups {
			if m&(1<<gi) != 0 {
				cs.idx = append(cs.idx, ns...)
			}
		}
		cs.at = make([]int, len(cs.idx))
		for i := range cs.at {
			cs.at[i] = i
		}
		slices.SortFunc(cs.at, func(a, b int) int { return cs.idx[a] - cs.idx[b] })
		ordered := make([]int, len(cs.idx))
		for i, j := range cs.at {
			ordered[i] = cs.idx[j]
		}
		cs.idx = append(ordered, h+m) // the set's constant comes last
		sorted[m] = cs
	}
	stripes := 2 * pool.Workers()
	pool.For(stripes, 1, func(lo, hi int) {
		val := make([]float64, h+1)
		for w := lo; w < hi; w++ {
			for r := 0; r < rows; r++ {
				cs := sorted[sets[r]]
				idx := cs.idx
				for j, at := range cs.at {
					val[j] = float64(acts[r][at])
				}
				val[len(idx)-1] = 1
				y := ys[r*d : (r+1)*d]
				for a, ia := range idx {
					if ia%stripes != w {
						continue
					}
					va := val[a]
					row := ata[ia*nf:]
					for b := a; b < len(idx); b++ {
						row[idx[b]] += va * val[b]
					}
					ty := aty[ia*d : (ia+1)*d]
					for i, yi := range y {
						ty[i] += va * yi
					}
				}
			}
		}
	})
	mirror(ata, nf)
	delta := solveRidge(ata, aty, nf, d, downRidge) // nf × d
	down := make([]float32, d*h)
	for i := 0; i < d; i++ {
		for n := 0; n < h; n++ {
			down[i*h+n] = w2[i*h+n] + float32(delta[n*d+i])
		}
	}
	// What the refitted groups leave: a linear map of x per chosen set.
	pool.For(rows, 64, func(lo, hi int) {
		for r := lo; r < hi; r++ {
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
		}
	})
	n := d + 1
	type acc struct {
		ata, aty []float64
		rows     int
	}
	accs := make([]*acc, 1<<G)
	for _, m := range sets {
		if accs[m] == nil {
			accs[m] = &acc{ata: make([]float64, n*n), aty: make([]float64, n*d)}
		}
	}
	pool.For(len(accs), 1, func(lo, hi int) {
		feat := make([]float64, n)
		for m := lo; m < hi; m++ {
			a := accs[m]
			if a == nil {
				continue
			}
			for r, rm := range sets {
				if rm != m {
					continue
				}
				y := ys[r*d : (r+1)*d]
				for i, v := range sp.Normed[r*d : (r+1)*d] {
					feat[i] = float64(v)
				}
				feat[d] = 1
				a.rows++
				for i, fi := range feat {
					row := a.ata[i*n : (i+1)*n]
					for j := i; j < n; j++ {
						row[j] += fi * feat[j]
					}
					ty := a.aty[i*d : (i+1)*d]
					for j, yj := range y {
						ty[j] += fi * yj
					}
				}
			}
			mirror(a.ata, n)
		}
	})
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

// mirror copies the upper triangle of the n × n matrix a to its lower.
func mirror(a []float64, n int) {
	for i := 0; i < n; i++ {
		for j := i + 1; j < n; j++ {
			a[j*n+i] = a[i*n+j]
		}
	}
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
