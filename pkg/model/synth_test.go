package model

import (
	"bytes"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/pkg/wire"
)

var synthShape = wire.ModelConfig{Dim: 64, HiddenDim: 160, Layers: 3, Heads: 4, KVHeads: 2, Vocab: 600, SeqLen: 128, SharedClassifier: true}

// A synthetic model is a valid llama2.c file, the same for the same seed,
// different for another, with weights scaled like a training init.
func TestSynthesizeIsSeededAndParses(t *testing.T) {
	a, err := Synthesize(synthShape, 7)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Synthesize(synthShape, 7)
	c, _ := Synthesize(synthShape, 8)
	enc := a.Encode()
	if !bytes.Equal(enc, b.Encode()) {
		t.Fatal("same seed gave different models")
	}
	if bytes.Equal(enc, c.Encode()) {
		t.Fatal("different seeds gave the same model")
	}
	back, err := ParseCheckpoint("synth.bin", enc)
	if err != nil {
		t.Fatal(err)
	}
	if back.Config != synthShape {
		t.Fatalf("config %+v, want %+v", back.Config, synthShape)
	}
	var sum, sq float64
	for _, v := range a.Wq[1] {
		sum += float64(v)
		sq += float64(v) * float64(v)
	}
	n := float64(len(a.Wq[1]))
	if mean, std := sum/n, math.Sqrt(sq/n); math.Abs(mean) > 0.002 || math.Abs(std-synthStd) > 0.002 {
		t.Fatalf("wq mean %v std %v, want about 0 and %v", mean, std, synthStd)
	}
	if a.AttnNorm[2][5] != 1 || a.FinalNorm[0] != 1 {
		t.Fatal("norm weights are not one")
	}
	if _, err := Synthesize(wire.ModelConfig{Dim: 10, HiddenDim: 1, Layers: 1, Heads: 3, KVHeads: 1, Vocab: 300, SeqLen: 8}, 1); err == nil {
		t.Fatal("accepted dim not divisible by heads")
	}
}

// The synthetic tokenizer has llama2.c's special and byte tokens where
// llama2.c expects them, distinct pieces, and merges that encoding uses.
func TestSynthesizeTokenizer(t *testing.T) {
	const vocab = 2000
	b, err := SynthesizeTokenizer(vocab, 3)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ParseTokenizer("tok2000.bin", b, vocab)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Piece(3) != "<0x00>" || tok.Piece(13) != "<0x0A>" || tok.Piece(258) != "<0xFF>" || tok.Piece(259) != " " {
		t.Fatalf("pieces 3, 13, 258, 259: %q %q %q %q", tok.Piece(3), tok.Piece(13), tok.Piece(258), tok.Piece(259))
	}
	seen := map[string]bool{}
	for i := 0; i < tok.Vocab(); i++ {
		if seen[tok.Piece(i)] {
			t.Fatalf("piece %d %q repeats", i, tok.Piece(i))
		}
		seen[tok.Piece(i)] = true
	}
	text := "the cat sat on the mat, then ran off."
	ids := tok.Encode(text, true, false)
	if len(ids) >= len(text) {
		t.Fatalf("%d tokens for %d characters: no merges applied", len(ids), len(text))
	}
	if got := tok.DecodeAll(ids[0], ids[1:]); got != text {
		t.Fatalf("decode %q, want %q", got, text)
	}
	again, _ := SynthesizeTokenizer(vocab, 3)
	if !bytes.Equal(b, again) {
		t.Fatal("same seed gave different tokenizers")
	}
	if _, err := SynthesizeTokenizer(100, 1); err == nil {
		t.Fatal("accepted a vocabulary without room for byte tokens")
	}
}

// Fragments refuse a grouping whose refitted down projections, or
// fine-tuned gate and up projections, do not fit the model, naming the
// layer, and write a group's refitted columns and fine-tuned rows for the
// grouping's top-k only.
func TestGroupingDownProjection(t *testing.T) {
	ck, err := Synthesize(synthShape, 7)
	if err != nil {
		t.Fatal(err)
	}
	c := ck.Config
	refit := make([]float32, c.Dim*c.HiddenDim)
	tunedGate := make([]float32, c.HiddenDim*c.Dim)
	tunedUp := make([]float32, c.HiddenDim*c.Dim)
	for i := range refit {
		refit[i], tunedGate[i], tunedUp[i] = float32(i), -float32(i), float32(2*i)
	}
	grouping := func(down, gate func(l int) [][]float32) *FFNGrouping {
		g := &FFNGrouping{TopK: 1}
		for l := 0; l < c.Layers; l++ {
			var ns [][]int
			for gi := 0; gi < 2; gi++ {
				var g []int
				for n := gi; n < c.HiddenDim; n += 2 {
					g = append(g, n)
				}
				ns = append(ns, g)
			}
			g.Neurons = append(g.Neurons, ns)
			g.Scorer = append(g.Scorer, make([]float32, 2*c.Dim))
			g.Bias = append(g.Bias, make([]float32, 2))
			g.Down = append(g.Down, down(l))
			if gate != nil {
				g.Gate = append(g.Gate, gate(l))
				g.Up = append(g.Up, [][]float32{nil, tunedUp})
			}
		}
		return g
	}
	fits := func(int) [][]float32 { return [][]float32{nil, refit} }
	for _, tc := range []struct {
		name       string
		down, gate func(l int) [][]float32
		err        string
	}{
		{"fits", fits, nil, ""},
		{"fits tuned", fits, func(int) [][]float32 { return [][]float32{nil, tunedGate} }, ""},
		{"short", func(l int) [][]float32 { return [][]float32{nil, refit[:l]} }, nil, "layer 0 down projection for 1 groups has 0 values"},
		{"for zero groups", func(int) [][]float32 { return [][]float32{refit, nil} }, nil, "layer 0 down projection for 0 groups"},
		{"wrong count", func(int) [][]float32 { return [][]float32{nil} }, nil, "layer 0 has refitted down projections for 1 group counts, want 2"},
		{"short gate", fits, func(l int) [][]float32 { return [][]float32{nil, tunedGate[:l]} }, "layer 0 gate projection for 1 groups has 0 values"},
		{"gate without up", fits, func(int) [][]float32 { return [][]float32{nil, nil} }, "layer 0 has a fine-tuned up projection for 1 groups without its gate projection"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blobs, _, err := Fragments("m", ck, nil, FragmentOptions{Grouping: grouping(tc.down, tc.gate)})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for _, b := range blobs {
				l, e, err := ParseExpertID(b.Ref.ID)
				if err != nil {
					continue
				}
				f, err := DecodeFragment(b.Ref.ID, b.Data)
				if err != nil {
					t.Fatal(err)
				}
				ns := []int{}
				for x := e; x < c.HiddenDim; x += 2 {
					ns = append(ns, x)
				}
				got, err := f.F32(DownTensor(1), c.Dim, len(ns))
				if err != nil {
					t.Fatalf("layer %d group %d: %v", l, e, err)
				}
				if want := NeuronColumns(refit, c.Dim, c.HiddenDim, ns); !slices.Equal(got, want) {
					t.Fatalf("layer %d group %d: refitted columns differ", l, e)
				}
				if _, _, err := f.Tensor(DownTensor(2)); err == nil {
					t.Fatalf("layer %d group %d carries a down projection for 2 groups", l, e)
				}
				for _, w := range []struct {
					name  string
					tuned []float32
				}{{GateTensor(1), tunedGate}, {UpTensor(1), tunedUp}} {
					got, err := f.F32(w.name, len(ns), c.Dim)
					if tc.gate == nil {
						if err == nil {
							t.Fatalf("layer %d group %d carries %s without a fine-tuned projection", l, e, w.name)
						}
						continue
					}
					if err != nil {
						t.Fatalf("layer %d group %d: %v", l, e, err)
					}
					if want := NeuronRows(w.tuned, c.Dim, ns); !slices.Equal(got, want) {
						t.Fatalf("layer %d group %d: %s differs from the tuned rows", l, e, w.name)
					}
				}
				n++
			}
			if n != 2*c.Layers {
				t.Fatalf("%d group fragments, want %d", n, 2*c.Layers)
			}
		})
	}
}
