package compute

import (
	"cmp"
	"fmt"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// LayerFromCheckpoint wraps layer i of ck (sharing its memory); a
// mixture-of-experts layer gets its gate and every expert.
func LayerFromCheckpoint(ck *model.Checkpoint, i int) *Layer {
	c := ck.Config
	d, kv, f := c.Dim, KVDim(c), c.HiddenDim
	l := &Layer{
		AttnNorm: ck.AttnNorm[i],
		Wq:       NewMatrixF32(d, d, ck.Wq[i]),
		Wk:       NewMatrixF32(kv, d, ck.Wk[i]),
		Wv:       NewMatrixF32(kv, d, ck.Wv[i]),
		Wo:       NewMatrixF32(d, d, ck.Wo[i]),
		FFNNorm:  ck.FFNNorm[i],
	}
	if c.Experts == 0 {
		l.W1 = NewMatrixF32(f, d, ck.W1[i])
		l.W2 = NewMatrixF32(d, f, ck.W2[i])
		l.W3 = NewMatrixF32(f, d, ck.W3[i])
		return l
	}
	l.Gate = NewMatrixF32(c.Experts, d, ck.Gate[i])
	n := f * d
	for e := 0; e < c.Experts; e++ {
		l.Experts = append(l.Experts, &Expert{
			W1: NewMatrixF32(f, d, ck.W1[i][e*n:(e+1)*n]),
			W2: NewMatrixF32(d, f, ck.W2[i][e*n:(e+1)*n]),
			W3: NewMatrixF32(f, d, ck.W3[i][e*n:(e+1)*n]),
		})
	}
	return l
}

// StageFromCheckpoint builds the stage [first, end) of ck, with the
// embedding when first is 0 and the head when end is the last layer.
func StageFromCheckpoint(ck *model.Checkpoint, first, end int, pool *Pool) (*Stage, error) {
	c := ck.Config
	layers := make([]*Layer, 0, end-first)
	for i := first; i < end; i++ {
		layers = append(layers, LayerFromCheckpoint(ck, i))
	}
	var emb *Embedding
	if first == 0 {
		emb = &Embedding{Table: NewMatrixF32(c.Vocab, c.Dim, ck.TokenEmbedding)}
	}
	var head *Head
	if end == c.Layers {
		head = &Head{Norm: ck.FinalNorm, Classifier: NewMatrixF32(c.Vocab, c.Dim, ck.Classifier)}
	}
	return NewStage(c, first, end, emb, layers, head, pool)
}

// matrixFromFragment builds the named matrix of f in whatever dtype the
// fragment stores it, over the fragment's memory (no copy).
func matrixFromFragment(f *model.Fragment, name string, rows, cols int) (*Matrix, error) {
	t, raw, err := f.Tensor(name)
	if err != nil {
		return nil, err
	}
	if len(t.Shape) != 2 || t.Shape[0] != rows || t.Shape[1] != cols {
		return nil, fmt.Errorf("fragment %s tensor %s has shape %v, want [%d %d]", f.Manifest.Fragment, name, t.Shape, rows, cols)
	}
	dt, err := ParseDType(t.DType)
	if err != nil {
		return nil, fmt.Errorf("fragment %s tensor %s: %w", f.Manifest.Fragment, name, err)
	}
	m, err := NewMatrix(rows, cols, dt, raw)
	if err != nil {
		return nil, fmt.Errorf("fragment %s tensor %s: %w", f.Manifest.Fragment, name, err)
	}
	return m, nil
}

// LayerFromFragment builds layer weights from a decoded layer fragment;
// the matrices alias the fragment's memory, in the dtype it stores. The
// layer of a mixture of experts (or of a grouped dense model) gets its gate
// (or scorer) and an Experts slice of nil entries: the experts come from
// their own fragments (ExpertFromFragment).
func LayerFromFragment(c wire.ModelConfig, f *model.Fragment) (*Layer, error) {
	d, kv, h := c.Dim, KVDim(c), c.HiddenDim
	l := &Layer{}
	var err error
	vec := func(name string, n int) []float32 {
		if err != nil {
			return nil
		}
		var v []float32
		v, err = f.F32(name, n)
		return v
	}
	mat := func(name string, rows, cols int) *Matrix {
		if err != nil {
			return nil
		}
		var m *Matrix
		m, err = matrixFromFragment(f, name, rows, cols)
		return m
	}
	l.AttnNorm = vec("attn_norm", d)
	l.Wq = mat("wq", d, d)
	l.Wk = mat("wk", kv, d)
	l.Wv = mat("wv", kv, d)
	l.Wo = mat("wo", d, d)
	l.FFNNorm = vec("ffn_norm", d)
	switch {
	case c.Experts > 0:
		l.Gate = mat("gate", c.Experts, d)
		l.Experts = make([]*Expert, c.Experts)
	case c.FFNGroups > 1:
		if err == nil {
			var sc []float32
			if sc, err = f.F32("scorer", c.FFNGroups, d); err == nil {
				l.Scorer = NewMatrixF32(c.FFNGroups, d, sc)
			}
		}
		if err == nil {
			l.ScorerBias, err = f.F32("scorer_bias", c.FFNGroups)
		}
		if err == nil {
			l.Comp, err = compFromFragment(f, c.FFNGroups, d)
		}
		l.Experts = make([]*Expert, c.FFNGroups)
	default:
		l.W1 = mat("w1", h, d)
		l.W2 = mat("w2", d, h)
		l.W3 = mat("w3", h, d)
	}
	if err != nil {
		return nil, err
	}
	return l, nil
}

// ExpertFromFragment builds an expert (or neuron group) from its fragment
// ("layer.<i>.expert.<e>"), aliasing the fragment's memory.
func ExpertFromFragment(c wire.ModelConfig, f *model.Fragment) (*Expert, error) {
	t, _, err := f.Tensor("w1")
	if err != nil {
		return nil, err
	}
	if len(t.Shape) != 2 || t.Shape[0] <= 0 {
		return nil, fmt.Errorf("fragment %s tensor w1 has shape %v, want [hidden %d]", f.Manifest.Fragment, t.Shape, c.Dim)
	}
	h := t.Shape[0]
	// A group of a split dense layer that computes fewer than all groups
	// uses the projections refitted or fine-tuned for that many, where it
	// has them.
	w1, w2, w3 := "w1", "w2", "w3"
	if c.Experts == 0 && c.TopK > 0 && c.TopK < c.FFNGroups {
		tuned := func(name string) string {
			if _, _, err := f.Tensor(name); err == nil {
				return name
			}
			return ""
		}
		w1 = cmp.Or(tuned(model.GateTensor(c.TopK)), w1)
		w2 = cmp.Or(tuned(model.DownTensor(c.TopK)), w2)
		w3 = cmp.Or(tuned(model.UpTensor(c.TopK)), w3)
	}
	e := &Expert{}
	if e.W1, err = matrixFromFragment(f, w1, h, c.Dim); err != nil {
		return nil, err
	}
	if e.W2, err = matrixFromFragment(f, w2, c.Dim, h); err != nil {
		return nil, err
	}
	if e.W3, err = matrixFromFragment(f, w3, h, c.Dim); err != nil {
		return nil, err
	}
	return e, nil
}

// EmbeddingFromFragment builds the embedding from its fragment.
func EmbeddingFromFragment(c wire.ModelConfig, f *model.Fragment) (*Embedding, error) {
	t, err := matrixFromFragment(f, "token_embedding", c.Vocab, c.Dim)
	if err != nil {
		return nil, err
	}
	return &Embedding{Table: t}, nil
}

// HeadFromFragment builds the head from its fragment.
func HeadFromFragment(c wire.ModelConfig, f *model.Fragment) (*Head, error) {
	n, err := f.F32("norm", c.Dim)
	if err != nil {
		return nil, err
	}
	w, err := matrixFromFragment(f, "classifier", c.Vocab, c.Dim)
	if err != nil {
		return nil, err
	}
	return &Head{Norm: n, Classifier: w}, nil
}
