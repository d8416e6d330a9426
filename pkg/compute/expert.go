package compute

import (
	"fmt"
	"math"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// Split execution of a layer, for feed-forward experts that live on other
// nodes. Stage.Forward runs a layer whole; a Pass runs it in three steps
// that can be spread over nodes:
//
//  1. Trunk (the stage's node): the layer's attention with the requests'
//     KV caches, added to the residual; the FFN norm of the residual
//     (Pass.Normed); and the selection of each row's K experts
//     (Pass.Choices): for a mixture of experts, the top-k gate logits with
//     weights softmax over those k logits (Mixtral); for a dense layer split
//     into neuron groups, the top-k scores of the layer's Scorer (plus
//     ScorerBias), weight 1.
//  2. Expert (any node holding the expert's fragment, which needs nothing
//     else): Expert.Apply on the normalized rows that chose it, each output
//     row scaled by the row's weight.
//  3. Combine (the stage's node): add every expert's output rows into the
//     residual. The sum over a row's K experts is the layer's FFN output.
//
// Then the next layer's Trunk, and after the stage's last layer Finish,
// which writes the items' outputs as Forward does.

// Choice is one row's use of one expert: the expert's index in its layer
// and the weight its output is added with.
type Choice struct {
	Expert int32
	Weight float32
}

// Expert is the weights of one feed-forward expert: an expert of a
// mixture-of-experts layer, or one group of a dense layer's hidden neurons
// (W1 and W3 hold the group's rows, W2 its columns). Its output for a row x
// is W2·(silu(W1·x) ⊙ W3·x), which for a neuron group is that group's share
// of the dense layer's output.
type Expert struct {
	W1 *Matrix // hidden × dim (gate)
	W2 *Matrix // dim × hidden (down)
	W3 *Matrix // hidden × dim (up)
}

// check verifies the expert's matrices agree with each other and with dim.
func (e *Expert) check(dim int) error {
	if e.W1 == nil || e.W2 == nil || e.W3 == nil {
		return fmt.Errorf("expert lacks a matrix")
	}
	h := e.W1.Rows
	if e.W1.Cols != dim || e.W3.Rows != h || e.W3.Cols != dim || e.W2.Rows != dim || e.W2.Cols != h {
		return fmt.Errorf("expert matrices w1 %d×%d, w2 %d×%d, w3 %d×%d do not fit dim %d", e.W1.Rows, e.W1.Cols, e.W2.Rows, e.W2.Cols, e.W3.Rows, e.W3.Cols, dim)
	}
	return nil
}

// Hidden is the expert's number of hidden neurons.
func (e *Expert) Hidden() int { return e.W1.Rows }

// Apply computes, for each of rows rows of x (rows×dim, FFN-normalized
// hidden states), weights[r]·FFN(x_r) into out (rows×dim). weights may be
// nil (weight 1). All rows are computed together, reading the weights once.
// ws provides the scratch memory and the workers.
func (e *Expert) Apply(ws *Workspace, x []float32, rows int, weights []float32, out []float32) error {
	dim := e.W1.Cols
	if rows <= 0 || len(x) != rows*dim || len(out) != rows*dim {
		return fmt.Errorf("%w: expert given %d inputs and %d outputs for %d rows of %d", ErrInput, len(x), len(out), rows, dim)
	}
	if weights != nil && len(weights) != rows {
		return fmt.Errorf("%w: expert given %d weights for %d rows", ErrInput, len(weights), rows)
	}
	h := e.W1.Rows
	ws.h1 = grow(ws.h1, rows*h)
	ws.h3 = grow(ws.h3, rows*h)
	ws.mm = matmulTask{x: x, rows: rows, np: 2, swiglu: true, parts: [3]mmPart{{ws.h1, e.W1}, {ws.h3, e.W3}}}
	ws.matmul(&ws.mm)
	ws.mm = matmulTask{x: ws.h1, rows: rows, np: 1, parts: [3]mmPart{{out, e.W2}}}
	ws.matmul(&ws.mm)
	if weights != nil {
		for r, w := range weights {
			if w == 1 {
				continue
			}
			o := out[r*dim : (r+1)*dim]
			for i := range o {
				o[i] *= w
			}
		}
	}
	return nil
}

// ActiveExperts is how many experts (or neuron groups) each row of a layer
// uses under cfg: TopK of a mixture of experts, TopK of a split dense
// layer (all groups when TopK is 0 or above the group count), 0 for a
// dense layer, whose FFN is not split.
func ActiveExperts(cfg wire.ModelConfig) int {
	switch {
	case cfg.Experts > 0:
		return cfg.TopK
	case cfg.FFNGroups > 1:
		if cfg.TopK <= 0 || cfg.TopK > cfg.FFNGroups {
			return cfg.FFNGroups
		}
		return cfg.TopK
	}
	return 0
}

// Pass is one batch going through a stage a layer at a time (see the
// split execution above). It belongs to its Stage and is valid until the
// stage's next Begin or Forward; like the Stage, it is not safe for
// concurrent use. The slices it exposes are the stage's scratch memory:
// read them (and write Residual only through Combine) before the next step.
type Pass struct {
	// Rows is the batch's number of rows: every item's rows, in item order.
	Rows int
	// K is the number of choices per row in the current layer (0 for a
	// dense layer, whose FFN runs whole with FFN).
	K int
	// Residual is the current layer's hidden state after attention
	// (Rows×dim); Combine adds the experts' outputs to it.
	Residual []float32
	// Normed is the FFN-normalized residual (Rows×dim): the experts' input.
	Normed []float32
	// Choices holds each row's K choices (Rows×K), best first; ties go to
	// the lower expert index, so that the selection is deterministic.
	Choices []Choice

	s     *Stage
	items []*Item
	next  int  // the next layer Trunk may run
	layer int  // the layer of the last Trunk, or -1
	done  bool // FFN ran for that layer
}

// Errors of the split execution.
var (
	// ErrPassOrder means a Pass step came out of order: Trunk for a layer
	// other than the next one, or FFN, Combine or Finish at the wrong time.
	ErrPassOrder = fmt.Errorf("pass step out of order")
	// ErrExpertMissing means a row chose an expert the stage does not hold.
	ErrExpertMissing = fmt.Errorf("expert not held by this stage")
)

// Begin validates the batch and loads its inputs (embedding the tokens
// when the stage has the embedding), as Forward does, and returns the pass
// that runs it; Trunk(First) is its next step.
func (s *Stage) Begin(items []*Item) (*Pass, error) {
	rows, err := s.begin(items)
	p := &s.pass
	*p = Pass{s: s, items: items, next: s.First, layer: -1, Rows: rows}
	if err != nil {
		p.s = nil
		return nil, err
	}
	return p, nil
}

// Trunk runs layer's attention (layer is the model's layer index, the
// stage's layers in order), the FFN norm and the selection, filling
// Residual, Normed, K and Choices. The FFN must follow: FFN, or Combine with
// the outputs of the experts named in Choices.
func (p *Pass) Trunk(layer int) error {
	s := p.s
	if s == nil {
		return fmt.Errorf("%w: trunk of layer %d after the pass ended", ErrPassOrder, layer)
	}
	if layer != p.next || layer >= s.End {
		return fmt.Errorf("%w: trunk of layer %d (next is %d, stage [%d,%d))", ErrPassOrder, layer, p.next, s.First, s.End)
	}
	cfg := s.Config
	dim := cfg.Dim
	li := layer - s.First
	l := s.Layers[li]
	sc := &s.s
	s.attend(li, l, p.items, p.Rows)
	for r := 0; r < p.Rows; r++ {
		rmsnorm(sc.xb[r*dim:(r+1)*dim], sc.x[r*dim:(r+1)*dim], l.FFNNorm)
	}
	p.Residual, p.Normed = sc.x[:p.Rows*dim], sc.xb[:p.Rows*dim]
	p.K = ActiveExperts(cfg)
	s.choose(l, p.Rows, p.K)
	p.Choices = sc.choices[:p.Rows*p.K]
	if l.Comp != nil && l.Gate == nil && p.K < len(l.Experts) {
		s.compensate(l, p)
	}
	p.layer, p.next, p.done = layer, layer+1, false
	return nil
}

// choose fills s.s.choices with each row's k best experts of layer l.
func (s *Stage) choose(l *Layer, rows, k int) {
	sc := &s.s
	sc.choices = growChoices(sc.choices, rows*k)
	if k == 0 {
		return
	}
	n := len(l.Experts)
	if l.Gate == nil && k == n {
		// Every group of a split dense layer: the scorer is not needed.
		for r := 0; r < rows; r++ {
			for e := 0; e < n; e++ {
				sc.choices[r*k+e] = Choice{Expert: int32(e), Weight: 1}
			}
		}
		return
	}
	w := l.Gate
	if w == nil {
		w = l.Scorer
	}
	sc.scores = grow(sc.scores, rows*n)
	s.ws.mm = matmulTask{x: sc.xb, rows: rows, np: 1, parts: [3]mmPart{{sc.scores, w}}}
	s.ws.matmul(&s.ws.mm)
	for r := 0; r < rows; r++ {
		ch := sc.choices[r*k : (r+1)*k]
		for i, b := range l.ScorerBias {
			sc.scores[r*n+i] += b
		}
		topK(ch, sc.scores[r*n:(r+1)*n])
		if l.Gate == nil {
			for i := range ch {
				ch[i].Weight = 1
			}
			continue
		}
		// Mixtral: softmax over the chosen experts' logits.
		top := ch[0].Weight
		var sum float32
		for i := range ch {
			ch[i].Weight = float32(math.Exp(float64(ch[i].Weight - top)))
			sum += ch[i].Weight
		}
		for i := range ch {
			ch[i].Weight /= sum
		}
	}
}

// topK writes the len(ch) highest scores' indices into ch (score in
// Weight), highest first, the lower index first among equals.
func topK(ch []Choice, scores []float32) {
	k := 0
	for e, v := range scores {
		if k == len(ch) && v <= ch[k-1].Weight {
			continue
		}
		i := min(k, len(ch)-1)
		for i > 0 && ch[i-1].Weight < v {
			ch[i] = ch[i-1]
			i--
		}
		ch[i] = Choice{Expert: int32(e), Weight: v}
		if k < len(ch) {
			k++
		}
	}
}

func growChoices(b []Choice, n int) []Choice {
	if cap(b) < n {
		return make([]Choice, n)
	}
	return b[:n]
}

// FFN computes the current layer's feed-forward block on this stage and
// adds it to the residual: the dense FFN, or every chosen expert, which the
// stage must hold (ErrExpertMissing otherwise).
func (p *Pass) FFN() error {
	s := p.s
	if s == nil || p.layer < 0 || p.done {
		return fmt.Errorf("%w: FFN without a trunk", ErrPassOrder)
	}
	p.done = true
	li := p.layer - s.First
	l := s.Layers[li]
	if p.K == 0 || (l.W1 != nil && p.K == len(l.Experts)) {
		s.denseFFN(l, p.Rows)
		return nil
	}
	dim := s.Config.Dim
	sc := &s.s
	for e, x := range l.Experts {
		sc.routeRows, sc.routeW = p.Routed(e, sc.routeRows[:0], sc.routeW[:0])
		n := len(sc.routeRows)
		if n == 0 {
			continue
		}
		if x == nil {
			return fmt.Errorf("%w: layer %d expert %d", ErrExpertMissing, p.layer, e)
		}
		sc.ex = p.Gather(sc.routeRows, sc.ex)
		sc.eout = grow(sc.eout, n*dim)
		if err := x.Apply(s.ws, sc.ex, n, sc.routeW, sc.eout); err != nil {
			return err
		}
		if err := p.Combine(sc.routeRows, sc.eout); err != nil {
			return err
		}
	}
	return nil
}

// FFNHeld computes the current layer's chosen experts that this stage
// holds (the layer's non-nil Experts) on the rows that chose them and adds
// their outputs to the residual, leaving the rows' other choices to their
// holders (Combine). It returns which experts it computed, and counts
// their arithmetic in the items' ExpertFLOPs.
func (p *Pass) FFNHeld() ([]bool, error) {
	s := p.s
	if s == nil || p.layer < 0 || p.done {
		return nil, fmt.Errorf("%w: FFN without a trunk", ErrPassOrder)
	}
	l := s.Layers[p.layer-s.First]
	if p.K == 0 {
		return nil, fmt.Errorf("%w: layer %d is not split into experts", ErrPassOrder, p.layer)
	}
	dim := s.Config.Dim
	sc := &s.s
	held := make([]bool, len(l.Experts))
	for e, x := range l.Experts {
		if x == nil {
			continue
		}
		sc.routeRows, sc.routeW = p.Routed(e, sc.routeRows[:0], sc.routeW[:0])
		n := len(sc.routeRows)
		if n == 0 {
			continue
		}
		held[e] = true
		sc.ex = p.Gather(sc.routeRows, sc.ex)
		sc.eout = grow(sc.eout, n*dim)
		if err := x.Apply(s.ws, sc.ex, n, sc.routeW, sc.eout); err != nil {
			return nil, err
		}
		if err := p.Combine(sc.routeRows, sc.eout); err != nil {
			return nil, err
		}
		// SwiGLU: three products of dim × hidden, two FLOPs per multiply-add.
		f := 6 * int64(dim) * int64(x.Hidden())
		for _, r := range sc.routeRows {
			p.items[sc.rowItem[r]].ExpertFLOPs += f
		}
	}
	return held, nil
}

// Routed appends to rows the batch rows that chose expert e in the current
// layer, and to weights their weights, and returns both.
func (p *Pass) Routed(e int, rows []int32, weights []float32) ([]int32, []float32) {
	for i, c := range p.Choices {
		if int(c.Expert) == e {
			rows = append(rows, int32(i/p.K))
			weights = append(weights, c.Weight)
		}
	}
	return rows, weights
}

// Gather copies the normalized rows named by rows into dst (grown as
// needed) and returns it: an expert's input.
func (p *Pass) Gather(rows []int32, dst []float32) []float32 {
	dim := p.s.Config.Dim
	dst = grow(dst, len(rows)*dim)
	for i, r := range rows {
		copy(dst[i*dim:(i+1)*dim], p.Normed[int(r)*dim:(int(r)+1)*dim])
	}
	return dst
}

// Combine adds an expert's output rows (len(rows)×dim, already weighted,
// as Expert.Apply returns them) to the residual rows named by rows. It is
// called once per expert used; the layer is complete when every chosen
// expert's output has been added, and the next step is Trunk or Finish.
func (p *Pass) Combine(rows []int32, out []float32) error {
	if p.s == nil || p.layer < 0 {
		return fmt.Errorf("%w: combine without a trunk", ErrPassOrder)
	}
	dim := p.s.Config.Dim
	if len(out) != len(rows)*dim {
		return fmt.Errorf("%w: %d output values for %d rows of %d", ErrInput, len(out), len(rows), dim)
	}
	for i, r := range rows {
		if r < 0 || int(r) >= p.Rows {
			return fmt.Errorf("%w: row %d outside the batch of %d", ErrInput, r, p.Rows)
		}
		dst := p.Residual[int(r)*dim : (int(r)+1)*dim]
		for j, v := range out[i*dim : (i+1)*dim] {
			dst[j] += v
		}
	}
	return nil
}

// Finish ends the pass after the stage's last layer: it records the items'
// cache lengths and writes their outputs (Hidden, or Logits at the head).
func (p *Pass) Finish() error {
	s := p.s
	if s == nil || p.next != s.End {
		return fmt.Errorf("%w: finish before the stage's layers ran", ErrPassOrder)
	}
	p.s = nil
	return s.finish(p.items, p.Rows)
}

// SplitFFN cuts the dense feed-forward weights of l (float32) into neuron
// groups: group g holds neurons groups[g], in that order (rows of W1 and
// W3, columns of W2). Every neuron must belong to exactly one group, so
// that the groups' outputs sum to the dense layer's.
func SplitFFN(l *Layer, groups [][]int) ([]*Expert, error) {
	if l.W1 == nil || l.W1.DType != F32 || l.W2.DType != F32 || l.W3.DType != F32 {
		return nil, fmt.Errorf("%w: splitting needs a dense float32 FFN", ErrInput)
	}
	d, h := l.W1.Cols, l.W1.Rows
	seen := make([]bool, h)
	out := make([]*Expert, len(groups))
	for g, ns := range groups {
		if len(ns) == 0 {
			return nil, fmt.Errorf("%w: neuron group %d is empty", ErrInput, g)
		}
		for _, n := range ns {
			if n < 0 || n >= h || seen[n] {
				return nil, fmt.Errorf("%w: neuron %d of group %d is outside 0..%d or in two groups", ErrInput, n, g, h-1)
			}
			seen[n] = true
		}
		out[g] = &Expert{
			W1: NewMatrixF32(len(ns), d, model.NeuronRows(l.W1.F32, d, ns)),
			W2: NewMatrixF32(d, len(ns), model.NeuronColumns(l.W2.F32, d, h, ns)),
			W3: NewMatrixF32(len(ns), d, model.NeuronRows(l.W3.F32, d, ns)),
		}
	}
	for n, ok := range seen {
		if !ok {
			return nil, fmt.Errorf("%w: neuron %d is in no group", ErrInput, n)
		}
	}
	return out, nil
}
