package placement

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
)

// ChurnResult is one churn trial: some nodes left, and the strategy
// re-planned incrementally and from scratch.
type ChurnResult struct {
	// Removed lists the IDs of the nodes that left.
	Removed []string
	// Incremental is Place(after, prev); Scratch is Place(after, nil).
	Incremental, Scratch *Placement
	// FlowRatio is Incremental's throughput over Scratch's.
	FlowRatio float64
	// MovedRatio is the bytes Incremental moves over the bytes Scratch
	// moves, both from prev (1 when Scratch moves nothing).
	MovedRatio float64
	// MovedBytes and ScratchMovedBytes are those bytes.
	MovedBytes, ScratchMovedBytes int64
}

// ChurnTrial removes round(fraction × nodes) random nodes (at least one) of
// p, where prev is the plan running on p, and re-plans with s both ways.
func ChurnTrial(ctx context.Context, s Strategy, p *Problem, prev *Placement, fraction float64, rng *rand.Rand) (ChurnResult, error) {
	n := len(p.Nodes)
	k := max(1, int(math.Round(fraction*float64(n))))
	if k >= n {
		return ChurnResult{}, fmt.Errorf("%w: removing %d of %d nodes leaves none", ErrInvalidProblem, k, n)
	}
	gone := map[int]bool{}
	for _, i := range rng.Perm(n)[:k] {
		gone[i] = true
	}
	after := *p
	after.Nodes = nil
	var res ChurnResult
	for i, node := range p.Nodes {
		if gone[i] {
			res.Removed = append(res.Removed, node.ID)
			continue
		}
		after.Nodes = append(after.Nodes, node)
	}
	slices.Sort(res.Removed)
	after.Network.NodeLinks = slices.DeleteFunc(slices.Clone(p.Network.NodeLinks), func(l Link) bool {
		return slices.Contains(res.Removed, l.From) || slices.Contains(res.Removed, l.To)
	})
	var err error
	if res.Incremental, err = s.Place(ctx, &after, prev); err != nil {
		return res, err
	}
	if res.Scratch, err = s.Place(ctx, &after, nil); err != nil {
		return res, err
	}
	res.MovedBytes = MovedBytes(p.Model, prev, res.Incremental)
	res.ScratchMovedBytes = MovedBytes(p.Model, prev, res.Scratch)
	res.FlowRatio = res.Incremental.TokensPerS / res.Scratch.TokensPerS
	res.MovedRatio = 1
	if res.ScratchMovedBytes > 0 {
		res.MovedRatio = float64(res.MovedBytes) / float64(res.ScratchMovedBytes)
	}
	return res, nil
}
