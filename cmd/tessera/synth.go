package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// modelSynth writes a dense model with seeded random weights in llama2.c's
// format, with a matching tokenizer, so that llama2.c's run.c, llama.cpp's
// converter and Tessera all run the very same file.
func modelSynth(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("model synth", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c wire.ModelConfig
	fs.IntVar(&c.Dim, "dim", 768, "model width")
	fs.IntVar(&c.Layers, "layers", 12, "transformer layers")
	fs.IntVar(&c.Heads, "heads", 12, "attention heads")
	fs.IntVar(&c.KVHeads, "kv-heads", 0, "key/value heads (0: as many as --heads)")
	fs.IntVar(&c.HiddenDim, "hidden", 2048, "feed-forward width")
	fs.IntVar(&c.Vocab, "vocab", 32000, "vocabulary size (at least 259)")
	fs.IntVar(&c.SeqLen, "seq-len", 1024, "context length")
	shared := fs.Bool("shared-classifier", true, "the classifier reuses the token embedding")
	seed := fs.Uint64("seed", 1, "random seed")
	out := fs.String("out", ".", "output directory")
	name := fs.String("name", "", "file name stem (default synth-<dim>x<layers>)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("model synth: unexpected argument %q", fs.Arg(0))
	}
	if c.KVHeads == 0 {
		c.KVHeads = c.Heads
	}
	c.SharedClassifier = *shared
	if *name == "" {
		*name = fmt.Sprintf("synth-%dx%d", c.Dim, c.Layers)
	}
	ck, err := model.Synthesize(c, *seed)
	if err != nil {
		return err
	}
	tok, err := model.SynthesizeTokenizer(c.Vocab, *seed)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	ckPath := filepath.Join(*out, *name+".bin")
	tokPath := filepath.Join(*out, "tok"+fmt.Sprint(c.Vocab)+".bin")
	if err := os.WriteFile(ckPath, ck.Encode(), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(tokPath, tok, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s (%d parameters) and %s\n", ckPath, model.ParamCount(c), tokPath)
	return nil
}
