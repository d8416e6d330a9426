package helix

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/services/planner/placement"
)

// Benchmarks of the planner. Run them with
//
//	TESSERA_BENCH_RESULTS=$PWD/bench/results.json go test -run '^$' -bench . -benchtime 1x ./services/planner/helix/
//
// from the repository root; each records its figures with benchfig.

var benchFleets = []struct{ name, file string }{
	{"single24", single24},
	{"3cluster24", geo24},
}

var benchModels = []struct{ short, name string }{
	{"70b", "llama2_70b"},
	{"30b", "llama1_30b"},
}

// planCases are the fleets and models BenchmarkPlan plans: both published
// 24-GPU fleets with both models, and the one-type sub-clusters on which
// Helix planned LLaMA-1-30B.
func planCases() []struct{ fleet, file, model, short string } {
	var out []struct{ fleet, file, model, short string }
	for _, fl := range benchFleets {
		for _, m := range benchModels {
			out = append(out, struct{ fleet, file, model, short string }{fl.name, fl.file, m.name, m.short})
		}
	}
	for _, typ := range []string{"a100", "l4", "t4"} {
		out = append(out, struct{ fleet, file, model, short string }{
			"single_" + typ, "artifact_evaluation/single_cluster/config/" + typ + ".ini", "llama1_30b", "30b"})
	}
	return out
}

func record(b *testing.B, figures map[string]float64) {
	b.Helper()
	if err := benchfig.Record(figures); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkPlan plans each published fleet with each model and strategy and
// records the max flow (strict hand-offs; partial inference too) and the
// plan time.
func BenchmarkPlan(b *testing.B) {
	for _, c := range planCases() {
		p := problem(b, c.file, c.model)
		for _, s := range placement.Strategies() {
			b.Run(fmt.Sprintf("%s/%s/%s", c.fleet, c.short, s.Name()), func(b *testing.B) {
				var pl *placement.Placement
				var err error
				for b.Loop() {
					if pl, err = s.Place(context.Background(), p, nil); err != nil {
						b.Fatal(err)
					}
				}
				ms := float64(b.Elapsed().Microseconds()) / 1000 / float64(b.N)
				partial, err := placement.Evaluate(p, pl.Assignments, placement.Partial)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(pl.TokensPerS, "tok/s")
				b.ReportMetric(partial.TokensPerS, "partial-tok/s")
				b.ReportMetric(ms, "ms/plan")
				prefix := fmt.Sprintf("planner_%s_%s_", c.fleet, c.short)
				if s.Name() != placement.TesseraName {
					prefix += s.Name() + "_"
				}
				record(b, map[string]float64{
					prefix + "max_flow_tok_s":         pl.TokensPerS,
					prefix + "partial_max_flow_tok_s": partial.TokensPerS,
					prefix + "plan_ms":                ms,
				})
			})
		}
	}
}

// BenchmarkPlan10k plans a synthetic fleet of 10,000 GPUs (A100, L4 and T4
// in random mixes over 20 regions, Helix's geo link settings) for the
// 80-layer LLaMA-2-70B.
func BenchmarkPlan10k(b *testing.B) {
	m, err := LoadModel("llama2_70b")
	if err != nil {
		b.Fatal(err)
	}
	profiles, err := MachineProfiles()
	if err != nil {
		b.Fatal(err)
	}
	spec := RandomFleetSpec(10000, 20, []string{"A100", "L4", "T4"}, 10000)
	p, err := SyntheticProblem(m, profiles, spec)
	if err != nil {
		b.Fatal(err)
	}
	var pl *placement.Placement
	for b.Loop() {
		if pl, err = (placement.Tessera{}).Place(context.Background(), p, nil); err != nil {
			b.Fatal(err)
		}
	}
	sec := b.Elapsed().Seconds() / float64(b.N)
	b.ReportMetric(sec, "s/plan")
	b.ReportMetric(pl.TokensPerS, "tok/s")
	b.ReportMetric(float64(len(pl.Assignments)), "nodes-used")
	record(b, map[string]float64{"planner_10k_plan_s": sec, "planner_10k_max_flow_tok_s": pl.TokensPerS})
}

// churnTrials is the number of seeded churn trials per fleet.
const churnTrials = 20

// BenchmarkChurn removes 10% of a fleet's GPUs at random, 20 seeded times,
// and compares the incremental re-plan with a plan from scratch: the flow
// ratio (mean and worst trial) and the moved-bytes ratio (all bytes moved
// over all bytes scratch would move, and the mean of the per-trial ratios).
// The headline figures (planner_churn_*) are single24's.
func BenchmarkChurn(b *testing.B) {
	for _, fl := range benchFleets {
		for _, m := range benchModels {
			b.Run(fl.name+"/"+m.short, func(b *testing.B) {
				p := problem(b, fl.file, m.name)
				s := placement.Tessera{}
				prev, err := s.Place(context.Background(), p, nil)
				if err != nil {
					b.Fatal(err)
				}
				var flowSum, flowMin, movedSum, trialSum float64
				var moved, scratch int64
				var replanTime time.Duration
				for b.Loop() {
					rng := rand.New(rand.NewPCG(2025, 10))
					flowSum, movedSum, trialSum, flowMin, moved, scratch, replanTime = 0, 0, 0, 2, 0, 0, 0
					for range churnTrials {
						start := time.Now()
						res, err := placement.ChurnTrial(context.Background(), s, p, prev, 0.1, rng)
						if err != nil {
							b.Fatal(err)
						}
						replanTime += time.Since(start)
						flowSum += res.FlowRatio
						flowMin = min(flowMin, res.FlowRatio)
						trialSum += res.MovedRatio
						moved += res.MovedBytes
						scratch += res.ScratchMovedBytes
					}
					movedSum = float64(moved) / float64(scratch)
				}
				figures := map[string]float64{
					"flow_ratio":             flowSum / churnTrials,
					"flow_ratio_min":         flowMin,
					"moved_ratio":            movedSum,
					"moved_ratio_mean_trial": trialSum / churnTrials,
					"trial_ms":               float64(replanTime.Microseconds()) / 1000 / churnTrials,
				}
				out := map[string]float64{}
				for k, v := range figures {
					b.ReportMetric(v, k)
					out[fmt.Sprintf("planner_churn_%s_%s_%s", fl.name, m.short, k)] = v
					if fl.name == "single24" && m.short == "70b" {
						out["planner_churn_"+k] = v
					}
				}
				record(b, out)
			})
		}
	}
}
