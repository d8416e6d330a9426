package plancli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
	"github.com/tessera-grid/tessera/services/planner/plancli"
)

const single24 = "../testdata/helix/examples/simulation/config/single24.ini"

func run(t *testing.T, args ...string) (plancli.Result, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := plancli.PlanCommand(context.Background(), args, &out, &errOut)
	var res plancli.Result
	if err == nil {
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		if jerr := json.Unmarshal([]byte(lines[len(lines)-1]), &res); jerr != nil {
			t.Fatalf("last line is not JSON: %v\n%s", jerr, out.String())
		}
	}
	return res, out.String() + errOut.String(), err
}

func TestPlanCommand(t *testing.T) {
	for _, strategy := range placement.StrategyNames() {
		t.Run(strategy, func(t *testing.T) {
			res, out, err := run(t, "--cluster", single24, "--model", "llama2_70b", "--strategy", strategy)
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			if res.Strategy != strategy || res.Model != "llama2_70b" || res.PlanMS <= 0 {
				t.Fatalf("result header %+v", res)
			}
			covered := make([]bool, 80)
			for id, r := range res.Placement {
				n, err := strconv.Atoi(id)
				if err != nil || n < 0 || n >= 24 {
					t.Fatalf("placement key %q is not a ComputeNode index", id)
				}
				if r[0] < 0 || r[1] > 80 || r[0] >= r[1] {
					t.Fatalf("node %s: layers %v", id, r)
				}
				for l := r[0]; l < r[1]; l++ {
					covered[l] = true
				}
			}
			for l, c := range covered {
				if !c {
					t.Fatalf("layer %d not placed", l)
				}
			}
			// The printed flow is the evaluator's flow of the printed placement.
			p, err := plancli.LoadProblem(single24, "llama2_70b")
			if err != nil {
				t.Fatal(err)
			}
			var as []placement.Assignment
			for id, r := range res.Placement {
				as = append(as, placement.Assignment{Node: id, First: r[0], End: r[1]})
			}
			flow, err := placement.Evaluate(p, as, placement.Strict)
			if err != nil {
				t.Fatal(err)
			}
			if d := flow.TokensPerS - res.MaxFlowTokensPerS; d > 1e-6 || d < -1e-6 {
				t.Fatalf("printed flow %v, evaluated %v", res.MaxFlowTokensPerS, flow.TokensPerS)
			}
			if strategy == placement.TesseraName && res.MaxFlowTokensPerS < 1289.56 {
				t.Fatalf("tessera flow %v below the published MILP", res.MaxFlowTokensPerS)
			}
		})
	}
}

func TestPlanCommandErrors(t *testing.T) {
	for name, args := range map[string][]string{
		"no cluster":       {"--model", "llama2_70b"},
		"no model":         {"--cluster", single24},
		"stray argument":   {"--cluster", single24, "--model", "llama2_70b", "extra"},
		"unknown flag":     {"--clusters", single24},
		"unknown strategy": {"--cluster", single24, "--model", "llama2_70b", "--strategy", "random"},
		"unknown model":    {"--cluster", single24, "--model", "gpt5"},
		"missing file":     {"--cluster", "nope.ini", "--model", "llama2_70b"},
	} {
		_, out, err := run(t, args...)
		if err == nil {
			t.Errorf("%s: no error", name)
			continue
		}
		if strings.HasPrefix(name, "no ") || name == "stray argument" || name == "unknown flag" {
			if !errors.Is(err, plancli.ErrUsage) || !strings.Contains(out, "usage:") {
				t.Errorf("%s: err = %v, output %q", name, err, out)
			}
		}
	}
}
