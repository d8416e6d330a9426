package compute

import (
	"testing"
)

// A pass paused after a layer's trunk, with other batches run on the stage
// meanwhile, resumes with BeginAt from its residual plus its experts'
// outputs and gives Forward's logits.
func TestBeginAtResumesAPausedPass(t *testing.T) {
	pool, fused := moeStage(t, 11)
	trunk, err := NewStage(moeConfig, 0, moeConfig.Layers, fused.Embed, trunkOnly(fused.Layers), fused.Head, pool)
	if err != nil {
		t.Fatal(err)
	}
	ws := NewWorkspace(pool)
	dim := moeConfig.Dim
	prompt := tokens32(1, 40, 77, 123, 9)
	want := &Item{Cache: NewCache(moeConfig, moeConfig.Layers), N: len(prompt), Tokens: prompt}
	if err := fused.Forward([]*Item{want}); err != nil {
		t.Fatal(err)
	}
	it := &Item{Cache: NewCache(moeConfig, moeConfig.Layers), N: len(prompt), Tokens: prompt}
	other := &Item{Cache: NewCache(moeConfig, moeConfig.Layers), N: 2, Tokens: tokens32(1, 3)}
	var rows []int32
	var w, x, out []float32
	for l := 0; l < moeConfig.Layers; l++ {
		p, err := trunk.BeginAt([]*Item{it}, l)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Trunk(l); err != nil {
			t.Fatal(err)
		}
		// The experts run on the paused rows; the pass keeps only its residual.
		sum := make([]float32, p.Rows*dim)
		for e, ex := range fused.Layers[l].Experts {
			rows, w = p.Routed(e, rows[:0], w[:0])
			if len(rows) == 0 {
				continue
			}
			x = p.Gather(rows, x)
			out = grow(out, len(rows)*dim)
			if err := ex.Apply(ws, x, len(rows), w, out); err != nil {
				t.Fatal(err)
			}
			for i, r := range rows {
				for c := 0; c < dim; c++ {
					sum[int(r)*dim+c] += out[i*dim+c]
				}
			}
		}
		residual := append([]float32(nil), p.Residual...)
		// Another request's batch uses the stage's scratch meanwhile.
		if l == 0 {
			if err := trunk.Forward([]*Item{other}); err == nil {
				t.Fatal("a stage without experts computed a whole pass")
			}
		}
		for i := range residual {
			residual[i] += sum[i]
		}
		it.Tokens, it.Hidden = nil, residual
	}
	p, err := trunk.BeginAt([]*Item{it}, moeConfig.Layers)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Finish(); err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(it.Logits, want.Logits); d > 1e-4 {
		t.Fatalf("resumed logits differ from Forward's by %g", d)
	}
	if it.Cache.Len() != len(prompt) {
		t.Fatalf("cache holds %d positions, want %d", it.Cache.Len(), len(prompt))
	}
	if _, err := trunk.BeginAt([]*Item{it}, moeConfig.Layers+1); err == nil {
		t.Fatal("pass begun past the stage's layers")
	}
}
