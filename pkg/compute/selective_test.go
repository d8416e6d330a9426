package compute

import (
	"fmt"
	"math"
	"math/bits"
	"os"
	"sort"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// selectiveGroups is the group count the selective benchmark uses.
const selectiveGroups = 4

// groupedStage builds stories260K split by g with top-k groups active.
func groupedStage(t testing.TB, ck *model.Checkpoint, g *model.FFNGrouping, k int, pool *Pool) *Stage {
	t.Helper()
	s, err := selectiveStage(ck, g, k, true, pool)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func greedy(t testing.TB, s *Stage, prompt []int32, n int) []int32 {
	t.Helper()
	cache := NewCache(s.Config, s.End-s.First)
	seq := append([]int32(nil), prompt...)
	in := prompt
	for len(seq) < len(prompt)+n {
		it := &Item{Cache: cache, Pos: len(seq) - len(in), N: len(in), Tokens: in}
		if err := s.Forward([]*Item{it}); err != nil {
			t.Fatal(err)
		}
		seq = append(seq, int32(Argmax(it.Logits)))
		in = seq[len(seq)-1:]
	}
	return seq
}

// demoGrouping fits a grouping of stories260K into selectiveGroups groups
// with top-k groups active on n sequences of tokens tokens it samples
// itself, and returns it with the model, its tokenizer, the calibration
// text and a pool that closes when the test ends.
func demoGrouping(t *testing.T, n, tokens, k int) (*model.Checkpoint, *model.Tokenizer, *Pool, [][]int32, *model.FFNGrouping) {
	t.Helper()
	ck, tok := loadDemo(t)
	pool := NewPool(2)
	t.Cleanup(pool.Close)
	calib, err := CalibrationSequences(ck, n, tokens, pool)
	if err != nil {
		t.Fatal(err)
	}
	g, err := FitGrouping(ck, calib, selectiveGroups, k, pool)
	if err != nil {
		t.Fatal(err)
	}
	return ck, tok, pool, calib, g
}

// With every group active, a fitted grouping computes each group on its
// own and still reproduces llama2.c's greedy tokens; the grouping is a
// partition into equal groups, and fitting is deterministic.
func TestSelectiveAllGroupsReproducesReference(t *testing.T) {
	ck, _, pool, calib, g := demoGrouping(t, 4, 64, selectiveGroups)
	g2, _ := FitGrouping(ck, calib, selectiveGroups, selectiveGroups, pool)
	if fmt.Sprint(g.Neurons, g.Scorer) != fmt.Sprint(g2.Neurons, g2.Scorer) {
		t.Fatal("fitting the same calibration twice gave different groupings")
	}
	for l, gs := range g.Neurons {
		for i, ns := range gs {
			if len(ns) != ck.Config.HiddenDim/selectiveGroups {
				t.Fatalf("layer %d group %d has %d neurons, want %d", l, i, len(ns), ck.Config.HiddenDim/selectiveGroups)
			}
		}
	}
	s := groupedStage(t, ck, g, selectiveGroups, pool)
	got := greedy(t, s, tokens32(testmodel.PromptIDs...), len(testmodel.GreedyIDs))
	for i, want := range testmodel.GreedyIDs {
		if int(got[len(testmodel.PromptIDs)+i]) != want {
			t.Fatalf("token %d: %d, reference %d", i, got[len(testmodel.PromptIDs)+i], want)
		}
	}
}

// FitGroupingFor fits the refit of its top-k only, the same as
// FitGrouping's for that k, bit for bit on a pool of another size.
func TestFitGroupingForOneTopK(t *testing.T) {
	ck, _, _, calib, all := demoGrouping(t, 4, 64, 2)
	three := NewPool(3)
	defer three.Close()
	two, err := FitGroupingFor(ck, calib, selectiveGroups, 2, three)
	if err != nil {
		t.Fatal(err)
	}
	if (two.Gate == nil) != (all.Gate == nil) {
		t.Fatalf("fine-tuned gate projections: %v, FitGrouping's %v", two.Gate != nil, all.Gate != nil)
	}
	for l := range two.Gate {
		if maxDiff(two.Gate[l][2], all.Gate[l][2]) != 0 || maxDiff(two.Up[l][2], all.Up[l][2]) != 0 {
			t.Fatalf("layer %d: the gate and up projections for 2 groups differ from FitGrouping's", l)
		}
	}
	for l := range two.Down {
		for k, w := range two.Down[l] {
			if (w != nil) != (k == 2) {
				t.Fatalf("layer %d: refit for %d groups present %v", l, k, w != nil)
			}
		}
		if maxDiff(two.Down[l][2], all.Down[l][2]) != 0 {
			t.Fatalf("layer %d: the refit for 2 groups differs from FitGrouping's", l)
		}
		for m, cp := range two.Comp[l] {
			if cp != nil && bits.OnesCount(uint(m)) != 2 {
				t.Fatalf("layer %d: compensation for set %b of %d groups", l, m, bits.OnesCount(uint(m)))
			}
			if cp != nil && maxDiff(cp.U, all.Comp[l][m].U) != 0 {
				t.Fatalf("layer %d set %b: compensation differs from FitGrouping's", l, m)
			}
		}
	}
}

// selectiveRow is one line of the selective activation table.
type selectiveRow struct {
	k                      int
	flopsSaved, messages   float64
	agreement, kl          float64
	maxLogitDiffToDense    float64
	ffnFLOPs, denseFFNFLOP float64
}

// BenchmarkSelective measures selective activation on stories260K with its
// FFNs in 4 neuron groups: for k = 1..4 active groups, the FFN FLOPs saved
// (the scorer's included), messages per token, and top-1 agreement and mean
// KL divergence against the dense model, teacher-forced on the dense
// model's greedy continuation (60 tokens) of each of 20 prompts
// (testdata/selective_prompts.txt). The grouping is fitted on 2048 sequences
// of 128 tokens sampled from the model itself, none of them a prompt, with
// the refit of every k below 4, each distilled end to end.
//
// Messages per token assume the demo placement: three pipeline stages
// (router → stage 1 → stage 2 → stage 3 → router: 4 messages) and each of a
// layer's 4 groups on an executor of its own, which the stage contacts only
// for chosen groups (k messages per layer; dense contacts all 4).
func BenchmarkSelective(b *testing.B) {
	ck, tok := loadDemo(b)
	pool := NewPool(0)
	defer pool.Close()
	raw, err := os.ReadFile("testdata/selective_prompts.txt")
	if err != nil {
		b.Fatal(err)
	}
	var prompts [][]int32
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		ids := tok.Encode(line, true, false)
		prompts = append(prompts, tokens32(ids...))
	}
	if len(prompts) != 20 {
		b.Fatalf("%d prompts, want 20", len(prompts))
	}
	const cont = 60
	var rows []selectiveRow
	var oracle float64
	for i := 0; i < b.N; i++ {
		calib, err := CalibrationSequences(ck, CalibSequences, CalibTokens, pool)
		if err != nil {
			b.Fatal(err)
		}
		// Every k's refit, each distilled: the table's rows are each
		// what a model imported for that top-k serves.
		ks := []int{1, 2, 3}
		g, err := fitGrouping(ck, calib, selectiveGroups, 2, ks, ks, pool)
		if err != nil {
			b.Fatal(err)
		}
		dense, err := StageFromCheckpoint(ck, 0, ck.Config.Layers, pool)
		if err != nil {
			b.Fatal(err)
		}
		seqs := make([][]int32, len(prompts))
		denseLogits := make([][]float32, len(prompts))
		for p, pr := range prompts {
			seqs[p] = greedy(b, dense, pr, cont)
			denseLogits[p] = allLogits(b, dense, seqs[p])
		}
		rows = rows[:0]
		for k := 1; k <= selectiveGroups; k++ {
			s := groupedStage(b, ck, g, k, pool)
			row := selectiveRow{k: k}
			var agree, n int
			var kl float64
			for p, pr := range prompts {
				lg := allLogits(b, s, seqs[p])
				V := ck.Config.Vocab
				for pos := len(pr) - 1; pos < len(seqs[p])-1; pos++ {
					d, q := denseLogits[p][pos*V:(pos+1)*V], lg[pos*V:(pos+1)*V]
					if Argmax(d) == Argmax(q) {
						agree++
					}
					kl += klDiv(d, q)
					row.maxLogitDiffToDense = max(row.maxLogitDiffToDense, maxDiff(d, q))
					n++
				}
			}
			row.agreement, row.kl = float64(agree)/float64(n), kl/float64(n)
			row.denseFFNFLOP, row.ffnFLOPs = selectiveFLOPs(ck.Config, g, k)
			row.flopsSaved = 1 - row.ffnFLOPs/row.denseFFNFLOP
			row.messages = float64(4 + ck.Config.Layers*k)
			rows = append(rows, row)
		}
		// Headroom: the half of each layer's neurons that contribute most
		// to this token's output, chosen knowing every neuron's output (no
		// groups, no predictor, no compensation).
		var agree, n int
		for p, pr := range prompts {
			lg := topNeuronLogits(b, ck, dense, seqs[p], ck.Config.HiddenDim/2)
			V := ck.Config.Vocab
			for pos := len(pr) - 1; pos < len(seqs[p])-1; pos++ {
				if Argmax(denseLogits[p][pos*V:(pos+1)*V]) == Argmax(lg[pos*V:(pos+1)*V]) {
					agree++
				}
				n++
			}
		}
		oracle = float64(agree) / float64(n)
	}
	b.StopTimer()
	var tbl strings.Builder
	fmt.Fprintf(&tbl, "| k (of %d groups) | FFN FLOPs/token (incl. scorer, compensation) | FFN FLOPs saved | messages/token | top-1 agreement | mean KL (nats) | max logit diff |\n|---|---|---|---|---|---|---|\n", selectiveGroups)
	for _, r := range rows {
		fmt.Fprintf(&tbl, "| %d | %.0f of %.0f | %.1f%% | %.0f | %.2f%% | %.4f | %.2g |\n", r.k, r.ffnFLOPs, r.denseFFNFLOP, 100*r.flopsSaved, r.messages, 100*r.agreement, r.kl, r.maxLogitDiffToDense)
		b.ReportMetric(r.agreement, fmt.Sprintf("k%d_agreement", r.k))
	}
	fmt.Fprintf(&tbl, "\nOracle headroom: the %d neurons of each layer with the largest contribution to each token's output, no groups: %.2f%% top-1 agreement.\n", ck.Config.HiddenDim/2, 100*oracle)
	fmt.Print(tbl.String())
	if path := os.Getenv("TESSERA_SELECTIVE_TABLE"); path != "" {
		if err := os.WriteFile(path, []byte(tbl.String()), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	figs := map[string]float64{
		"selective_k1_agreement":                  rows[0].agreement,
		"selective_k2_agreement":                  rows[1].agreement,
		"selective_k3_agreement":                  rows[2].agreement,
		"selective_k2_ffn_flops_saved":            rows[1].flopsSaved,
		"selective_k2_messages_per_token":         rows[1].messages,
		"dense_messages_per_token":                rows[3].messages,
		"selective_oracle_half_neurons_agreement": oracle,
	}
	if err := benchfig.Record(figs); err != nil {
		b.Fatal(err)
	}
}

// allLogits runs seq through s as one prompt and returns every row's logits.
func allLogits(t testing.TB, s *Stage, seq []int32) []float32 {
	t.Helper()
	it := &Item{Cache: NewCache(s.Config, s.End-s.First), N: len(seq), Tokens: seq, AllLogits: true}
	if err := s.Forward([]*Item{it}); err != nil {
		t.Fatal(err)
	}
	return it.Logits
}

// klDiv is KL(softmax(p) ‖ softmax(q)) in nats.
func klDiv(p, q []float32) float64 {
	lp := make([]float32, len(p))
	lq := make([]float32, len(q))
	LogSoftmax(lp, p)
	LogSoftmax(lq, q)
	var s float64
	for i := range lp {
		s += math.Exp(float64(lp[i])) * float64(lp[i]-lq[i])
	}
	return s
}

// selectiveFLOPs is the dense FFN's FLOPs per token (all layers) and those
// of the top-k groups plus the scorer and the compensation (none when every
// group is active).
func selectiveFLOPs(c wire.ModelConfig, g *model.FFNGrouping, k int) (dense, selective float64) {
	d := float64(c.Dim)
	for l := range g.Neurons {
		dense += 6 * d * float64(c.HiddenDim)
		// Groups are equal (±1 neuron): count the k largest.
		sizes := make([]int, len(g.Neurons[l]))
		for i, ns := range g.Neurons[l] {
			sizes[i] = len(ns)
		}
		for j := 0; j < k; j++ {
			m := 0
			for i := range sizes {
				if sizes[i] > sizes[m] {
					m = i
				}
			}
			selective += 6 * d * float64(sizes[m])
			sizes[m] = -1
		}
		if k < len(g.Neurons[l]) {
			selective += float64(len(g.Neurons[l])) * (2*d + 1)
			// The compensation of the skipped groups (the largest rank).
			rank := 0
			for _, cp := range g.Comp[l] {
				if cp != nil {
					rank = max(rank, cp.R)
				}
			}
			selective += 2 * (2*float64(rank)*d + d)
		}
	}
	return dense, selective
}

// The refit (down projection and compensation of the skipped groups)
// brings a selective model closer to the dense one, on text it was not
// fitted on, and travels in the fragments: the compensation in the layer's,
// each group's refitted columns and fine-tuned rows in the group's.
func TestCompensationLowersDivergence(t *testing.T) {
	ck, tok, pool, _, g := demoGrouping(t, 16, 128, 2)
	bare := *g
	bare.Comp, bare.Down, bare.Gate, bare.Up = nil, nil, nil, nil
	dense, err := StageFromCheckpoint(ck, 0, ck.Config.Layers, pool)
	if err != nil {
		t.Fatal(err)
	}
	var with, without float64
	for _, prompt := range []string{"The dog ran to the park", "Tom had a red ball and"} {
		seq := greedy(t, dense, tokens32(tok.Encode(prompt, true, false)...), 30)
		d := allLogits(t, dense, seq)
		a := allLogits(t, groupedStage(t, ck, g, 2, pool), seq)
		b := allLogits(t, groupedStage(t, ck, &bare, 2, pool), seq)
		V := ck.Config.Vocab
		for p := 0; p < len(seq); p++ {
			with += klDiv(d[p*V:(p+1)*V], a[p*V:(p+1)*V])
			without += klDiv(d[p*V:(p+1)*V], b[p*V:(p+1)*V])
		}
	}
	if with >= 0.9*without {
		t.Fatalf("KL to the dense model: %.3f with compensation, %.3f without", with, without)
	}
	// Its arithmetic is counted on the items, for the stage node's bill.
	for _, tc := range []struct {
		g    *model.FFNGrouping
		want bool
	}{{g, true}, {&bare, false}} {
		seq := tokens32(tok.Encode("Once upon a time", true, false)...)
		it := &Item{Cache: NewCache(ck.Config, ck.Config.Layers), N: len(seq), Tokens: seq}
		if err := groupedStage(t, ck, tc.g, 2, pool).Forward([]*Item{it}); err != nil {
			t.Fatal(err)
		}
		if (it.CompFLOPs > 0) != tc.want {
			t.Fatalf("compensation %v: %d FLOPs counted", tc.want, it.CompFLOPs)
		}
	}
	// Fragments carry it: the layer read back applies the same maps, and
	// each group's holder its refitted down and fine-tuned gate and up
	// projections (here made up, so that they differ from the dense ones).
	tuned := *g
	tuned.Gate, tuned.Up = make([][][]float32, len(g.Down)), make([][][]float32, len(g.Down))
	for l := range tuned.Gate {
		tuned.Gate[l], tuned.Up[l] = make([][]float32, selectiveGroups), make([][]float32, selectiveGroups)
		tuned.Gate[l][2], tuned.Up[l][2] = make([]float32, len(ck.W1[l])), make([]float32, len(ck.W3[l]))
		for i, v := range ck.W1[l] {
			tuned.Gate[l][2][i], tuned.Up[l][2][i] = 1.5*v, -ck.W3[l][i]
		}
	}
	blobs, _, err := model.Fragments("s", ck, nil, model.FragmentOptions{DType: model.DTypeF32, Grouping: &tuned})
	if err != nil {
		t.Fatal(err)
	}
	cfg := ck.Config
	cfg.FFNGroups, cfg.TopK = selectiveGroups, 2
	found, experts := false, 0
	for _, bl := range blobs {
		l, e, err := model.ParseExpertID(bl.Ref.ID)
		isGroup := err == nil && l == 1
		if !isGroup && bl.Ref.ID != model.LayerFragment(1) {
			continue
		}
		f, err := model.DecodeFragment(bl.Ref.ID, bl.Data)
		if err != nil {
			t.Fatal(err)
		}
		if isGroup {
			// A group's fragment carries its columns of the down projection
			// refitted for 2 groups, which its holder uses.
			x, err := ExpertFromFragment(cfg, f)
			if err != nil {
				t.Fatal(err)
			}
			ns := g.Neurons[1][e]
			if want := model.NeuronColumns(g.Down[1][2], cfg.Dim, cfg.HiddenDim, ns); maxDiff(x.W2.F32, want) != 0 {
				t.Fatalf("group %d: the down projection read back is not the refitted one", e)
			}
			if maxDiff(x.W2.F32, model.NeuronColumns(ck.W2[1], cfg.Dim, cfg.HiddenDim, ns)) == 0 {
				t.Fatalf("group %d: the refitted down projection equals the dense one", e)
			}
			if maxDiff(x.W1.F32, model.NeuronRows(tuned.Gate[1][2], cfg.Dim, ns)) != 0 || maxDiff(x.W3.F32, model.NeuronRows(tuned.Up[1][2], cfg.Dim, ns)) != 0 {
				t.Fatalf("group %d: the gate and up projections read back are not the fine-tuned ones", e)
			}
			experts++
			continue
		}
		lay, err := LayerFromFragment(cfg, f)
		if err != nil {
			t.Fatal(err)
		}
		for m, want := range g.Comp[1] {
			if bits.OnesCount(uint(m)) != 2 {
				want = nil // only the sets a 2-group model chooses travel
			}
			got := lay.Comp[m]
			if (want == nil) != (got == nil) || want != nil && (got.R != want.R || maxDiff(got.U, want.U) != 0 || maxDiff(got.V, want.V) != 0 || maxDiff(got.B, want.B) != 0) {
				t.Fatalf("set %d: compensation differs after the fragment", m)
			}
		}
		found = true
	}
	if !found || experts != selectiveGroups {
		t.Fatalf("layer 1: fragment found %v, %d group fragments, want %d", found, experts, selectiveGroups)
	}
}

// topNeuronLogits runs seq through the dense stage with each layer's FFN
// reduced, for every row, to the m neurons whose contributions
// |a_n|·‖W2[:,n]‖ to the row's output are largest, and returns every
// row's logits.
func topNeuronLogits(t testing.TB, ck *model.Checkpoint, dense *Stage, seq []int32, m int) []float32 {
	t.Helper()
	c := ck.Config
	d, h := c.Dim, c.HiddenDim
	it := &Item{Cache: NewCache(c, c.Layers), N: len(seq), Tokens: seq, AllLogits: true}
	p, err := dense.Begin([]*Item{it})
	if err != nil {
		t.Fatal(err)
	}
	all := make([]int32, len(seq))
	for i := range all {
		all[i] = int32(i)
	}
	out := make([]float32, len(seq)*d)
	act := make([]float32, h)
	idx := make([]int, h)
	for l := 0; l < c.Layers; l++ {
		if err := p.Trunk(l); err != nil {
			t.Fatal(err)
		}
		norm := make([]float32, h)
		for n := range norm {
			for i := 0; i < d; i++ {
				norm[n] += ck.W2[l][i*h+n] * ck.W2[l][i*h+n]
			}
		}
		clear(out)
		for r := range seq {
			x := p.Normed[r*d : (r+1)*d]
			for n := range act {
				act[n] = silu(dot(ck.W1[l][n*d:(n+1)*d], x)) * dot(ck.W3[l][n*d:(n+1)*d], x)
				idx[n] = n
			}
			sort.Slice(idx, func(i, j int) bool {
				return act[idx[i]]*act[idx[i]]*norm[idx[i]] > act[idx[j]]*act[idx[j]]*norm[idx[j]]
			})
			o := out[r*d : (r+1)*d]
			for _, n := range idx[:m] {
				for i := range o {
					o[i] += ck.W2[l][i*h+n] * act[n]
				}
			}
		}
		if err := p.Combine(all, out); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Finish(); err != nil {
		t.Fatal(err)
	}
	return it.Logits
}
