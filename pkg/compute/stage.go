package compute

import (
	"errors"
	"fmt"
	"math"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Layer holds one transformer layer's weights.
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
}

// Embedding is the token embedding table (vocab × dim, float32).
type Embedding struct {
	Table []float32
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
	rope *ropeTable
	s    scratch
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
	if embed != nil && len(embed.Table) != cfg.Vocab*cfg.Dim {
		return nil, fmt.Errorf("embedding has %d values, want %d", len(embed.Table), cfg.Vocab*cfg.Dim)
	}
	if pool == nil {
		pool = NewPool(0)
	}
	return &Stage{Config: cfg, First: first, End: end, Embed: embed, Layers: layers, Head: head, pool: pool, rope: newRopeTable(cfg)}, nil
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
}

// scratch holds Forward's working buffers, grown to the largest batch seen.
type scratch struct {
	x, xb, xb2, q, k, v, att, h1, h3, logitsIn []float32
	rowPos                                     []int
	rowItem                                    []int
}

func grow(b []float32, n int) []float32 {
	if cap(b) < n {
		return make([]float32, n)
	}
	return b[:n]
}

// Forward runs the batch through the stage. Every item's rows are processed
// together in each matrix product, so a batch reads the weights once.
func (s *Stage) Forward(items []*Item) error {
	cfg := s.Config
	dim, kvDim := cfg.Dim, KVDim(cfg)
	rows := 0
	for i, it := range items {
		if it.N <= 0 {
			return fmt.Errorf("%w: item %d has %d rows", ErrInput, i, it.N)
		}
		if it.Pos < 0 || it.Pos+it.N > cfg.SeqLen {
			return fmt.Errorf("%w: item %d positions [%d,%d) exceed the context of %d", ErrInput, i, it.Pos, it.Pos+it.N, cfg.SeqLen)
		}
		if len(s.Layers) > 0 {
			if it.Cache == nil {
				return fmt.Errorf("%w: item %d has no cache", ErrInput, i)
			}
			if it.Cache.Len() < it.Pos {
				return fmt.Errorf("%w: item %d starts at %d but the cache holds %d positions", ErrCacheMiss, i, it.Pos, it.Cache.Len())
			}
		}
		if s.Embed != nil {
			if len(it.Tokens) != it.N {
				return fmt.Errorf("%w: item %d has %d tokens for %d rows", ErrInput, i, len(it.Tokens), it.N)
			}
			for _, t := range it.Tokens {
				if t < 0 || int(t) >= cfg.Vocab {
					return fmt.Errorf("%w: item %d token %d outside the vocabulary of %d", ErrInput, i, t, cfg.Vocab)
				}
			}
		} else if len(it.Hidden) != it.N*dim {
			return fmt.Errorf("%w: item %d has %d hidden values, want %d×%d", ErrInput, i, len(it.Hidden), it.N, dim)
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
				copy(sc.x[(r+j)*dim:(r+j+1)*dim], s.Embed.Table[int(t)*dim:(int(t)+1)*dim])
			}
		} else {
			copy(sc.x[r*dim:(r+it.N)*dim], it.Hidden)
		}
		if it.Cache != nil {
			it.Cache.truncate(it.Pos)
			it.Cache.reserve(it.Pos + it.N)
		}
		r += it.N
	}
	for li, l := range s.Layers {
		s.layer(li, l, items, rows)
	}
	for _, it := range items {
		if it.Cache != nil {
			it.Cache.n = it.Pos + it.N
		}
	}
	if s.Head == nil {
		r = 0
		for _, it := range items {
			it.Hidden = append(it.Hidden[:0], sc.x[r*dim:(r+it.N)*dim]...)
			r += it.N
		}
		return nil
	}
	return s.head(items, rows)
}

// layer runs one transformer layer over the batch held in s.s.x.
func (s *Stage) layer(li int, l *Layer, items []*Item, rows int) {
	cfg := s.Config
	dim, kvDim, hs := cfg.Dim, KVDim(cfg), HeadSize(cfg)
	sc := &s.s
	for r := 0; r < rows; r++ {
		rmsnorm(sc.xb[r*dim:(r+1)*dim], sc.x[r*dim:(r+1)*dim], l.AttnNorm)
	}
	matmul(s.pool, sc.q, sc.xb, rows, l.Wq)
	matmul(s.pool, sc.k, sc.xb, rows, l.Wk)
	matmul(s.pool, sc.v, sc.xb, rows, l.Wv)
	for r := 0; r < rows; r++ {
		s.rope.apply(sc.q[r*dim:(r+1)*dim], sc.rowPos[r])
		s.rope.apply(sc.k[r*kvDim:(r+1)*kvDim], sc.rowPos[r])
		c := items[sc.rowItem[r]].Cache
		copy(c.k[li][sc.rowPos[r]*kvDim:], sc.k[r*kvDim:(r+1)*kvDim])
		copy(c.v[li][sc.rowPos[r]*kvDim:], sc.v[r*kvDim:(r+1)*kvDim])
	}
	// Attention: each (row, head) pair is independent.
	heads := cfg.Heads
	kvMul := cfg.Heads / cfg.KVHeads
	maxT := 0
	for r := 0; r < rows; r++ {
		maxT = max(maxT, sc.rowPos[r]+1)
	}
	scale := float32(1 / math.Sqrt(float64(hs)))
	workers := s.pool.Workers()
	sc.att = grow(sc.att, workers*maxT)
	out := sc.xb2
	s.pool.ForW(rows*heads, 1, func(w, lo, hi int) {
		att := sc.att[w*maxT : (w+1)*maxT]
		for p := lo; p < hi; p++ {
			r, h := p/heads, p%heads
			pos := sc.rowPos[r]
			c := items[sc.rowItem[r]].Cache
			q := sc.q[r*dim+h*hs : r*dim+(h+1)*hs]
			kh := (h / kvMul) * hs
			kc, vc := c.k[li], c.v[li]
			a := att[:pos+1]
			for t := range a {
				a[t] = dot(q, kc[t*kvDim+kh:]) * scale
			}
			softmax(a)
			o := out[r*dim+h*hs : r*dim+(h+1)*hs]
			clear(o)
			for t, w := range a {
				axpy(w, vc[t*kvDim+kh:t*kvDim+kh+hs], o)
			}
		}
	})
	matmul(s.pool, sc.xb, out, rows, l.Wo)
	for i := range sc.x[:rows*dim] {
		sc.x[i] += sc.xb[i]
	}
	// Feed-forward (SwiGLU).
	hid := cfg.HiddenDim
	sc.h1 = grow(sc.h1, rows*hid)
	sc.h3 = grow(sc.h3, rows*hid)
	for r := 0; r < rows; r++ {
		rmsnorm(sc.xb[r*dim:(r+1)*dim], sc.x[r*dim:(r+1)*dim], l.FFNNorm)
	}
	matmul(s.pool, sc.h1, sc.xb, rows, l.W1)
	matmul(s.pool, sc.h3, sc.xb, rows, l.W3)
	for i := range sc.h1[:rows*hid] {
		sc.h1[i] = silu(sc.h1[i]) * sc.h3[i]
	}
	matmul(s.pool, sc.xb, sc.h1, rows, l.W2)
	for i := range sc.x[:rows*dim] {
		sc.x[i] += sc.xb[i]
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
	matmul(s.pool, sc.xb2, sc.logitsIn, n, s.Head.Classifier)
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
