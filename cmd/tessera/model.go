package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
)

func modelCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("model: want import, ls or synth")
	}
	switch args[0] {
	case "import":
		return modelImport(ctx, args[1:], stdout, stderr)
	case "ls":
		return modelList(ctx, stdout)
	case "synth":
		return modelSynth(ctx, args[1:], stdout, stderr)
	}
	return fmt.Errorf("model: unknown subcommand %q (want import, ls or synth)", args[0])
}

// connectGrid connects the CLI to the grid named by NATS_URL (default: the
// local grid of `tessera run`).
func connectGrid(ctx context.Context) (*bus.Conn, error) {
	var nc config.NATS
	if err := config.Load(ctx, "", &nc); err != nil {
		return nil, err
	}
	if nc.URL == "" {
		nc.URL = "nats://127.0.0.1:4222"
	}
	return bus.Connect(ctx, nc, nil, "tessera-cli")
}

func modelImport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("model import", flag.ContinueOnError)
	fs.SetOutput(stderr)
	tok := fs.String("tokenizer", "", "tokenizer file (default: tok*.bin or tokenizer.bin beside the checkpoint)")
	id := fs.String("id", "", "model id (default: the file name without extension, lower-case)")
	dtype := fs.String("dtype", model.DTypeF32, "weight storage: f32, f16 or q8_0")
	groups := fs.Int("ffn-groups", 0, "cut each dense FFN into this many neuron groups for selective activation (fitted on text the model samples itself)")
	topK := fs.Int("top-k", 2, "with --ffn-groups: the groups each token activates per layer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("model import: want exactly one checkpoint PATH")
	}
	path := fs.Arg(0)
	if *id == "" {
		*id = strings.ToLower(strings.TrimSuffix(filepath.Base(path), filepath.Ext(path)))
	}
	if *tok == "" {
		matches, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "tok*.bin"))
		if len(matches) == 0 {
			return fmt.Errorf("model import: no tokenizer beside %s; give --tokenizer", path)
		}
		*tok = matches[0]
	}
	c, err := connectGrid(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := fragstore.Open(ctx, c.JS)
	if err != nil {
		return err
	}
	opts := model.FragmentOptions{DType: *dtype}
	if *groups > 1 {
		// Sampling the calibration text, the fit and the distillation
		// take minutes on a few cores, with nothing else to show.
		start := time.Now()
		fmt.Fprintf(stderr, "fitting %d neuron groups per FFN for top-%d (minutes: calibration text, refit, distillation)...\n", *groups, *topK)
		if opts.Grouping, err = fitGrouping(path, *groups, *topK); err != nil {
			return fmt.Errorf("model import: %w", err)
		}
		fmt.Fprintf(stderr, "fitted in %s\n", time.Since(start).Round(time.Second))
	}
	var bar *progressbar.ProgressBar
	m, err := st.ImportCheckpointWith(ctx, *id, path, *tok, opts, func(done, total int64) {
		if bar == nil {
			bar = progressbar.DefaultBytes(total, "importing "+*id)
		}
		_ = bar.Set64(done)
	})
	if bar != nil {
		_ = bar.Finish()
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\nimported %s: %d layers, %d fragments, %d bytes (%s)\n", m.ID, m.Config.Layers, len(m.Fragments), m.TotalBytes, m.DType)
	return nil
}

// fitGrouping cuts the dense checkpoint at path into groups neuron groups
// per FFN with a scorer, the down projections refitted for topK active
// groups and their compensation, fitted on compute.CalibSequences
// sequences the model samples itself and distilled end to end against the
// dense model on them (as the selective benchmark does).
func fitGrouping(path string, groups, topK int) (*model.FFNGrouping, error) {
	ck, err := model.LoadCheckpoint(path)
	if err != nil {
		return nil, err
	}
	pool := compute.NewPool(0)
	defer pool.Close()
	calib, err := compute.CalibrationSequences(ck, compute.CalibSequences, min(compute.CalibTokens, ck.Config.SeqLen), pool)
	if err != nil {
		return nil, err
	}
	return compute.FitGroupingFor(ck, calib, groups, topK, pool)
}

func modelList(ctx context.Context, stdout io.Writer) error {
	c, err := connectGrid(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := fragstore.Open(ctx, c.JS)
	if err != nil {
		return err
	}
	ms, err := st.Manifests(ctx)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MODEL\tDTYPE\tLAYERS\tDIM\tVOCAB\tFRAGMENTS\tBYTES")
	for _, m := range ms {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\n", m.ID, m.DType, m.Config.Layers, m.Config.Dim, m.Config.Vocab, len(m.Fragments), m.TotalBytes)
	}
	return tw.Flush()
}
