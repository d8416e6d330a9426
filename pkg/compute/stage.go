package compute

import (
	"errors"
	"fmt"
	"math"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Layer holds one transformer layer's weights. A dense layer has W1, W2
// and W3. A mixture-of-experts layer (Config.Experts > 0) has Gate and
// Experts instead. A dense layer split for selective activation
// (Config.FFNGroups > 1) has Scorer and Experts (the neuron groups), and
// W1..W3 too when the stage holds the whole feed-forward network. Entries
// of Experts are nil for experts that run on other nodes.
type Layer struct {
	AttnNorm []float32
	Wq       *Matrix // dim × dim
	Wk       *Matrix // kvDim × dim
	Wv       *Matrix // kvDim × dim
	Wo       *Matrix // dim × dim
	FFNNorm  []float32
	W1       *Matrix // hidden × dim (gate)
	W2       *Matrix // dim × hidden (down)
	W3       *Matrix // hidden × dim (up)
	// Gate is the router of a mixture-of-experts layer (experts × dim).
	Gate *Matrix
	// Scorer predicts which neuron groups of a split dense layer matter
	// for a row (groups × dim); a row's score for group g is Scorer_g·x.
	Scorer *Matrix
	// ScorerBias is added to the scorer's scores (groups; nil: none).
	ScorerBias []float32
	// Experts are the layer's experts or neuron groups, by index.
	Experts []*Expert
	// Comp reconstructs, for a split dense layer, what the groups a row
	// did not choose would have added, indexed by the chosen set (bit g
	// for group g); nil entries add nothing. See GroupComp.
	Comp []*GroupComp
}

// Embedding is the token embedding table (vocab × dim); quantized tables
// are expanded one looked-up row at a time.
type Embedding struct {
	Table *Matrix
}

// Head is the final norm and the classifier (vocab × dim).
type Head struct {
	Norm       []float32
	Classifier *Matrix
}

// Stage is the part of a model one executor runs: optionally the embedding,
// the layers [First, End), optionally the head. A Stage is not safe for
// concurrent Forward calls; its scratch buffers are reused between calls.
type Stage struct {
	Config wire.ModelConfig
	First  int
	End    int
	Embed  *Embedding
	Layers []*Layer
	Head   *Head

	pool *Pool
	ws   *Workspace
	rope *ropeTable
	s    scratch
	att  attentionTask
	pass Pass
}

// Errors returned by Forward.
var (
	// ErrCacheMiss means an item's Pos lies past its cache's filled length:
	// the earlier positions must be computed on this stage first.
	ErrCacheMiss = errors.New("kv cache miss")
	// ErrInput means an item's input is inconsistent with the stage.
	ErrInput = errors.New("invalid stage input")
)

// NewStage assembles a stage. layers must hold End-First layers; embed and
// head may be nil. pool runs the stage's parallel loops.
func NewStage(cfg wire.ModelConfig, first, end int, embed *Embedding, layers []*Layer, head *Head, pool *Pool) (*Stage, error) {
	if first < 0 || end > cfg.Layers || first > end {
		return nil, fmt.Errorf("stage layers [%d,%d) outside the model's %d layers", first, end, cfg.Layers)
	}
	if len(layers) != end-first {
		return nil, fmt.Errorf("stage [%d,%d) given %d layers", first, end, len(layers))
	}
	if embed != nil && (embed.Table == nil || embed.Table.Rows != cfg.Vocab || embed.Table.Cols != cfg.Dim) {
		return nil, fmt.Errorf("embedding is not a %d×%d matrix", cfg.Vocab, cfg.Dim)
	}
	if err := checkLayers(cfg, layers); err != nil {
		return nil, err
	}
	if head != nil && (head.Classifier == nil || head.Classifier.Rows != cfg.Vocab || head.Classifier.Cols != cfg.Dim || len(head.Norm) != cfg.Dim) {
		return nil, fmt.Errorf("head is not a %d-wide norm and a %d×%d classifier", cfg.Dim, cfg.Vocab, cfg.Dim)
	}
	if pool == nil {
		pool = NewPool(0)
	}
	return &Stage{Config: cfg, First: first, End: end, Embed: embed, Layers: layers, Head: head, pool: pool, ws: NewWorkspace(pool), rope: newRopeTable(cfg)}, nil
}

// checkLayers verifies every layer's weights have the model's shapes.
func checkLayers(cfg wire.ModelConfig, layers []*Layer) error {
	d, kv, h := cfg.Dim, KVDim(cfg), cfg.HiddenDim
	moe, groups := cfg.Experts > 0, cfg.FFNGroups > 1
	if moe && (cfg.TopK < 1 || cfg.TopK > cfg.Experts) {
		return fmt.Errorf("top_k %d outside 1..%d experts", cfg.TopK, cfg.Experts)
	}
	type want struct {
		name       string
		w          *Matrix
		rows, cols int
		optional   bool
	}
	for i, l := range layers {
		if l == nil {
			return fmt.Errorf("layer %d missing", i)
		}
		ms := []want{{"wq", l.Wq, d, d, false}, {"wk", l.Wk, kv, d, false}, {"wv", l.Wv, kv, d, false}, {"wo", l.Wo, d, d, false}}
		if !moe {
			ms = append(ms, want{"w1", l.W1, h, d, groups}, want{"w2", l.W2, d, h, groups}, want{"w3", l.W3, h, d, groups})
		}
		if moe {
			ms = append(ms, want{"gate", l.Gate, cfg.Experts, d, false})
		}
		if groups && !moe {
			ms = append(ms, want{"scorer", l.Scorer, cfg.FFNGroups, d, false})
			if l.ScorerBias != nil && len(l.ScorerBias) != cfg.FFNGroups {
				return fmt.Errorf("layer %d: scorer bias has %d values, want %d", i, len(l.ScorerBias), cfg.FFNGroups)
			}
		}
		for _, m := range ms {
			if m.w == nil && m.optional {
				continue
			}
			if m.w == nil || m.w.Rows != m.rows || m.w.Cols != m.cols {
				return fmt.Errorf("layer %d: %s is not %d×%d", i, m.name, m.rows, m.cols)
			}
		}
		if len(l.AttnNorm) != d || len(l.FFNNorm) != d {
			return fmt.Errorf("layer %d: norms are not %d wide", i, d)
		}
		n := 0
		switch {
		case moe:
			n = cfg.Experts
		case groups:
			n = cfg.FFNGroups
		}
		if len(l.Experts) != n {
			return fmt.Errorf("layer %d: %d experts, the model has %d", i, len(l.Experts), n)
		}
		for e, x := range l.Experts {
			if x == nil {
				continue
			}
			if err := x.check(d); err != nil {
				return fmt.Errorf("layer %d expert %d: %w", i, e, err)
			}
			if moe && x.W1.Rows != h {
				return fmt.Errorf("layer %d expert %d: %d hidden neurons, the model has %d", i, e, x.W1.Rows, h)
			}
		}
	}
	return nil
}

// Item is one request's share of a Forward batch.
type Item struct {
	// Cache holds the request's keys and values for this stage's layers.
	// Forward first truncates it to Pos, so re-sending a prefix recomputes it.
	Cache *Cache
	// Pos is the sequence position of the item's first row.
	Pos int
	// N is the number of rows (tokens).
	N int
	// Tokens are the input token ids when the stage has the embedding.
	Tokens []int32
	// Hidden is the input (N×dim) when the stage has no embedding, and the
	// output when it has no head; it is grown as needed.
	Hidden []float32
	// Logits receives the head's output: the last row's logits (vocab), or
	// every row's (N×vocab) when AllLogits is set.
	Logits    []float32
	AllLogits bool
	// CompFLOPs counts the arithmetic of the compensation of skipped
	// neuron groups (see GroupComp) done for this item's rows, which the
	// stage node bills beside its layers.
	CompFLOPs int64
	// ExpertFLOPs counts the arithmetic of the experts (or neuron groups)
	// of split layers that this stage computed for the item's rows itself
	// (Pass.FFNHeld), which it bills beside its layers.
	ExpertFLOPs int64
}

// scratch holds Forward's working buffers, grown to the largest batch seen.
type scratch struct {
	x, xb, xb2, q, k, v, att, h1, h3, logitsIn []float32
	rowPos                                     []int
	rowItem                                    []int
	cache                                      []*Cache
	// choices and scores are the current layer's expert selection;
	// routeRows, routeW, ex and eout one expert's rows, weights, inputs
	// and outputs.
	choices   []Choice
	scores    []float32
	routeRows []int32
	routeW    []float32
	ex, eout  []float32
	// blocks are the first rows of attention blocks, then the row count.
	blocks []int
}

func grow(b []float32, n int) []float32 {
	if cap(b) < n {
		return make([]float32, n)
	}
	return b[:n]
}

// Forward runs the batch through the stage. Every item's rows are processed
// together in each matrix product, so a batch reads the weights once. It is
// Begin, then Trunk and FFN for every layer, then Finish: the split
// execution (see Pass) computes the same thing with the feed-forward
// experts elsewhere.
func (s *Stage) Forward(items []*Item) error {
	p, err := s.Begin(items)
	if err != nil {
		return err
	}
	for l := s.First; l < s.End; l++ {
		if err := p.Trunk(l); err != nil {
			return err
		}
		if err := p.FFN(); err != nil {
			return err
		}
	}
	return p.Finish()
}

// begin validates items and gathers their inputs into s.s.x.
func (s *Stage) begin(items []*Item) (int, error) {
	cfg := s.Config
	dim, kvDim := cfg.Dim, KVDim(cfg)
	rows := 0
	for i, it := range items {
		if it.N <= 0 {
			return 0, fmt.Errorf("%w: item %d has %d rows", ErrInput, i, it.N)
		}
		if it.Pos < 0 || it.Pos+it.N > cfg.SeqLen {
			return 0, fmt.Errorf("%w: item %d positions [%d,%d) exceed the context of %d", ErrInput, i, it.Pos, it.Pos+it.N, cfg.SeqLen)
		}
		if len(s.Layers) > 0 {
			if it.Cache == nil {
				return 0, fmt.Errorf("%w: item %d has no cache", ErrInput, i)
			}
			if len(it.Cache.k) != len(s.Layers) {
				return 0, fmt.Errorf("%w: item %d has a cache for %d layers, the stage has %d", ErrInput, i, len(it.Cache.k), len(s.Layers))
			}
			if it.Cache.Len() < it.Pos {
				return 0, fmt.Errorf("%w: item %d starts at %d but the cache holds %d positions", ErrCacheMiss, i, it.Pos, it.Cache.Len())
			}
		}
		if s.Embed != nil {
			if len(it.Tokens) != it.N {
				return 0, fmt.Errorf("%w: item %d has %d tokens for %d rows", ErrInput, i, len(it.Tokens), it.N)
			}
			for _, t := range it.Tokens {
				if t < 0 || int(t) >= cfg.Vocab {
					return 0, fmt.Errorf("%w: item %d token %d outside the vocabulary of %d", ErrInput, i, t, cfg.Vocab)
				}
			}
		} else if len(it.Hidden) != it.N*dim {
			return 0, fmt.Errorf("%w: item %d has %d hidden values, want %d×%d", ErrInput, i, len(it.Hidden), it.N, dim)
		}
		rows += it.N
	}
	sc := &s.s
	sc.x = grow(sc.x, rows*dim)
	sc.xb = grow(sc.xb, rows*dim)
	sc.xb2 = grow(sc.xb2, rows*dim)
	sc.q = grow(sc.q, rows*dim)
	sc.k = grow(sc.k, rows*kvDim)
	sc.v = grow(sc.v, rows*kvDim)
	if cap(sc.rowPos) < rows {
		sc.rowPos = make([]int, rows)
		sc.rowItem = make([]int, rows)
	}
	sc.rowPos, sc.rowItem = sc.rowPos[:rows], sc.rowItem[:rows]

	// Gather the inputs into one rows×dim matrix.
	r := 0
	for i, it := range items {
		for j := 0; j < it.N; j++ {
			sc.rowPos[r+j] = it.Pos + j
			sc.rowItem[r+j] = i
		}
		if s.Embed != nil {
			for j, t := range it.Tokens {
				s.Embed.Table.Row(int(t), sc.x[(r+j)*dim:(r+j+1)*dim])
			}
		} else {
			copy(sc.x[r*dim:(r+it.N)*dim], it.Hidden)
		}
		if it.Cache != nil && len(s.Layers) > 0 {
			it.Cache.truncate(it.Pos)
			it.Cache.reserve(it.Pos + it.N)
		}
		r += it.N
	}
	return rows, nil
}

// finish records the items' cache lengths and writes their outputs.
func (s *Stage) finish(items []*Item, rows int) error {
	dim := s.Config.Dim
	sc := &s.s
	for _, it := range items {
		if it.Cache != nil {
			it.Cache.n = it.Pos + it.N
		}
	}
	if s.Head == nil {
		r := 0
		for _, it := range items {
			it.Hidden = append(it.Hidden[:0], sc.x[r*dim:(r+it.N)*dim]...)
			r += it.N
		}
		return nil
	}
	return s.head(items, rows)
}

// attend runs layer li's attention over the batch held in s.s.x and adds
// it to the residual.
func (s *Stage) attend(li int, l *Layer, items []*Item, rows int) {
	cfg := s.Config
	dim, kvDim := cfg.Dim, KVDim(cfg)
	sc := &s.s
	for r := 0; r < rows; r++ {
		rmsnorm(sc.xb[r*dim:(r+1)*dim], sc.x[r*dim:(r+1)*dim], l.AttnNorm)
	}
	s.ws.mm = matmulTask{x: sc.xb, rows: rows, np: 3, parts: [3]mmPart{{sc.q, l.Wq}, {sc.k, l.Wk}, {sc.v, l.Wv}}}
	s.ws.matmul(&s.ws.mm)
	for r := 0; r < rows; r++ {
		s.rope.apply(sc.q[r*dim:(r+1)*dim], sc.rowPos[r])
		s.rope.apply(sc.k[r*kvDim:(r+1)*kvDim], sc.rowPos[r])
		items[sc.rowItem[r]].Cache.put(li, sc.rowPos[r], sc.k[r*kvDim:(r+1)*kvDim], sc.v[r*kvDim:(r+1)*kvDim])
	}
	s.attention(li, items, rows)
	s.ws.mm = matmulTask{x: sc.xb2, rows: rows, np: 1, parts: [3]mmPart{{sc.xb, l.Wo}}}
	s.ws.matmul(&s.ws.mm)
	for i := range sc.x[:rows*dim] {
		sc.x[i] += sc.xb[i]
	}
}

// denseFFN runs the whole feed-forward block (SwiGLU) on the normalized
// rows in s.s.xb and adds it to the residual.
func (s *Stage) denseFFN(l *Layer, rows int) {
	dim, hid := s.Config.Dim, l.W1.Rows
	sc := &s.s
	sc.h1 = grow(sc.h1, rows*hid)
	sc.h3 = grow(sc.h3, rows*hid)
	s.ws.mm = matmulTask{x: sc.xb, rows: rows, np: 2, swiglu: true, parts: [3]mmPart{{sc.h1, l.W1}, {sc.h3, l.W3}}}
	s.ws.matmul(&s.ws.mm)
	s.ws.mm = matmulTask{x: sc.h1, rows: rows, np: 1, parts: [3]mmPart{{sc.xb2, l.W2}}}
	s.ws.matmul(&s.ws.mm)
	for i := range sc.x[:rows*dim] {
		sc.x[i] += sc.xb2[i]
	}
}

// attentionTask computes causal attention for units of (block, head): a
// block is up to four consecutive rows of one item, whose queries share
// the keys they read, so that a prompt's attention runs as small matrix
// products.
type attentionTask struct {
	s     *Stage
	layer int
	maxT  int
	scale float32
}

var _ task = (*attentionTask)(nil)

// attnBlock is the most query rows attention computes together.
const attnBlock = 4

// attention writes each row's attention output (rows × dim) to s.s.xb2.
func (s *Stage) attention(li int, items []*Item, rows int) {
	sc := &s.s
	maxT := 0
	for r := 0; r < rows; r++ {
		maxT = max(maxT, sc.rowPos[r]+1)
	}
	sc.att = grow(sc.att, s.pool.Workers()*attnBlock*maxT)
	sc.cache = sc.cache[:0]
	sc.blocks = sc.blocks[:0]
	for r := 0; r < rows; r++ {
		sc.cache = append(sc.cache, items[sc.rowItem[r]].Cache)
		if r == 0 || sc.rowItem[r] != sc.rowItem[r-1] || r-sc.blocks[len(sc.blocks)-1] == attnBlock {
			sc.blocks = append(sc.blocks, r)
		}
	}
	n := len(sc.blocks)
	sc.blocks = append(sc.blocks, rows)
	s.att = attentionTask{s: s, layer: li, maxT: maxT, scale: float32(1 / math.Sqrt(float64(HeadSize(s.Config))))}
	s.pool.run(&s.att, n*s.Config.Heads, 1)
}

func (t *attentionTask) run(w, lo, hi int) {
	s := t.s
	cfg := s.Config
	dim, hs, heads := cfg.Dim, HeadSize(cfg), cfg.Heads
	kvMul := cfg.Heads / cfg.KVHeads
	sc := &s.s
	att := sc.att[w*attnBlock*t.maxT : (w+1)*attnBlock*t.maxT]
	for u := lo; u < hi; u++ {
		b, h := u/heads, u%heads
		r0, r1 := sc.blocks[b], sc.blocks[b+1]
		nr := r1 - r0
		n := sc.rowPos[r1-1] + 1 // keys the block's last row reads
		kc, vc := sc.cache[r0].head(t.layer, h/kvMul, n)
		q := sc.q[r0*dim+h*hs:]
		o := sc.xb2[r0*dim+h*hs:]
		// Scores: row i of the block reads keys [0, p0+i].
		p := att[:nr*n]
		if nr == attnBlock {
			k := 0
			for ; k+3 <= n; k += 3 {
				gemm4x3(p[k:], n, q, dim, kc[k*hs:], hs, hs)
			}
			for ; k < n; k++ {
				for i := 0; i < nr; i++ {
					p[i*n+k] = dot(q[i*dim:i*dim+hs], kc[k*hs:(k+1)*hs])
				}
			}
		} else {
			for i := 0; i < nr; i++ {
				for k := 0; k < n-(nr-1-i); k++ {
					p[i*n+k] = dot(q[i*dim:i*dim+hs], kc[k*hs:(k+1)*hs])
				}
			}
		}
		var inv [attnBlock]float32
		for i := 0; i < nr; i++ {
			valid := n - (nr - 1 - i)
			row := p[i*n : (i+1)*n]
			inv[i] = 1 / expScaled(row[:valid], t.scale)
			clear(row[valid:])
		}
		if nr == attnBlock && simd.avx2 && hs%16 == 0 {
			attnOut4AVX2(&o[0], dim, &p[0], n, &vc[0], n, hs)
		} else {
			for i := 0; i < nr; i++ {
				oi := o[i*dim : i*dim+hs]
				clear(oi)
				for k, wt := range p[i*n : (i+1)*n] {
					if wt != 0 {
						axpy(wt, vc[k*hs:(k+1)*hs], oi)
					}
				}
			}
		}
		for i := 0; i < nr; i++ {
			oi := o[i*dim : i*dim+hs]
			for c := range oi {
				oi[c] *= inv[i]
			}
		}
	}
}

// head applies the final norm and classifier to the rows that need logits.
func (s *Stage) head(items []*Item, rows int) error {
	cfg := s.Config
	dim, vocab := cfg.Dim, cfg.Vocab
	sc := &s.s
	// Collect the rows that need logits: the last of each item, or all.
	n := 0
	for _, it := range items {
		if it.AllLogits {
			n += it.N
		} else {
			n++
		}
	}
	sc.logitsIn = grow(sc.logitsIn, n*dim)
	sc.xb2 = grow(sc.xb2, n*vocab)
	r, k := 0, 0
	for _, it := range items {
		from := r + it.N - 1
		if it.AllLogits {
			from = r
		}
		for j := from; j < r+it.N; j++ {
			rmsnorm(sc.logitsIn[k*dim:(k+1)*dim], sc.x[j*dim:(j+1)*dim], s.Head.Norm)
			k++
		}
		r += it.N
	}
	s.ws.mm = matmulTask{x: sc.logitsIn, rows: n, np: 1, parts: [3]mmPart{{sc.xb2, s.Head.Classifier}}}
	s.ws.matmul(&s.ws.mm)
	k = 0
	for _, it := range items {
		m := 1
		if it.AllLogits {
			m = it.N
		}
		it.Logits = append(it.Logits[:0], sc.xb2[k*vocab:(k+m)*vocab]...)
		k += m
	}
	return nil
}

// KVDim is the width of one position's keys in one layer.
func KVDim(c wire.ModelConfig) int { return c.Dim * c.KVHeads / c.Heads }

// HeadSize is the width of one attention head.
func HeadSize(c wire.ModelConfig) int { return c.Dim / c.Heads }

// ropeTable holds cos and sin of every (position, frequency) pair.
type ropeTable struct {
	hs       int
	cos, sin []float32
}

func newRopeTable(c wire.ModelConfig) *ropeTable {
	hs := HeadSize(c)
	half := hs / 2
	t := &ropeTable{hs: hs, cos: make([]float32, c.SeqLen*half), sin: make([]float32, c.SeqLen*half)}
	for p := 0; p < c.SeqLen; p++ {
		for i := 0; i < half; i++ {
			freq := 1 / math.Pow(10000, float64(2*i)/float64(hs))
			v := float64(p) * freq
			t.cos[p*half+i] = float32(math.Cos(v))
			t.sin[p*half+i] = float32(math.Sin(v))
		}
	}
	return t
}

// apply rotates consecutive pairs of vec (a multiple of the head size) by
// position pos.
func (t *ropeTable) apply(vec []float32, pos int) {
	half := t.hs / 2
	cs := t.cos[pos*half : (pos+1)*half]
	sn := t.sin[pos*half : (pos+1)*half]
	for h := 0; h < len(vec); h += t.hs {
		v := vec[h : h+t.hs]
		for i := 0; i < half; i++ {
			v0, v1 := v[2*i], v[2*i+1]
			v[2*i] = v0*cs[i] - v1*sn[i]
			v[2*i+1] = v0*sn[i] + v1*cs[i]
		}
	}
}
