package compute

import (
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/testmodel"
)

// benchModel synthesizes the benchmark model once per test binary.
var benchModel = sync.OnceValues(func() (*model.Checkpoint, error) {
	return model.Synthesize(testmodel.BenchConfig, testmodel.BenchSeed)
})

// benchStage returns the whole benchmark model as one stage stored in
// dtype, loaded the way executors load it: from fragment blobs.
func benchStage(b *testing.B, dtype string) *Stage {
	b.Helper()
	ck, err := benchModel()
	if err != nil {
		b.Fatal(err)
	}
	st, err := stageFromFragments(ck, dtype, NewPool(0))
	if err != nil {
		b.Fatal(err)
	}
	return st
}

// decodeContext is the positions decode cycles through, as llama-bench's
// tg128 generates 128 tokens from an empty context.
const decodeContext = 128

// BenchmarkDecode measures single-sequence generation: one token per
// forward pass at positions 0..127 in turn, the whole model in one process.
func BenchmarkDecode(b *testing.B) {
	for _, tc := range []struct{ dtype, figure string }{
		{"f32", "decode_tok_s_single"},
		{"f16", "decode_tok_s_f16_single"},
		{"q8_0", "decode_tok_s_q8_single"},
	} {
		b.Run(tc.dtype, func(b *testing.B) {
			st := benchStage(b, tc.dtype)
			cache := NewCache(st.Config, st.Config.Layers)
			toks := testmodel.BenchTokens(decodeContext, testmodel.BenchConfig.Vocab)
			it := &Item{Cache: cache, N: 1}
			step := func(pos int) {
				it.Pos = pos
				it.Tokens = toks[pos : pos+1]
				if err := st.Forward([]*Item{it}); err != nil {
					b.Fatal(err)
				}
			}
			for pos := 0; pos < decodeContext; pos++ { // warm up: grow every buffer
				step(pos)
			}
			runtime.GC() // collect setup garbage now, not while timing
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for i := 0; i < b.N; i++ {
				step(i % decodeContext)
			}
			tps := float64(b.N) / time.Since(start).Seconds()
			b.ReportMetric(tps, "tok/s")
			if b.N >= decodeContext { // a whole cycle of positions
				record(b, tc.figure, tps)
			}
		})
	}
}

// prefillTokens is the prompt length, as llama-bench's pp512.
const prefillTokens = 512

// BenchmarkPrefill measures prompt processing: 512 tokens in one forward
// pass from an empty cache.
func BenchmarkPrefill(b *testing.B) {
	for _, tc := range []struct{ dtype, figure string }{
		{"f32", "prefill_tok_s_single"},
		{"f16", "prefill_tok_s_f16_single"},
		{"q8_0", "prefill_tok_s_q8_single"},
	} {
		b.Run(tc.dtype, func(b *testing.B) {
			st := benchStage(b, tc.dtype)
			cache := NewCache(st.Config, st.Config.Layers)
			it := &Item{Cache: cache, N: prefillTokens, Tokens: testmodel.BenchTokens(prefillTokens, testmodel.BenchConfig.Vocab)}
			if err := st.Forward([]*Item{it}); err != nil {
				b.Fatal(err)
			}
			runtime.GC() // collect setup garbage now, not while timing
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for i := 0; i < b.N; i++ {
				if err := st.Forward([]*Item{it}); err != nil {
					b.Fatal(err)
				}
			}
			tps := float64(b.N*prefillTokens) / time.Since(start).Seconds()
			b.ReportMetric(tps, "tok/s")
			record(b, tc.figure, tps)
		})
	}
}

// best holds this test binary's best figures (go test -count N).
var best benchfig.Best

// record stores a figure in bench/results.json when benchmarks run under
// make bench (TESSERA_BENCH_RESULTS set), keeping the best of the runs.
func record(b *testing.B, name string, v float64) {
	b.Helper()
	if err := best.Higher(map[string]float64{name: v}); err != nil {
		b.Fatal(fmt.Errorf("record %s: %w", name, err))
	}
}
