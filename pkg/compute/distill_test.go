package compute

import (
	"math"
	"testing"
)

// The distillation's float64 selective model computes what the stage
// computes, and its backward pass gives the gradient of the KL divergence
// from the dense model (central differences, the choice held fixed) for
// every trainable tensor of every layer.
func TestDistillGradient(t *testing.T) {
	ck, _ := loadDemo(t)
	pool := NewPool(1)
	defer pool.Close()
	calib, err := CalibrationSequences(ck, 4, 48, pool)
	if err != nil {
		t.Fatal(err)
	}
	g, err := FitGroupingFor(ck, calib, selectiveGroups, 2, pool)
	if err != nil {
		t.Fatal(err)
	}
	net, err := newDnet(ck, g, 2)
	if err != nil {
		t.Fatal(err)
	}
	seq := calib[1][:24]
	tp := net.forward(seq, nil)
	got := allLogits(t, groupedStage(t, ck, g, 2, pool), seq)
	for i, v := range got {
		if math.Abs(float64(v)-tp.logits[i]) > 1e-3 {
			t.Fatalf("logit %d: %g, the stage's %g", i, tp.logits[i], v)
		}
	}
	dense, err := StageFromCheckpoint(ck, 0, ck.Config.Layers, pool)
	if err != nil {
		t.Fatal(err)
	}
	teacher := allLogits(t, dense, seq)
	V := ck.Config.Vocab
	fixed := make([][]int, len(tp.ls))
	for l, lt := range tp.ls {
		fixed[l] = lt.sets
	}
	scale := 1 / float64(len(seq))
	dl := make([]float64, len(tp.logits))
	distillLoss(tp.logits, teacher, V, distillTop1, scale, dl)
	gr := net.newGrad()
	net.backward(tp, dl, gr)
	loss := func() float64 {
		tq := net.forward(seq, fixed)
		return scale * distillLoss(tq.logits, teacher, V, distillTop1, scale, make([]float64, len(tq.logits)))
	}
	const eps = 1e-5
	grads := gr.flat()
	for i, p := range net.params() {
		for _, j := range []int{0, len(p) / 3, len(p) - 1, (7919 * (i + 1)) % len(p)} {
			old := p[j]
			p[j] = old + eps
			up := loss()
			p[j] = old - eps
			down := loss()
			p[j] = old
			num, an := (up-down)/(2*eps), grads[i][j]
			if math.Abs(num-an) > 1e-4*math.Max(math.Abs(num)+math.Abs(an), 1e-6) {
				t.Fatalf("tensor %d [%d]: gradient %.6e, central difference %.6e", i, j, an, num)
			}
		}
	}
}

// Distillation never leaves the selective model farther from the dense
// one on its calibration text than the refit alone: with little text (4
// sequences, where training overfits) it keeps the refit exactly, with
// more (64) it comes closer, its gate and up projections trained too.
func TestDistillNoWorseThanRefit(t *testing.T) {
	ck, _ := loadDemo(t)
	pool := NewPool(0)
	defer pool.Close()
	dense, err := StageFromCheckpoint(ck, 0, ck.Config.Layers, pool)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{4, 64} {
		calib, err := CalibrationSequences(ck, n, 64, pool)
		if err != nil {
			t.Fatal(err)
		}
		refit, err := fitGrouping(ck, calib, selectiveGroups, 2, []int{2}, nil, pool)
		if err != nil {
			t.Fatal(err)
		}
		distilled, err := FitGroupingFor(ck, calib, selectiveGroups, 2, pool)
		if err != nil {
			t.Fatal(err)
		}
		kl, err := selectiveKL(ck, calib, 2, dense, pool, refit, distilled)
		if err != nil {
			t.Fatal(err)
		}
		before, after := kl[0], kl[1]
		if n == 4 && after != before {
			t.Fatalf("%d sequences: mean KL %.6f after distillation, %.6f before: the refit was not kept", n, after, before)
		}
		if n == 64 && after >= before {
			t.Fatalf("%d sequences: mean KL %.6f after distillation, %.6f before: no closer", n, after, before)
		}
		// The gate and up projections are trained with the rest, or kept
		// with the refit (the dense ones).
		if tuned := distilled.Gate != nil; tuned != (n == 64) {
			t.Fatalf("%d sequences: fine-tuned gate projections %v", n, tuned)
		}
		for l := range distilled.Gate {
			if maxDiff(distilled.Gate[l][2], ck.W1[l]) == 0 || maxDiff(distilled.Up[l][2], ck.W3[l]) == 0 {
				t.Fatalf("layer %d: the gate or up projection was not trained", l)
			}
		}
		t.Logf("%d sequences: mean KL %.4f before distillation, %.4f after", n, before, after)
	}
}
