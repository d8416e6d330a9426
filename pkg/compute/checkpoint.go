package compute

import (
	"github.com/tessera-grid/tessera/pkg/model"
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
		emb = &Embedding{Table: ck.TokenEmbedding}
	}
	var head *Head
	if end == c.Layers {
		head = &Head{Norm: ck.FinalNorm, Classifier: NewMatrixF32(c.Vocab, c.Dim, ck.Classifier)}
	}
	return NewStage(c, first, end, emb, layers, head, pool)
}
