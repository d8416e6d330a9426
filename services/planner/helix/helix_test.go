package helix

import (
	"encoding/csv"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

// fixtures is where the Helix files copied for tests live.
const fixtures = "../testdata/helix"

func readCSV(t *testing.T, name string) []map[string]string {
	t.Helper()
	f, err := os.Open(filepath.Join(fixtures, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]string
	for _, r := range rows[1:] {
		m := map[string]string{}
		for i, h := range rows[0] {
			m[h] = r[i]
		}
		out = append(out, m)
	}
	return out
}

func num(t *testing.T, s string) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestTypicalThroughputMatchesHelix checks the §8.1 model against every row
// Helix's own model manager produced, bit for bit.
func TestTypicalThroughputMatchesHelix(t *testing.T) {
	rows := readCSV(t, "derived/typical_throughput.csv")
	if len(rows) < 100 {
		t.Fatalf("only %d rows", len(rows))
	}
	models := map[string]*Model{}
	tps := map[string]*Throughput{}
	for _, row := range rows {
		name := row["model"]
		if models[name] == nil {
			m, err := LoadModel(name)
			if err != nil {
				t.Fatal(err)
			}
			models[name] = m
		}
		key := name + "|" + row["machine_mix"]
		if tps[key] == nil {
			mix, err := ParseMix(row["machine_mix"])
			if err != nil {
				t.Fatal(err)
			}
			if tps[key], err = NewThroughput(models[name], mix); err != nil {
				t.Fatal(err)
			}
		}
		k, _ := strconv.Atoi(row["num_layers"])
		got, err := tps[key].Typical(row["machine_type"], k)
		if err != nil {
			t.Fatalf("%s: %v", key, err)
		}
		checks := []struct {
			col string
			got float64
		}{
			{"typical_tokens_per_s", got.TokensPerS},
			{"prompt_typical_requests", got.PromptRequests},
			{"prompt_typical_tokens", float64(got.PromptTokens)},
			{"decode_typical_tokens", float64(got.DecodeTokens)},
			{"kv_cache_capacity_token_layers", float64(got.KVCapacity)},
			{"prompt_max_requests", float64(got.PromptMaxRequests)},
			{"prompt_max_tokens", float64(got.PromptMaxTokens)},
			{"decode_max_tokens", float64(got.DecodeMaxTokens)},
			{"decode_max_context", float64(got.DecodeMaxContext)},
		}
		for _, c := range checks {
			if want := num(t, row[c.col]); c.got != want {
				t.Errorf("%s %s k=%d %s = %v, want %v", key, row["machine_type"], k, c.col, c.got, want)
			}
		}
	}
}

// TestMaxFlowMatchesReference evaluates every stored placement and compares
// with the reference max flow, strict and with partial inference.
func TestMaxFlowMatchesReference(t *testing.T) {
	profiles, err := MachineProfiles()
	if err != nil {
		t.Fatal(err)
	}
	for _, row := range readCSV(t, "derived/maxflow_reference.csv") {
		t.Run(row["setup"], func(t *testing.T) {
			m, err := LoadModel(row["model"])
			if err != nil {
				t.Fatal(err)
			}
			mix, err := ParseMix(row["machine_mix"])
			if err != nil {
				t.Fatal(err)
			}
			c, err := LoadCluster(filepath.Join(fixtures, row["cluster_file"]))
			if err != nil {
				t.Fatal(err)
			}
			p, err := c.Problem(m, profiles, mix)
			if err != nil {
				t.Fatal(err)
			}
			sol, err := LoadSolution(filepath.Join(fixtures, row["solution_file"]))
			if err != nil {
				t.Fatal(err)
			}
			for _, tc := range []struct {
				mode placement.FlowMode
				col  string
			}{{placement.Strict, "milp_flow_strict_tokens_per_s"}, {placement.Partial, "milp_flow_partial_tokens_per_s"}} {
				flow, err := placement.Evaluate(p, sol.Assignments(), tc.mode)
				if err != nil {
					t.Fatal(err)
				}
				want := num(t, row[tc.col])
				if !close(flow.TokensPerS, want, 1e-3) {
					t.Errorf("%s flow = %.4f, want %.4f", tc.mode, flow.TokensPerS, want)
				}
			}
		})
	}
}

// close reports whether got is within rel of want (or both are ~0).
func close(got, want, rel float64) bool {
	d := got - want
	if d < 0 {
		d = -d
	}
	return d <= rel*max(want, 1e-6) || (want == 0 && d < 1e-6)
}
