package model

import (
	"encoding/binary"
	"fmt"
	"math"
	"strings"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// synthStd is the standard deviation of synthetic weights, as in GPT-2 and
// llama2.c's training init; residual projections (wo, w2) are scaled down
// by 1/sqrt(2·layers) so that activations stay of order one through depth.
const synthStd = 0.02

// Synthesize returns a dense model of shape c with weights drawn from a
// normal distribution seeded by seed (the same seed gives the same bytes on
// every machine) and norm weights of one. Benchmarks use such models in
// place of trained ones of the same shape: speed depends only on the shape.
func Synthesize(c wire.ModelConfig, seed uint64) (*Checkpoint, error) {
	if err := ValidateConfig(c); err != nil {
		return nil, fmt.Errorf("synthetic model: %w", err)
	}
	if c.Experts > 0 {
		return nil, fmt.Errorf("synthetic model: mixture-of-experts layers are not supported")
	}
	g := newNormalSource(seed)
	L, d, kv, f := c.Layers, c.Dim, KVDim(c), c.HiddenDim
	resid := synthStd / float32(math.Sqrt(2*float64(L)))
	ck := &Checkpoint{Config: c}
	ck.TokenEmbedding = g.fill(c.Vocab*d, synthStd)
	layers := func(n int, std float32) [][]float32 {
		out := make([][]float32, L)
		for i := range out {
			out[i] = g.fill(n, std)
		}
		return out
	}
	ones := func(n int) [][]float32 {
		out := make([][]float32, L)
		for i := range out {
			out[i] = constant(n, 1)
		}
		return out
	}
	// Drawn in file order so that the stream of numbers maps to the file.
	ck.AttnNorm = ones(d)
	ck.Wq = layers(d*d, synthStd)
	ck.Wk = layers(kv*d, synthStd)
	ck.Wv = layers(kv*d, synthStd)
	ck.Wo = layers(d*d, resid)
	ck.FFNNorm = ones(d)
	ck.W1 = layers(f*d, synthStd)
	ck.W2 = layers(d*f, resid)
	ck.W3 = layers(f*d, synthStd)
	ck.FinalNorm = constant(d, 1)
	if c.SharedClassifier {
		ck.Classifier = ck.TokenEmbedding
	} else {
		ck.Classifier = g.fill(c.Vocab*d, synthStd)
	}
	return ck, nil
}

func constant(n int, v float32) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = v
	}
	return out
}

// normalSource draws normal deviates by the Box–Muller transform from a
// splitmix64 stream: both are fixed algorithms, so outputs never change with
// the Go release (math/rand's normal generator is not promised stable).
type normalSource struct {
	state uint64
	spare float64
	has   bool
}

func newNormalSource(seed uint64) *normalSource { return &normalSource{state: seed} }

func (g *normalSource) uint64() uint64 {
	g.state += 0x9E3779B97F4A7C15
	z := g.state
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

// uniform is in (0, 1].
func (g *normalSource) uniform() float64 {
	return (float64(g.uint64()>>11) + 1) / (1 << 53)
}

func (g *normalSource) normal() float64 {
	if g.has {
		g.has = false
		return g.spare
	}
	r := math.Sqrt(-2 * math.Log(g.uniform()))
	s, c := math.Sincos(2 * math.Pi * g.uniform())
	g.spare, g.has = r*s, true
	return r * c
}

// skewed picks an index in [lo, hi) favouring low ones (frequent letters
// and early merges), as real vocabularies build words from common pieces.
func (g *normalSource) skewed(lo, hi int) int {
	u := g.uniform()
	return min(lo+int(float64(hi-lo)*u*u), hi-1)
}

func (g *normalSource) fill(n int, std float32) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = std * float32(g.normal())
	}
	return out
}

// synthAlphabet are the single-character pieces of a synthetic vocabulary:
// printable ASCII, space first, as in sentencepiece vocabularies.
const synthAlphabet = " etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ0123456789.,!?'\"-:;()[]{}<>/\\@#$%^&*_+=|~`"

// maxSynthPiece bounds the length of synthetic merged pieces.
const maxSynthPiece = 16

// SynthesizeTokenizer returns a llama2.c tokenizer file with vocab pieces
// laid out as llama2.c's own: <unk>, <s>, </s> at 0..2, the byte-fallback
// tokens <0x00>..<0xFF> at 3..258, then single characters and pieces made
// by merging two earlier pieces (seeded), with scores that fall with each
// merge so that byte-pair encoding applies them in order. Every piece is
// distinct, so converters that key tokens by text (llama.cpp's) accept it.
func SynthesizeTokenizer(vocab int, seed uint64) ([]byte, error) {
	if vocab < 259 {
		return nil, fmt.Errorf("synthetic tokenizer: vocab %d below the 259 special and byte tokens", vocab)
	}
	if vocab > maxDim {
		return nil, fmt.Errorf("synthetic tokenizer: vocab %d above %d", vocab, maxDim)
	}
	pieces := make([]string, 0, vocab)
	scores := make([]float32, 0, vocab)
	seen := make(map[string]bool, vocab)
	add := func(p string, s float32) {
		pieces = append(pieces, p)
		scores = append(scores, s)
		seen[p] = true
	}
	add("<unk>", 0)
	add("\n<s>\n", 0)
	add("\n</s>\n", 0)
	for b := 0; b < 256; b++ {
		add(fmt.Sprintf("<0x%02X>", b), 0)
	}
	first := len(pieces)
	for _, r := range synthAlphabet {
		if len(pieces) == vocab {
			break
		}
		add(string(r), -1e6)
	}
	g := newNormalSource(seed ^ 0x746f6b656e697a65)
	merges := 0
	for len(pieces) < vocab {
		a, b := pieces[g.skewed(first, len(pieces))], pieces[g.skewed(first, len(pieces))]
		p := a + b
		if len(p) > maxSynthPiece || seen[p] || strings.HasPrefix(p, "<0x") {
			continue
		}
		add(p, -float32(merges))
		merges++
	}
	maxLen := 0
	for _, p := range pieces {
		maxLen = max(maxLen, len(p))
	}
	out := binary.LittleEndian.AppendUint32(nil, uint32(maxLen))
	for i, p := range pieces {
		out = binary.LittleEndian.AppendUint32(out, math.Float32bits(scores[i]))
		out = binary.LittleEndian.AppendUint32(out, uint32(len(p)))
		out = append(out, p...)
	}
	return out, nil
}
