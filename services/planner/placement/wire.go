package placement

import (
	"cmp"
	"slices"
	"time"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Wire converts the placement into the plan message stored in KV plans.
// The nodes holding layer 0 also hold the embedding, those holding the last
// layer the head; each stage lists its replicas by planned flow, highest
// first (spares with no planned flow last, for failover).
func (pl *Placement) Wire(created time.Time, reason string) wire.Plan {
	layers := 0
	if n := len(pl.Stages); n > 0 {
		layers = pl.Stages[n-1].End
	}
	out := wire.Plan{
		Model: pl.Model, Version: pl.Version, Strategy: pl.Strategy, Layers: layers,
		ThroughputTokS: pl.TokensPerS, Created: created, Reason: reason,
	}
	for _, a := range pl.Assignments {
		out.Assignments = append(out.Assignments, wire.Assignment{
			Node: a.Node, First: a.First, End: a.End, Experts: slices.Clone(a.Experts),
			Embed: a.First == 0, Head: a.End == layers,
		})
	}
	for _, st := range pl.Stages {
		replicas := slices.Clone(st.Replicas)
		slices.SortStableFunc(replicas, func(a, b Replica) int { return cmp.Compare(b.TokensPerS, a.TokensPerS) })
		ws := wire.Stage{First: st.First, End: st.End}
		for _, r := range replicas {
			ws.Replicas = append(ws.Replicas, r.Node)
		}
		out.Stages = append(out.Stages, ws)
	}
	return out
}
