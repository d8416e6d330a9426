package compute

import (
	"math"
	"testing"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/testmodel"
)

func loadDemo(t testing.TB) (*model.Checkpoint, *model.Tokenizer) {
	t.Helper()
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	ck, err := model.LoadCheckpoint(cp)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := model.LoadTokenizer(tp, ck.Config.Vocab)
	if err != nil {
		t.Fatal(err)
	}
	return ck, tok
}

// pipeline runs tokens through stages in order, each with its own cache,
// and returns the last stage's logits (last row).
type pipeline struct {
	stages []*Stage
	caches []*Cache
}

func newPipeline(t testing.TB, ck *model.Checkpoint, cuts ...int) *pipeline {
	t.Helper()
	pool := NewPool(0)
	p := &pipeline{}
	bounds := append(append([]int{0}, cuts...), ck.Config.Layers)
	for i := 0; i+1 < len(bounds); i++ {
		s, err := StageFromCheckpoint(ck, bounds[i], bounds[i+1], pool)
		if err != nil {
			t.Fatal(err)
		}
		p.stages = append(p.stages, s)
		p.caches = append(p.caches, NewCache(ck.Config, bounds[i+1]-bounds[i]))
	}
	return p
}

func (p *pipeline) step(t testing.TB, pos int, toks []int) []float32 {
	t.Helper()
	in := make([]int32, len(toks))
	for i, v := range toks {
		in[i] = int32(v)
	}
	it := &Item{Pos: pos, N: len(toks), Tokens: in}
	for i, s := range p.stages {
		it.Cache = p.caches[i]
		if i > 0 {
			it.Tokens = nil
		}
		if err := s.Forward([]*Item{it}); err != nil {
			t.Fatal(err)
		}
	}
	return it.Logits
}

func TestGreedyMatchesReference(t *testing.T) {
	ck, _ := loadDemo(t)
	for _, tc := range []struct {
		name     string
		cuts     []int
		portable bool
	}{
		{"one stage", nil, false},
		{"three stages", []int{2, 4}, false},
		{"five stages", []int{1, 2, 3, 4}, false},
		{"portable kernels", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.portable {
				saved := simd
				simd.avx2 = false
				defer func() { simd = saved }()
			}
			p := newPipeline(t, ck, tc.cuts...)
			logits := p.step(t, 0, testmodel.PromptIDs)
			pos := len(testmodel.PromptIDs)
			for i, want := range testmodel.GreedyIDs {
				got := Argmax(logits)
				if got != want {
					t.Fatalf("step %d: got token %d, want %d", i, got, want)
				}
				if d := math.Abs(float64(logits[got] - testmodel.GreedyTopLogits[i])); d > 1e-3 {
					t.Fatalf("step %d: top logit %v, reference %v", i, logits[got], testmodel.GreedyTopLogits[i])
				}
				logits = p.step(t, pos, []int{got})
				pos++
			}
		})
	}
}

// Decoding token by token and prefilling the prompt as one batch give the
// same logits, and batching two requests changes neither.
func TestBatchEqualsSequential(t *testing.T) {
	ck, _ := loadDemo(t)
	seq := append(append([]int{}, testmodel.PromptIDs...), testmodel.GreedyIDs[:10]...)
	one := newPipeline(t, ck)
	var want []float32
	for i, tok := range seq {
		want = one.step(t, i, []int{tok})
	}
	s := one.stages[0]
	a, b := NewCache(ck.Config, ck.Config.Layers), NewCache(ck.Config, ck.Config.Layers)
	toks := make([]int32, len(seq))
	for i, v := range seq {
		toks[i] = int32(v)
	}
	// a: whole sequence as one prefill; b: prompt prefill, then batched with a's re-run.
	itA := &Item{Cache: a, Pos: 0, N: len(toks), Tokens: toks}
	itB := &Item{Cache: b, Pos: 0, N: 5, Tokens: toks[:5]}
	if err := s.Forward([]*Item{itA, itB}); err != nil {
		t.Fatal(err)
	}
	for pos := 5; pos < len(toks); pos++ {
		itB = &Item{Cache: b, Pos: pos, N: 1, Tokens: toks[pos : pos+1]}
		itA = &Item{Cache: a, Pos: pos, N: 1, Tokens: toks[pos : pos+1]} // recompute a's tail
		if err := s.Forward([]*Item{itB, itA}); err != nil {
			t.Fatal(err)
		}
	}
	for _, got := range [][]float32{itA.Logits, itB.Logits} {
		for i := range want {
			if d := math.Abs(float64(got[i] - want[i])); d > 1e-4 {
				t.Fatalf("logit %d: %v vs sequential %v", i, got[i], want[i])
			}
		}
	}
}

func TestCacheMissAndBadInput(t *testing.T) {
	ck, _ := loadDemo(t)
	p := newPipeline(t, ck, 2)
	c := NewCache(ck.Config, 3)
	h := make([]float32, ck.Config.Dim)
	err := p.stages[1].Forward([]*Item{{Cache: c, Pos: 4, N: 1, Hidden: h}})
	if err == nil {
		t.Fatal("want a cache-miss error")
	}
	err = p.stages[0].Forward([]*Item{{Cache: NewCache(ck.Config, 2), Pos: 0, N: 1, Tokens: []int32{9999}}})
	if err == nil {
		t.Fatal("want an error for a token outside the vocabulary")
	}
	err = p.stages[0].Forward([]*Item{{Cache: NewCache(ck.Config, 2), Pos: ck.Config.SeqLen, N: 1, Tokens: []int32{1}}})
	if err == nil {
		t.Fatal("want an error for a position past the context")
	}
}

// Sampling with run.c's generator reproduces its sampled story.
func TestSampledMatchesReference(t *testing.T) {
	ck, tok := loadDemo(t)
	p := newPipeline(t, ck)
	s := NewSampler(1.0, 0.9, 133742)
	prev := model.TokenBOS
	logits := p.step(t, 0, []int{prev})
	var out []int
	// run.c -n 256: a forward pass and a sample at each of positions 0..255.
	for pos := 1; pos <= 256; pos++ {
		next := s.Sample(logits)
		if next == model.TokenBOS {
			break
		}
		out = append(out, next)
		if pos < 256 {
			logits = p.step(t, pos, []int{next})
		}
	}
	got := tok.DecodeAll(model.TokenBOS, out)
	if got != testmodel.SampledText {
		t.Fatalf("sampled text differs:\n got %q\nwant %q", got, testmodel.SampledText)
	}
}
