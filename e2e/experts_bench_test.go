package e2e

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// BenchmarkGridSelective measures, through the grid, what a token of the
// demo model costs in the executors' usage events (messages and FLOPs,
// prompt included) and its generation rate: whole on one stage, with its
// FFNs cut into 4 neuron groups on 4 executors and all 4 active, and with
// 2 active. Figures: grid_<variant>_{messages,mflops}_per_token and
// grid_<variant>_tok_s for variants whole, groups4_k4, groups4_k2.
func BenchmarkGridSelective(b *testing.B) {
	const groups, tokens = 4, 60
	ck, models := groupedDemoModels(b, groups, "groups4-k4", "groups4-k2")
	g, base := startExpertGrid(b, groups, groups, models)
	cpPath, tpPath, _ := testmodel.Paths()
	if _, err := g.Import(context.Background(), "whole", cpPath, tpPath, nil); err != nil {
		b.Fatal(err)
	}
	waitPlan(b, g, "whole", groups, func(a wire.Assignment, r wire.NodeRecord) error {
		if !slices.Contains(r.Heartbeat.Fragments, fmt.Sprintf("whole/layer.%d", a.End-1)) {
			return fmt.Errorf("node %s has not loaded whole/layer.%d yet", a.Node, a.End-1)
		}
		return nil
	})
	tr := watchTraffic(b, g, ck.Config.Dim, ck.Config.Vocab, groups)
	figures := map[string]float64{}
	for _, v := range []struct{ id, name string }{{"whole", "whole"}, {"groups4-k4", "groups4_k4"}, {"groups4-k2", "groups4_k2"}} {
		// An untimed request first: stages and expert runners start on first use.
		completeGreedy(b, base, v.id, tokens)
		var msgs, flops, gen int64
		var wall time.Duration
		for i := 0; i < b.N; i++ {
			start := time.Now()
			res := completeGreedy(b, base, v.id, tokens)
			wall += time.Since(start)
			tr.wait(b, res.ID)
			fl, _, m := usageTotals(usageOf(b, g, res.ID, tr.contacted(res.ID)))
			msgs, flops, gen = msgs+m, flops+fl, gen+int64(len(res.Tokens))
		}
		figures["grid_"+v.name+"_messages_per_token"] = float64(msgs) / float64(gen)
		figures["grid_"+v.name+"_mflops_per_token"] = float64(flops) / float64(gen) / 1e6
		figures["grid_"+v.name+"_tok_s"] = float64(gen) / wall.Seconds()
		b.Logf("%-10s %.1f messages/token, %.3f MFLOPs/token, %.1f tokens/s", v.id,
			figures["grid_"+v.name+"_messages_per_token"], figures["grid_"+v.name+"_mflops_per_token"], figures["grid_"+v.name+"_tok_s"])
	}
	if err := benchfig.Record(figures); err != nil {
		b.Fatal(err)
	}
}
