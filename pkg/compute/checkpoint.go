package compute

import (
	"fmt"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// LayerFromCheckpoint wraps layer i of ck (sharing its memory).
func LayerFromCheckpoint(ck *model.Checkpoint, i int) *Layer {
	c := ck.Config
	d, kv, f := c.Dim, KVDim(c), c.HiddenDim
	return &Layer{
		AttnNorm: ck.AttnNorm[i],
		Wq:       NewMatrixF32(d, d, ck.Wq[i]),
		Wk:       NewMatrixF32(kv, d, ck.Wk[i]),
		Wv:       NewMatrixF32(kv, d, ck.Wv[i]),
		Wo:       NewMatrixF32(d, d, ck.Wo[i]),
		FFNNorm:  ck.FFNNorm[i],
		W1:       NewMatrixF32(f, d, ck.W1[i]),
		W2:       NewMatrixF32(d, f, ck.W2[i]),
		W3:       NewMatrixF32(f, d, ck.W3[i]),
	}
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
// the matrices alias the fragment's memory, in the dtype it stores.
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
	l.W1 = mat("w1", h, d)
	l.W2 = mat("w2", d, h)
	l.W3 = mat("w3", h, d)
	if err != nil {
		return nil, err
	}
	return l, nil
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
