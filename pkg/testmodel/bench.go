package testmodel

import "github.com/tessera-grid/tessera/pkg/wire"

// BenchConfig is the shape of the benchmark model: llama2.c's stories110M
// (dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000, context 1024,
// classifier shared with the embedding). Speed depends only on the shape,
// so benchmarks synthesize it (model.Synthesize with BenchSeed), and
// `tessera model synth` writes the same file for other engines.
var BenchConfig = wire.ModelConfig{Dim: 768, HiddenDim: 2048, Layers: 12, Heads: 12, KVHeads: 12, Vocab: 32000, SeqLen: 1024, SharedClassifier: true}

// BenchSeed is the seed of the benchmark model's weights.
const BenchSeed = 1

// BenchTokens returns n fixed pseudo-random token ids below vocab (above
// the special tokens) for benchmark prompts.
func BenchTokens(n, vocab int) []int32 {
	g := uint64(12345)
	out := make([]int32, n)
	for i := range out {
		g ^= g << 13
		g ^= g >> 7
		g ^= g << 17
		out[i] = int32(3 + g%uint64(vocab-3))
	}
	return out
}
