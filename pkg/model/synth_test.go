package model

import (
	"bytes"
	"math"
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
