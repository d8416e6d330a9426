// Package model reads model checkpoints and tokenizers and describes models
// as fragments: the embedding, one fragment per layer, and the head.
package model

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Checkpoint is a dense Llama model in memory, float32, row-major (out × in).
// Per-layer tensors are indexed by layer.
type Checkpoint struct {
	Config wire.ModelConfig
	// TokenEmbedding is vocab × dim.
	TokenEmbedding []float32
	AttnNorm       [][]float32 // dim
	Wq             [][]float32 // dim × dim
	Wk             [][]float32 // kvDim × dim
	Wv             [][]float32 // kvDim × dim
	Wo             [][]float32 // dim × dim
	FFNNorm        [][]float32 // dim
	// W1, W2 and W3 are the feed-forward weights; in a mixture-of-experts
	// model (Config.Experts > 0) each layer's entry holds its experts one
	// after another, each of the dense shape with HiddenDim neurons.
	W1 [][]float32 // [experts ×] hidden × dim (gate)
	W2 [][]float32 // [experts ×] dim × hidden (down)
	W3 [][]float32 // [experts ×] hidden × dim (up)
	// Gate is each layer's expert router (experts × dim); nil when dense.
	Gate      [][]float32
	FinalNorm []float32 // dim
	// Classifier is vocab × dim; it aliases TokenEmbedding when shared.
	Classifier []float32
}

// KVDim is the width of one position's keys (or values) in one layer.
func KVDim(c wire.ModelConfig) int { return c.Dim * c.KVHeads / c.Heads }

// HeadSize is the width of one attention head.
func HeadSize(c wire.ModelConfig) int { return c.Dim / c.Heads }

// llama2cHeaderSize is the legacy (version 0) llama2.c header: 7 int32.
const llama2cHeaderSize = 7 * 4

// maxDim bounds header fields so that a malformed file cannot ask for an
// absurd allocation before the size check.
const maxDim = 1 << 20

// maxExperts bounds a mixture of experts' expert count.
const maxExperts = 1024

// ValidateConfig checks that c describes a runnable transformer.
func ValidateConfig(c wire.ModelConfig) error {
	fields := []struct {
		name string
		v    int
	}{
		{"dim", c.Dim}, {"hidden_dim", c.HiddenDim}, {"n_layers", c.Layers}, {"n_heads", c.Heads},
		{"n_kv_heads", c.KVHeads}, {"vocab_size", c.Vocab}, {"seq_len", c.SeqLen},
	}
	for _, f := range fields {
		if f.v <= 0 || f.v > maxDim {
			return fmt.Errorf("%s = %d out of range (1..%d)", f.name, f.v, maxDim)
		}
	}
	if c.Layers > 4096 {
		return fmt.Errorf("n_layers = %d out of range (1..4096)", c.Layers)
	}
	if c.Dim%c.Heads != 0 {
		return fmt.Errorf("dim %d not divisible by n_heads %d", c.Dim, c.Heads)
	}
	if c.Heads%c.KVHeads != 0 {
		return fmt.Errorf("n_heads %d not divisible by n_kv_heads %d", c.Heads, c.KVHeads)
	}
	if (c.Dim/c.Heads)%2 != 0 {
		return fmt.Errorf("head size %d is odd (rotary positions need pairs)", c.Dim/c.Heads)
	}
	return nil
}

// LoadCheckpoint reads a llama2.c checkpoint (legacy version 0 format: a
// header of seven int32 then float32 tensors) from path.
func LoadCheckpoint(path string) (*Checkpoint, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return ParseCheckpoint(path, b)
}

// ParseCheckpoint decodes a llama2.c checkpoint, or a mixture-of-experts
// checkpoint in Tessera's format (see moe.go), held in b; name is used in
// errors, which give the byte offset of the problem.
func ParseCheckpoint(name string, b []byte) (*Checkpoint, error) {
	if len(b) >= 4 && string(b[:4]) == moeMagic {
		return parseMoE(name, b)
	}
	if len(b) < llama2cHeaderSize {
		return nil, fmt.Errorf("checkpoint %s: %d bytes, shorter than the %d-byte header (offset %d)", name, len(b), llama2cHeaderSize, len(b))
	}
	h := make([]int32, 7)
	for i := range h {
		h[i] = int32(binary.LittleEndian.Uint32(b[4*i:]))
	}
	c := wire.ModelConfig{
		Dim: int(h[0]), HiddenDim: int(h[1]), Layers: int(h[2]), Heads: int(h[3]),
		KVHeads: int(h[4]), Vocab: int(h[5]), SeqLen: int(h[6]),
	}
	// A negative vocab size means the classifier is stored separately.
	c.SharedClassifier = c.Vocab > 0
	if c.Vocab < 0 {
		c.Vocab = -c.Vocab
	}
	if err := ValidateConfig(c); err != nil {
		return nil, fmt.Errorf("checkpoint %s: header (offset 0): %w", name, err)
	}
	kv := KVDim(c)
	hs := HeadSize(c)
	L, d, f := c.Layers, c.Dim, c.HiddenDim
	sizes := []int{
		c.Vocab * d, L * d, L * d * d, L * kv * d, L * kv * d, L * d * d, L * d,
		L * f * d, L * d * f, L * f * d, d, c.SeqLen * hs / 2, c.SeqLen * hs / 2,
	}
	if !c.SharedClassifier {
		sizes = append(sizes, c.Vocab*d)
	}
	want := int64(llama2cHeaderSize)
	for _, s := range sizes {
		want += 4 * int64(s)
	}
	if int64(len(b)) < want {
		return nil, fmt.Errorf("checkpoint %s: truncated: header describes %d bytes, file has %d (data ends at offset %d)", name, want, len(b), len(b))
	}
	if int64(len(b)) > want {
		return nil, fmt.Errorf("checkpoint %s: %d unexpected trailing bytes at offset %d", name, int64(len(b))-want, want)
	}
	ck := &Checkpoint{Config: c}
	readBody(&f32Reader{b: b, off: llama2cHeaderSize}, ck, c.SeqLen*hs)
	if err := checkFinite(name, ck); err != nil {
		return nil, err
	}
	return ck, nil
}

// Encode writes ck in llama2.c's legacy format (the inverse of
// ParseCheckpoint); the legacy rotary tables are written as zeros. A
// mixture-of-experts checkpoint is written in Tessera's format (moe.go).
func (ck *Checkpoint) Encode() []byte {
	c := ck.Config
	if c.Experts > 0 {
		return ck.encodeMoE()
	}
	vocab := int32(c.Vocab)
	if !c.SharedClassifier {
		vocab = -vocab
	}
	hs := HeadSize(c)
	out := make([]byte, 0, llama2cHeaderSize+4*ParamCount(c))
	for _, v := range []int32{int32(c.Dim), int32(c.HiddenDim), int32(c.Layers), int32(c.Heads), int32(c.KVHeads), vocab, int32(c.SeqLen)} {
		out = binary.LittleEndian.AppendUint32(out, uint32(v))
	}
	put := func(v []float32) {
		for _, x := range v {
			out = binary.LittleEndian.AppendUint32(out, math.Float32bits(x))
		}
	}
	putL := func(v [][]float32) {
		for _, l := range v {
			put(l)
		}
	}
	put(ck.TokenEmbedding)
	putL(ck.AttnNorm)
	putL(ck.Wq)
	putL(ck.Wk)
	putL(ck.Wv)
	putL(ck.Wo)
	putL(ck.FFNNorm)
	putL(ck.W1)
	putL(ck.W2)
	putL(ck.W3)
	put(ck.FinalNorm)
	put(make([]float32, c.SeqLen*hs))
	if !c.SharedClassifier {
		put(ck.Classifier)
	}
	return out
}

// ParamCount is the number of float32 values of a model with config c,
// counting the classifier only when it is not shared.
func ParamCount(c wire.ModelConfig) int64 {
	kv := int64(KVDim(c))
	d, f, L := int64(c.Dim), int64(c.HiddenDim), int64(c.Layers)
	e := int64(max(c.Experts, 1))
	n := int64(c.Vocab)*d + L*(2*d+2*d*d+2*kv*d+3*e*f*d) + d
	if c.Experts > 0 {
		n += L * e * d // gates
	}
	if !c.SharedClassifier {
		n += int64(c.Vocab) * d
	}
	return n
}
