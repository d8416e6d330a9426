package model

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// The mixture-of-experts checkpoint format (Tessera's own; llama2.c has
// none) follows llama2.c's layout, with a magic, a version and the expert
// fields in the header:
//
//	offset 0   magic "TSMX"
//	       4   int32 version (1)
//	       8   int32 dim, hidden_dim (per expert), n_layers, n_heads,
//	           n_kv_heads, vocab_size (negative: the classifier is stored,
//	           not shared with the embedding), seq_len, n_experts, top_k
//	      44   float32 tensors, little-endian, row-major (out × in), each
//	           one for all layers in layer order:
//	           token_embedding  vocab × dim
//	           attn_norm        layers × dim
//	           wq, wk, wv, wo   layers × (dim|kv_dim) × dim
//	           ffn_norm         layers × dim
//	           gate             layers × n_experts × dim
//	           w1, w2, w3       layers × n_experts × (hidden × dim | dim × hidden | hidden × dim)
//	           final_norm       dim
//	           classifier       vocab × dim (only when vocab_size < 0)
//
// A token's FFN output is Σ over its top_k experts (by gate logit) of
// softmax(top_k logits)_e · w2_e·(silu(w1_e·x) ⊙ w3_e·x), as in Mixtral.
const (
	moeMagic      = "TSMX"
	moeVersion    = 1
	moeHeaderSize = 4 + 4 + 9*4
)

// parseMoE decodes a mixture-of-experts checkpoint (b starts with moeMagic).
func parseMoE(name string, b []byte) (*Checkpoint, error) {
	if len(b) < moeHeaderSize {
		return nil, fmt.Errorf("checkpoint %s: %d bytes, shorter than the %d-byte mixture-of-experts header (offset %d)", name, len(b), moeHeaderSize, len(b))
	}
	if v := int32(binary.LittleEndian.Uint32(b[4:])); v != moeVersion {
		return nil, fmt.Errorf("checkpoint %s: version %d at offset 4, want %d", name, v, moeVersion)
	}
	h := make([]int, 9)
	for i := range h {
		h[i] = int(int32(binary.LittleEndian.Uint32(b[8+4*i:])))
	}
	c := wire.ModelConfig{
		Dim: h[0], HiddenDim: h[1], Layers: h[2], Heads: h[3], KVHeads: h[4], Vocab: h[5], SeqLen: h[6],
		Experts: h[7], TopK: h[8],
	}
	c.SharedClassifier = c.Vocab > 0
	if c.Vocab < 0 {
		c.Vocab = -c.Vocab
	}
	if err := ValidateConfig(c); err != nil {
		return nil, fmt.Errorf("checkpoint %s: header (offset 8): %w", name, err)
	}
	if c.Experts < 1 || c.Experts > maxExperts {
		return nil, fmt.Errorf("checkpoint %s: n_experts = %d at offset 36 out of range (1..%d)", name, c.Experts, maxExperts)
	}
	if c.TopK < 1 || c.TopK > c.Experts {
		return nil, fmt.Errorf("checkpoint %s: top_k = %d at offset 40 out of range (1..n_experts %d)", name, c.TopK, c.Experts)
	}
	want := int64(moeHeaderSize) + 4*ParamCount(c)
	if int64(len(b)) < want {
		return nil, fmt.Errorf("checkpoint %s: truncated: header describes %d bytes, file has %d (data ends at offset %d)", name, want, len(b), len(b))
	}
	if int64(len(b)) > want {
		return nil, fmt.Errorf("checkpoint %s: %d unexpected trailing bytes at offset %d", name, int64(len(b))-want, want)
	}
	ck := &Checkpoint{Config: c}
	readBody(&f32Reader{b: b, off: moeHeaderSize}, ck, 0)
	if err := checkFinite(name, ck); err != nil {
		return nil, err
	}
	return ck, nil
}

// f32Reader reads float32 tensors from consecutive offsets of b, whose
// length the caller has checked.
type f32Reader struct {
	b   []byte
	off int
}

func (r *f32Reader) next(n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(r.b[r.off+4*i:]))
	}
	r.off += 4 * n
	return v
}

// layers reads one tensor for all L layers and splits it per layer.
func (r *f32Reader) layers(L, n int) [][]float32 {
	all := r.next(L * n)
	out := make([][]float32, L)
	for i := range out {
		out[i] = all[i*n : (i+1)*n : (i+1)*n]
	}
	return out
}

// readBody reads a checkpoint's tensors in file order into ck (whose
// Config is set): llama2.c's, with the gates before w1 in a mixture of
// experts; skip is the legacy rotary table's float count before the
// classifier.
func readBody(r *f32Reader, ck *Checkpoint, skip int) {
	c := ck.Config
	L, d, kv, f, e := c.Layers, c.Dim, KVDim(c), c.HiddenDim, max(c.Experts, 1)
	ck.TokenEmbedding = r.next(c.Vocab * d)
	ck.AttnNorm = r.layers(L, d)
	ck.Wq = r.layers(L, d*d)
	ck.Wk = r.layers(L, kv*d)
	ck.Wv = r.layers(L, kv*d)
	ck.Wo = r.layers(L, d*d)
	ck.FFNNorm = r.layers(L, d)
	if c.Experts > 0 {
		ck.Gate = r.layers(L, e*d)
	}
	ck.W1 = r.layers(L, e*f*d)
	ck.W2 = r.layers(L, e*d*f)
	ck.W3 = r.layers(L, e*f*d)
	ck.FinalNorm = r.next(d)
	r.off += 4 * skip
	if c.SharedClassifier {
		ck.Classifier = ck.TokenEmbedding
	} else {
		ck.Classifier = r.next(c.Vocab * d)
	}
}

// checkFinite rejects a checkpoint whose final norm holds NaN or infinity
// (a cheap sign of a corrupt or mis-typed file).
func checkFinite(name string, ck *Checkpoint) error {
	for i, x := range ck.FinalNorm {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return fmt.Errorf("checkpoint %s: final norm weight %d is not finite", name, i)
		}
	}
	return nil
}

// encodeMoE writes a mixture-of-experts ck in the format above.
func (ck *Checkpoint) encodeMoE() []byte {
	c := ck.Config
	vocab := int32(c.Vocab)
	if !c.SharedClassifier {
		vocab = -vocab
	}
	out := make([]byte, 0, moeHeaderSize+4*ParamCount(c))
	out = append(out, moeMagic...)
	for _, v := range []int32{moeVersion, int32(c.Dim), int32(c.HiddenDim), int32(c.Layers), int32(c.Heads), int32(c.KVHeads), vocab, int32(c.SeqLen), int32(c.Experts), int32(c.TopK)} {
		out = binary.LittleEndian.AppendUint32(out, uint32(v))
	}
	put := func(vs ...[]float32) {
		for _, v := range vs {
			for _, x := range v {
				out = binary.LittleEndian.AppendUint32(out, math.Float32bits(x))
			}
		}
	}
	put(ck.TokenEmbedding)
	for _, t := range [][][]float32{ck.AttnNorm, ck.Wq, ck.Wk, ck.Wv, ck.Wo, ck.FFNNorm, ck.Gate, ck.W1, ck.W2, ck.W3} {
		put(t...)
	}
	put(ck.FinalNorm)
	if !c.SharedClassifier {
		put(ck.Classifier)
	}
	return out
}
