package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/pkg/benchfig"
)

// The comparison figures are the best samples of llama-bench and run.c
// output, and the table shows them with Tessera's and the ratios.
func TestRecordsComparisonFiguresAndPrintsTable(t *testing.T) {
	dir := t.TempDir()
	results := filepath.Join(dir, "results.json")
	t.Setenv(benchfig.EnvPath, results)
	if err := benchfig.RecordTo(results, map[string]float64{"decode_tok_s_single": 60, "decode_tok_s_pipeline3": 57, "decode_pipeline3_vs_direct3": 0.95}); err != nil {
		t.Fatal(err)
	}
	jsonl := `{"n_prompt": 512, "n_gen": 0, "samples_ts": [300.5, 512.25]}
{"n_prompt": 0, "n_gen": 128, "samples_ts": [70, 75, 72]}
`
	if err := run([]string{"llama-bench", "prefill_tok_s_llamacpp", "decode_tok_s_llamacpp"}, strings.NewReader(jsonl), nil); err != nil {
		t.Fatal(err)
	}
	var outs []string
	for i, v := range []string{"21.5", "24.0"} {
		p := filepath.Join(dir, "run"+string(rune('0'+i)))
		if err := os.WriteFile(p, []byte("Once upon a time\nachieved tok/s: "+v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		outs = append(outs, p)
	}
	if err := run(append([]string{"run-c", "decode_tok_s_llama2c"}, outs...), nil, nil); err != nil {
		t.Fatal(err)
	}
	var table bytes.Buffer
	if err := run([]string{"table"}, nil, &table); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"decode f32, one process", "60.0", "75.0", "0.80×", "24.0", "2.50×", "pipeline/one process (interleaved): f32 0.95×"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	r1, r2 := filepath.Join(dir, "r1.json"), filepath.Join(dir, "r2.json")
	if err := benchfig.RecordTo(r1, map[string]float64{"decode_tok_s_single": 50, "hop_overhead_p50_us": 40}); err != nil {
		t.Fatal(err)
	}
	if err := benchfig.RecordTo(r2, map[string]float64{"decode_tok_s_single": 65, "hop_overhead_p50_us": 55}); err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"best", r1, r2}, nil, nil); err != nil {
		t.Fatal(err)
	}
	got, err := bestOf([]string{results})
	if err != nil {
		t.Fatal(err)
	}
	if got["decode_tok_s_single"] != 65 || got["hop_overhead_p50_us"] != 40 || got["decode_tok_s_llamacpp"] != 75 {
		t.Fatalf("after merging rounds: %v", got)
	}
	if err := run([]string{"llama-bench", "a", "b"}, strings.NewReader(`{"n_prompt": 512, "n_gen": 0, "samples_ts": [1]}`), nil); err == nil {
		t.Fatal("accepted llama-bench output without a generation test")
	}
}
