// Command benchfig records figures of engines Tessera is compared with
// into bench/results.json ($TESSERA_BENCH_RESULTS) and prints the speed
// table of `make bench`:
//
//	benchfig llama-bench PP_NAME TG_NAME < out.jsonl   (llama-bench -o jsonl)
//	benchfig run-c NAME out.txt...                     (llama2.c run.c output)
//	benchfig best ROUND.json...                        (merge rounds)
//	benchfig table                                     (the speed table)
//
// Each records the best of its runs, as Tessera's benchmarks do; best
// merges figures recorded in separate rounds, keeping each one's best
// (the lowest for times, named *_us or *_ms; otherwise the highest).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/tessera-grid/tessera/pkg/benchfig"
)

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "benchfig:", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	path := os.Getenv(benchfig.EnvPath)
	if path == "" {
		return fmt.Errorf("set %s to the results file", benchfig.EnvPath)
	}
	if len(args) == 0 {
		return fmt.Errorf("want llama-bench, run-c or table")
	}
	switch args[0] {
	case "llama-bench":
		if len(args) != 3 {
			return fmt.Errorf("usage: llama-bench PP_NAME TG_NAME < jsonl")
		}
		figs, err := llamaBench(stdin, args[1], args[2])
		if err != nil {
			return err
		}
		return benchfig.RecordTo(path, figs)
	case "run-c":
		if len(args) < 3 {
			return fmt.Errorf("usage: run-c NAME OUTPUT...")
		}
		v, err := runC(args[2:])
		if err != nil {
			return err
		}
		return benchfig.RecordTo(path, map[string]float64{args[1]: v})
	case "best":
		figs, err := bestOf(args[1:])
		if err != nil {
			return err
		}
		return benchfig.RecordTo(path, figs)
	case "table":
		return table(path, stdout)
	}
	return fmt.Errorf("unknown command %q", args[0])
}

// llamaBench reads llama-bench's JSON lines and returns the best prompt
// (n_prompt > 0, no generation) and generation (n_gen > 0) rates.
func llamaBench(r io.Reader, ppName, tgName string) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		var rec struct {
			NPrompt   int       `json:"n_prompt"`
			NGen      int       `json:"n_gen"`
			SamplesTS []float64 `json:"samples_ts"`
		}
		if len(sc.Bytes()) == 0 {
			continue
		}
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			return nil, fmt.Errorf("llama-bench output: %w", err)
		}
		name := ppName
		if rec.NGen > 0 {
			name = tgName
		}
		for _, v := range rec.SamplesTS {
			out[name] = max(out[name], v)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if out[ppName] == 0 || out[tgName] == 0 {
		return nil, fmt.Errorf("llama-bench output lacks a prompt or a generation test")
	}
	return out, nil
}

var achieved = regexp.MustCompile(`achieved tok/s: ([0-9.]+)`)

// runC returns the best "achieved tok/s" of run.c outputs.
func runC(files []string) (float64, error) {
	var best float64
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return 0, err
		}
		m := achieved.FindSubmatch(b)
		if m == nil {
			return 0, fmt.Errorf("%s: no \"achieved tok/s\" line", f)
		}
		v, err := strconv.ParseFloat(string(m[1]), 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", f, err)
		}
		best = max(best, v)
	}
	return best, nil
}

// bestOf reads results files and returns each figure's best value.
func bestOf(files []string) (map[string]float64, error) {
	out := map[string]float64{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var figs map[string]float64
		if err := json.Unmarshal(b, &figs); err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		for k, v := range figs {
			lower := strings.HasSuffix(k, "_us") || strings.HasSuffix(k, "_ms")
			if cur, ok := out[k]; !ok || (lower && v < cur) || (!lower && v > cur) {
				out[k] = v
			}
		}
	}
	return out, nil
}

// table prints Tessera's figures next to the other engines' with ratios.
func table(path string, w io.Writer) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var f map[string]float64
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	num := func(k string) string {
		if v, ok := f[k]; ok {
			return strconv.FormatFloat(v, 'f', 1, 64)
		}
		return "-"
	}
	ratio := func(a, b string) string {
		if f[a] > 0 && f[b] > 0 {
			return strconv.FormatFloat(f[a]/f[b], 'f', 2, 64) + "×"
		}
		return "-"
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "figure (tokens/s)\tTessera\tllama.cpp\tTessera/llama.cpp\tllama2.c\tTessera/llama2.c")
	rows := []struct{ label, ours, cpp, c string }{
		{"decode f32, one process", "decode_tok_s_single", "decode_tok_s_llamacpp", "decode_tok_s_llama2c"},
		{"decode f16, one process", "decode_tok_s_f16_single", "decode_tok_s_f16_llamacpp", ""},
		{"decode q8_0, one process", "decode_tok_s_q8_single", "decode_tok_s_q8_llamacpp", ""},
		{"prefill f32 (512 tokens)", "prefill_tok_s_single", "prefill_tok_s_llamacpp", ""},
		{"prefill q8_0 (512 tokens)", "prefill_tok_s_q8_single", "prefill_tok_s_q8_llamacpp", ""},
		{"decode f32, 3 executors over NATS", "decode_tok_s_pipeline3", "decode_tok_s_llamacpp", ""},
		{"decode q8_0, 3 executors over NATS", "decode_tok_s_q8_pipeline3", "decode_tok_s_q8_llamacpp", ""},
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.label, num(r.ours), num(r.cpp), ratio(r.ours, r.cpp), num(r.c), ratio(r.ours, r.c))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// The pipeline is compared with the same three stages called in one
	// process, measured alternately token by token (so equally disturbed).
	share := func(k string) string {
		if v, ok := f[k]; ok {
			return strconv.FormatFloat(v, 'f', 2, 64) + "×"
		}
		return "-"
	}
	fmt.Fprintf(w, "\npipeline/one process (interleaved): f32 %s, q8_0 %s; per-hop overhead (median): %s µs\n",
		share("decode_pipeline3_vs_direct3"), share("decode_pipeline3_q8_vs_direct3"), num("hop_overhead_p50_us"))
	return nil
}
