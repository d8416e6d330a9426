package placement

import (
	"context"
	"slices"
)

// PetalsName is the name of the Petals-style strategy.
const PetalsName = "petals"

// Petals is Petals' block selection, a baseline. Servers join one after
// another (in problem order); each loads as many layers as its memory allows
// and announces its throughput with that many. A joining server takes the
// span where the announced throughput, summed per layer, is lowest (the
// span whose sorted per-layer totals are lexicographically smallest). Then
// servers rebalance: one by one, a server moves to the best span for the
// others' totals when that raises the swarm's bottleneck (the lowest
// per-layer total), until a full round moves nobody.
type Petals struct{}

var _ Strategy = Petals{}

// Name implements Strategy.
func (Petals) Name() string { return PetalsName }

// petalsEps makes a server prefer its current span on near-ties, as Petals does.
const petalsEps = 1e-3

// Place implements Strategy; prev is ignored.
func (Petals) Place(_ context.Context, p *Problem, prev *Placement) (*Placement, error) {
	f, nodes, err := compile(p)
	if err != nil {
		return nil, err
	}
	L := p.Model.Layers
	totals := make([]float64, L)
	spans := make([]span, len(nodes))
	tput := make([]float64, len(nodes))
	add := func(s span, v float64) {
		for l := s.first; l < s.end; l++ {
			totals[l] += v
		}
	}
	for k, i := range nodes {
		n := f.limit[i]
		tput[k] = f.capacity[i][n]
		first := petalsBestStart(totals, n)
		spans[k] = span{node: i, first: first, end: first + n}
		add(spans[k], tput[k])
	}
	for round := 0; round < len(nodes)*L; round++ {
		moved := false
		for k := range spans {
			before := slices.Min(totals)
			s := spans[k]
			add(s, -tput[k]*(1+petalsEps))
			first := petalsBestStart(totals, s.layers())
			add(s, tput[k]*petalsEps)
			if first == s.first {
				add(s, tput[k])
				continue
			}
			next := span{node: s.node, first: first, end: first + s.layers()}
			add(next, tput[k])
			if slices.Min(totals) > before*(1+1e-9) {
				spans[k], moved = next, true
				continue
			}
			add(next, -tput[k])
			add(s, tput[k])
		}
		if !moved {
			break
		}
	}
	return finish(f, PetalsName, spans, prev, Strict), nil
}

// petalsBestStart returns the start of the n-layer window whose sorted
// per-layer totals are lexicographically smallest (earliest on ties).
func petalsBestStart(totals []float64, n int) int {
	best := 0
	var bestKey, key []float64
	for s := 0; s+n <= len(totals); s++ {
		key = append(key[:0], totals[s:s+n]...)
		slices.Sort(key)
		if s == 0 || slices.Compare(key, bestKey) < 0 {
			best = s
			bestKey = append(bestKey[:0], key...)
		}
	}
	return best
}
