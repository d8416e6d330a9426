package placement

import (
	"cmp"
	"context"
	"math"
	"slices"
)

// ExoName is the name of the exo-style strategy.
const ExoName = "exo"

// Exo is exo's ring-memory-weighted partitioning, a baseline: every
// eligible node joins one pipeline, ordered by memory (largest first, ties
// by ID, both descending), and takes a contiguous share of the layers in
// proportion to its memory. It ignores speed, links and layer limits.
type Exo struct{}

var _ Strategy = Exo{}

// Name implements Strategy.
func (Exo) Name() string { return ExoName }

// Place implements Strategy; prev is ignored.
func (Exo) Place(_ context.Context, p *Problem, prev *Placement) (*Placement, error) {
	f, nodes, err := compile(p)
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(nodes, func(a, b int) int {
		na, nb := &p.Nodes[a], &p.Nodes[b]
		if c := cmp.Compare(nb.MemoryBytes, na.MemoryBytes); c != 0 {
			return c
		}
		return cmp.Compare(nb.ID, na.ID)
	})
	total := 0.0
	for _, i := range nodes {
		total += float64(p.Nodes[i].MemoryBytes)
	}
	L := p.Model.Layers
	var spans []span
	at := 0.0
	for k, i := range nodes {
		// exo rounds the cumulative share to 5 decimals before cutting.
		end := math.Round((at+float64(p.Nodes[i].MemoryBytes)/total)*1e5) / 1e5
		first, last := int(at*float64(L)), int(end*float64(L))
		if k == len(nodes)-1 {
			last = L
		}
		if first < last {
			spans = append(spans, span{node: i, first: first, end: last})
		}
		at = end
	}
	if n := len(spans); n > 0 && spans[n-1].end < L {
		spans[n-1].end = L // the last shard always reaches the last layer
	}
	return finish(f, ExoName, spans, prev, Strict), nil
}
