package compute

import (
	"errors"
	"math"
	"testing"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// moeConfig is a small mixture-of-experts model for tests.
var moeConfig = wire.ModelConfig{Dim: 64, HiddenDim: 96, Layers: 3, Heads: 4, KVHeads: 2, Vocab: 300, SeqLen: 64, SharedClassifier: true, Experts: 4, TopK: 2}

// splitRun drives a stage holding no experts the way a grid stage does:
// per layer, the trunk, then each expert (held elsewhere, with its own
// workspace) on the rows that chose it, then the combine. It returns, per
// row and layer, how many experts the row's hidden state was sent to.
type splitRun struct {
	trunk   *Stage
	experts [][]*Expert // [layer][expert]
	ws      *Workspace
	sent    []int // rows reaching an expert, summed over layers
	// held: the trunk stage computes the experts it holds (Pass.FFNHeld)
	// and only the others are sent.
	held bool
}

func (sr *splitRun) forward(t *testing.T, items []*Item) {
	t.Helper()
	p, err := sr.trunk.Begin(items)
	if err != nil {
		t.Fatal(err)
	}
	sr.sent = make([]int, p.Rows)
	var rows []int32
	var w, x, out []float32
	for l := sr.trunk.First; l < sr.trunk.End; l++ {
		if err := p.Trunk(l); err != nil {
			t.Fatal(err)
		}
		if p.K == 0 {
			if err := p.FFN(); err != nil {
				t.Fatal(err)
			}
			continue
		}
		held := make([]bool, len(sr.experts[l-sr.trunk.First]))
		if sr.held {
			var err error
			if held, err = p.FFNHeld(); err != nil {
				t.Fatal(err)
			}
		}
		for e, ex := range sr.experts[l-sr.trunk.First] {
			rows, w = p.Routed(e, rows[:0], w[:0])
			if len(rows) == 0 || held[e] {
				continue
			}
			x = p.Gather(rows, x)
			out = grow(out, len(rows)*sr.trunk.Config.Dim)
			if err := ex.Apply(sr.ws, x, len(rows), w, out); err != nil {
				t.Fatal(err)
			}
			if err := p.Combine(rows, out); err != nil {
				t.Fatal(err)
			}
			for _, r := range rows {
				sr.sent[r]++
			}
		}
	}
	if err := p.Finish(); err != nil {
		t.Fatal(err)
	}
}

func maxDiff(a, b []float32) float64 {
	d := 0.0
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

func tokens32(ids ...int) []int32 {
	out := make([]int32, len(ids))
	for i, v := range ids {
		out[i] = int32(v)
	}
	return out
}

// trunkOnly returns copies of layers without their experts (and dense FFN
// weights), as a stage holds them when its experts live on other nodes.
func trunkOnly(layers []*Layer) []*Layer {
	out := make([]*Layer, len(layers))
	for i, l := range layers {
		c := *l
		c.W1, c.W2, c.W3 = nil, nil, nil
		c.Experts = make([]*Expert, len(l.Experts))
		out[i] = &c
	}
	return out
}

// moeStage synthesizes the test mixture of experts with seed and returns it
// as one whole stage on a two-worker pool (closed when the test ends).
func moeStage(t *testing.T, seed uint64) (*Pool, *Stage) {
	t.Helper()
	ck, err := model.Synthesize(moeConfig, seed)
	if err != nil {
		t.Fatal(err)
	}
	pool := NewPool(2)
	t.Cleanup(pool.Close)
	fused, err := StageFromCheckpoint(ck, 0, moeConfig.Layers, pool)
	if err != nil {
		t.Fatal(err)
	}
	return pool, fused
}

func TestSplitMatchesForwardMoE(t *testing.T) {
	pool, fused := moeStage(t, 7)
	sr := &splitRun{ws: NewWorkspace(pool)}
	for _, l := range fused.Layers {
		sr.experts = append(sr.experts, l.Experts)
	}
	var err error
	sr.trunk, err = NewStage(moeConfig, 0, moeConfig.Layers, fused.Embed, trunkOnly(fused.Layers), fused.Head, pool)
	if err != nil {
		t.Fatal(err)
	}
	// Two requests in one batch: a prefill of 7 and of 3 rows, then decode
	// steps of one row each.
	prompts := [][]int32{tokens32(1, 40, 77, 123, 9, 250, 31), tokens32(1, 200, 5)}
	fc := []*Cache{NewCache(moeConfig, 3), NewCache(moeConfig, 3)}
	sc := []*Cache{NewCache(moeConfig, 3), NewCache(moeConfig, 3)}
	pos := []int{0, 0}
	in := prompts
	used := make([]bool, moeConfig.Experts)
	for step := 0; step < 6; step++ {
		var fi, si []*Item
		for r := range in {
			fi = append(fi, &Item{Cache: fc[r], Pos: pos[r], N: len(in[r]), Tokens: in[r], AllLogits: true})
			si = append(si, &Item{Cache: sc[r], Pos: pos[r], N: len(in[r]), Tokens: in[r], AllLogits: true})
		}
		if err := fused.Forward(fi); err != nil {
			t.Fatal(err)
		}
		sr.forward(t, si)
		for r := range fi {
			if d := maxDiff(fi[r].Logits, si[r].Logits); d > 1e-4 {
				t.Fatalf("step %d item %d: split logits differ from Forward's by %g", step, r, d)
			}
		}
		for r, n := range sr.sent {
			if n != moeConfig.TopK*moeConfig.Layers {
				t.Fatalf("step %d row %d reached %d experts over %d layers, want top_k=%d per layer", step, r, n, moeConfig.Layers, moeConfig.TopK)
			}
		}
		p := &sr.trunk.pass
		for r := 0; r < p.Rows; r++ {
			var sum float32
			for _, c := range p.Choices[r*p.K : (r+1)*p.K] {
				sum += c.Weight
				used[c.Expert] = true
			}
			if math.Abs(float64(sum-1)) > 1e-5 {
				t.Fatalf("row %d weights sum to %g, want 1", r, sum)
			}
		}
		for r := range in {
			pos[r] += len(in[r])
			in[r] = tokens32(int(Argmax(fi[r].Logits[len(fi[r].Logits)-moeConfig.Vocab:])))
		}
	}
	for e, u := range used {
		if !u {
			t.Errorf("expert %d of the last layer never chosen: the gate does not route", e)
		}
	}
}

// A stage holding some experts of its layers computes those itself
// (FFNHeld), counting their arithmetic on the items; with the others
// computed elsewhere the result is Forward's, and rows reach other nodes
// only for the experts the stage lacks.
func TestFFNHeldComputesOwnExperts(t *testing.T) {
	pool, fused := moeStage(t, 11)
	sr := &splitRun{ws: NewWorkspace(pool), held: true}
	trunk := trunkOnly(fused.Layers)
	for i, l := range fused.Layers {
		sr.experts = append(sr.experts, l.Experts)
		trunk[i].Experts[0], trunk[i].Experts[2] = l.Experts[0], l.Experts[2]
	}
	var err error
	sr.trunk, err = NewStage(moeConfig, 0, moeConfig.Layers, fused.Embed, trunk, fused.Head, pool)
	if err != nil {
		t.Fatal(err)
	}
	prompt := tokens32(1, 40, 77, 123, 9, 250, 31, 8, 19, 64)
	fi := &Item{Cache: NewCache(moeConfig, 3), N: len(prompt), Tokens: prompt, AllLogits: true}
	si := &Item{Cache: NewCache(moeConfig, 3), N: len(prompt), Tokens: prompt, AllLogits: true}
	if err := fused.Forward([]*Item{fi}); err != nil {
		t.Fatal(err)
	}
	// Count, per row, the choices of held experts, layer by layer, from a
	// stage that pauses after each trunk.
	heldChoices := make([]int, len(prompt))
	probe, err := NewStage(moeConfig, 0, moeConfig.Layers, fused.Embed, fused.Layers, fused.Head, pool)
	if err != nil {
		t.Fatal(err)
	}
	p, err := probe.Begin([]*Item{{Cache: NewCache(moeConfig, 3), N: len(prompt), Tokens: prompt}})
	if err != nil {
		t.Fatal(err)
	}
	for l := 0; l < moeConfig.Layers; l++ {
		if err := p.Trunk(l); err != nil {
			t.Fatal(err)
		}
		for i, c := range p.Choices {
			if c.Expert == 0 || c.Expert == 2 {
				heldChoices[i/p.K]++
			}
		}
		if err := p.FFN(); err != nil {
			t.Fatal(err)
		}
	}
	sr.forward(t, []*Item{si})
	if d := maxDiff(fi.Logits, si.Logits); d > 1e-4 {
		t.Fatalf("logits differ from Forward's by %g", d)
	}
	total := 0
	for r, n := range sr.sent {
		if want := moeConfig.TopK*moeConfig.Layers - heldChoices[r]; n != want {
			t.Errorf("row %d reached %d experts elsewhere, want %d (%d of its choices are held)", r, n, want, heldChoices[r])
		}
		total += heldChoices[r]
	}
	if total == 0 {
		t.Fatal("no row chose a held expert: the test shows nothing")
	}
	if want := int64(total) * 6 * int64(moeConfig.Dim) * int64(moeConfig.HiddenDim); si.ExpertFLOPs != want {
		t.Fatalf("%d expert FLOPs counted, want %d", si.ExpertFLOPs, want)
	}
}

// groupedDemo returns stories260K's layers split into 4 groups of
// neurons (strided, so that the grouping is not the identity) with a
// seeded random scorer, and the config with FFNGroups 4 and TopK k.
func groupedDemo(t *testing.T, ck *model.Checkpoint, k int) (wire.ModelConfig, []*Layer) {
	t.Helper()
	cfg := ck.Config
	cfg.FFNGroups, cfg.TopK = 4, k
	groups := make([][]int, 4)
	for n := 0; n < cfg.HiddenDim; n++ {
		groups[n%4] = append(groups[n%4], n)
	}
	scorer, err := model.Synthesize(wire.ModelConfig{Dim: cfg.Dim, HiddenDim: 4, Layers: 1, Heads: 1, KVHeads: 1, Vocab: 4, SeqLen: 1}, 3)
	if err != nil {
		t.Fatal(err)
	}
	var layers []*Layer
	for i := 0; i < cfg.Layers; i++ {
		l := LayerFromCheckpoint(ck, i)
		if l.Experts, err = SplitFFN(l, groups); err != nil {
			t.Fatal(err)
		}
		l.Scorer = NewMatrixF32(4, cfg.Dim, scorer.W1[0])
		layers = append(layers, l)
	}
	return cfg, layers
}

func TestSplitGroupsAllActiveReproducesReference(t *testing.T) {
	ck, _ := loadDemo(t)
	cfg, layers := groupedDemo(t, ck, 4)
	pool := NewPool(2)
	defer pool.Close()
	dense, err := StageFromCheckpoint(ck, 0, cfg.Layers, pool)
	if err != nil {
		t.Fatal(err)
	}
	sr := &splitRun{ws: NewWorkspace(pool)}
	for _, l := range layers {
		sr.experts = append(sr.experts, l.Experts)
	}
	sr.trunk, err = NewStage(cfg, 0, cfg.Layers, dense.Embed, trunkOnly(layers), dense.Head, pool)
	if err != nil {
		t.Fatal(err)
	}
	dc, scache := NewCache(cfg, cfg.Layers), NewCache(cfg, cfg.Layers)
	in := tokens32(testmodel.PromptIDs...)
	pos := 0
	for i, want := range testmodel.GreedyIDs {
		di := &Item{Cache: dc, Pos: pos, N: len(in), Tokens: in}
		si := &Item{Cache: scache, Pos: pos, N: len(in), Tokens: in}
		if err := dense.Forward([]*Item{di}); err != nil {
			t.Fatal(err)
		}
		sr.forward(t, []*Item{si})
		if d := maxDiff(di.Logits, si.Logits); d > 1e-4 {
			t.Fatalf("token %d: split logits differ from the dense model's by %g", i, d)
		}
		if got := Argmax(si.Logits); int(got) != want {
			t.Fatalf("token %d: split execution with every group active chose %d, reference %d", i, got, want)
		}
		pos += len(in)
		in = tokens32(want)
	}
}

func TestSplitGroupsMatchesForwardTopK(t *testing.T) {
	ck, _ := loadDemo(t)
	pool := NewPool(2)
	defer pool.Close()
	for _, k := range []int{1, 2, 3} {
		cfg, layers := groupedDemo(t, ck, k)
		fused, err := NewStage(cfg, 0, cfg.Layers, &Embedding{Table: NewMatrixF32(cfg.Vocab, cfg.Dim, ck.TokenEmbedding)}, layers, &Head{Norm: ck.FinalNorm, Classifier: NewMatrixF32(cfg.Vocab, cfg.Dim, ck.Classifier)}, pool)
		if err != nil {
			t.Fatal(err)
		}
		sr := &splitRun{ws: NewWorkspace(pool)}
		for _, l := range layers {
			sr.experts = append(sr.experts, l.Experts)
		}
		if sr.trunk, err = NewStage(cfg, 0, cfg.Layers, fused.Embed, trunkOnly(layers), fused.Head, pool); err != nil {
			t.Fatal(err)
		}
		in := tokens32(testmodel.PromptIDs...)
		fi := &Item{Cache: NewCache(cfg, cfg.Layers), N: len(in), Tokens: in, AllLogits: true}
		si := &Item{Cache: NewCache(cfg, cfg.Layers), N: len(in), Tokens: in, AllLogits: true}
		if err := fused.Forward([]*Item{fi}); err != nil {
			t.Fatal(err)
		}
		sr.forward(t, []*Item{si})
		if d := maxDiff(fi.Logits, si.Logits); d > 1e-4 {
			t.Fatalf("k=%d: split logits differ from Forward's by %g", k, d)
		}
		for r, n := range sr.sent {
			if n != k*cfg.Layers {
				t.Fatalf("k=%d: row %d reached %d groups over %d layers", k, r, n, cfg.Layers)
			}
		}
	}
}

func TestPassOrder(t *testing.T) {
	ck, err := model.Synthesize(moeConfig, 7)
	if err != nil {
		t.Fatal(err)
	}
	s, err := StageFromCheckpoint(ck, 0, moeConfig.Layers, NewPool(1))
	if err != nil {
		t.Fatal(err)
	}
	it := &Item{Cache: NewCache(moeConfig, moeConfig.Layers), N: 1, Tokens: tokens32(5)}
	p, err := s.Begin([]*Item{it})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Trunk(1); !errors.Is(err, ErrPassOrder) {
		t.Fatalf("trunk of layer 1 first: %v, want ErrPassOrder", err)
	}
	if err := p.FFN(); !errors.Is(err, ErrPassOrder) {
		t.Fatalf("FFN before a trunk: %v, want ErrPassOrder", err)
	}
	if err := p.Finish(); !errors.Is(err, ErrPassOrder) {
		t.Fatalf("finish before the layers: %v, want ErrPassOrder", err)
	}
	if err := p.Trunk(0); err != nil {
		t.Fatal(err)
	}
	if err := p.Combine([]int32{1}, make([]float32, moeConfig.Dim)); !errors.Is(err, ErrInput) {
		t.Fatalf("combine into row 1 of a 1-row batch: %v, want ErrInput", err)
	}
	s.Layers[0] = trunkOnly(s.Layers[:1])[0]
	if err := p.FFN(); !errors.Is(err, ErrExpertMissing) {
		t.Fatalf("FFN without the experts: %v, want ErrExpertMissing", err)
	}
}

// A mixture of experts cut into fragments (one per layer trunk, one per
// expert) computes what its checkpoint does, and the manifest describes
// the experts.
func TestMoEFragmentsMatchCheckpoint(t *testing.T) {
	ck, err := model.Synthesize(moeConfig, 7)
	if err != nil {
		t.Fatal(err)
	}
	blobs, man, err := model.Fragments("moe", ck, []byte("tok"), model.FragmentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if el := man.ExpertLayout; el == nil || el.Groups != moeConfig.Experts || el.TopK != moeConfig.TopK || !el.Native {
		t.Fatalf("expert layout %+v", man.ExpertLayout)
	}
	layers := make([]*Layer, moeConfig.Layers)
	var emb *Embedding
	var head *Head
	experts := 0
	for _, b := range blobs {
		f, err := model.DecodeFragment(b.Ref.ID, b.Data)
		if err != nil {
			t.Fatal(err)
		}
		switch b.Ref.Kind {
		case model.KindEmbed:
			emb, err = EmbeddingFromFragment(moeConfig, f)
		case model.KindHead:
			head, err = HeadFromFragment(moeConfig, f)
		case model.KindLayer:
			layers[b.Ref.Layer], err = LayerFromFragment(moeConfig, f)
		case model.KindExpert:
			var ex *Expert
			if ex, err = ExpertFromFragment(moeConfig, f); err == nil {
				if b.Ref.ID != model.ExpertFragment(b.Ref.Layer, b.Ref.Expert) || f.Manifest.Expert != b.Ref.Expert {
					t.Fatalf("expert fragment %s: ref %+v, manifest expert %d", b.Ref.ID, b.Ref, f.Manifest.Expert)
				}
				layers[b.Ref.Layer].Experts[b.Ref.Expert] = ex
				experts++
			}
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if experts != moeConfig.Layers*moeConfig.Experts {
		t.Fatalf("%d expert fragments, want %d", experts, moeConfig.Layers*moeConfig.Experts)
	}
	pool := NewPool(1)
	fromFrags, err := NewStage(moeConfig, 0, moeConfig.Layers, emb, layers, head, pool)
	if err != nil {
		t.Fatal(err)
	}
	fromCk, err := StageFromCheckpoint(ck, 0, moeConfig.Layers, pool)
	if err != nil {
		t.Fatal(err)
	}
	a := &Item{Cache: NewCache(moeConfig, moeConfig.Layers), N: 4, Tokens: tokens32(1, 2, 3, 4), AllLogits: true}
	b := &Item{Cache: NewCache(moeConfig, moeConfig.Layers), N: 4, Tokens: tokens32(1, 2, 3, 4), AllLogits: true}
	if err := fromFrags.Forward([]*Item{a}); err != nil {
		t.Fatal(err)
	}
	if err := fromCk.Forward([]*Item{b}); err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(a.Logits, b.Logits); d != 0 {
		t.Fatalf("fragments' logits differ from the checkpoint's by %g", d)
	}
}

// The fused mixture-of-experts FFN equals a plain reimplementation:
// gate logits, the top_k of them, softmax over those, the weighted sum of
// the chosen experts' SwiGLU outputs, added to the residual.
func TestMoEFFNMatchesReference(t *testing.T) {
	ck, err := model.Synthesize(moeConfig, 11)
	if err != nil {
		t.Fatal(err)
	}
	s, err := StageFromCheckpoint(ck, 0, moeConfig.Layers, NewPool(1))
	if err != nil {
		t.Fatal(err)
	}
	c := moeConfig
	d, h := c.Dim, c.HiddenDim
	it := &Item{Cache: NewCache(c, c.Layers), N: 6, Tokens: tokens32(1, 17, 99, 3, 250, 42)}
	p, err := s.Begin([]*Item{it})
	if err != nil {
		t.Fatal(err)
	}
	for l := 0; l < c.Layers; l++ {
		if err := p.Trunk(l); err != nil {
			t.Fatal(err)
		}
		x := append([]float32(nil), p.Normed...)
		want := append([]float32(nil), p.Residual...)
		for r := 0; r < p.Rows; r++ {
			xr := x[r*d : (r+1)*d]
			logits := make([]float64, c.Experts)
			for e := range logits {
				for i := 0; i < d; i++ {
					logits[e] += float64(ck.Gate[l][e*d+i]) * float64(xr[i])
				}
			}
			chosen := make([]int, 0, c.TopK)
			for len(chosen) < c.TopK {
				best := -1
				for e := range logits {
					taken := false
					for _, ch := range chosen {
						taken = taken || ch == e
					}
					if !taken && (best < 0 || logits[e] > logits[best]) {
						best = e
					}
				}
				chosen = append(chosen, best)
			}
			var z float64
			for _, e := range chosen {
				z += math.Exp(logits[e] - logits[chosen[0]])
			}
			for _, e := range chosen {
				wt := math.Exp(logits[e]-logits[chosen[0]]) / z
				w1, w2, w3 := ck.W1[l][e*h*d:], ck.W2[l][e*d*h:], ck.W3[l][e*h*d:]
				act := make([]float64, h)
				for n := 0; n < h; n++ {
					var a, b float64
					for i := 0; i < d; i++ {
						a += float64(w1[n*d+i]) * float64(xr[i])
						b += float64(w3[n*d+i]) * float64(xr[i])
					}
					act[n] = a / (1 + math.Exp(-a)) * b
				}
				for i := 0; i < d; i++ {
					var o float64
					for n := 0; n < h; n++ {
						o += float64(w2[i*h+n]) * act[n]
					}
					want[r*d+i] += float32(wt * o)
				}
			}
		}
		if err := p.FFN(); err != nil {
			t.Fatal(err)
		}
		if diff := maxDiff(p.Residual, want); diff > 1e-5 {
			t.Fatalf("layer %d: MoE FFN differs from the reference by %g", l, diff)
		}
	}
	if err := p.Finish(); err != nil {
		t.Fatal(err)
	}
}
