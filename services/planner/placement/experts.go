package placement

import (
	"cmp"
	"slices"
)

// SpreadExperts divides the experts of every layer range among the nodes
// that hold that range, so that one layer's experts live on several nodes
// and a token reaches only the nodes of the experts it chooses. Nodes with
// the same range [First, End) form a group; a group of n nodes is cut into
// min(spread, n) shards and node i of the group holds shard i mod shards,
// so that a group larger than the spread replicates every shard. Experts
// go to shards heaviest first, each to the lightest shard (longest
// processing time first), weighed by 1 plus its counted uses in the range's
// layers (load[layer][expert], may be nil), so that hot experts land on
// different nodes. Groups smaller than 2 nodes, a spread below 2, or a
// model with fewer than 2 experts leave the placement unchanged: every
// node holds all experts of its layers (Experts nil), as dense models
// always do.
func SpreadExperts(pl *Placement, experts, spread int, load [][]int64) {
	if experts < 2 || spread < 2 {
		return
	}
	groups := map[[2]int][]int{}
	var order [][2]int
	for i, a := range pl.Assignments {
		k := [2]int{a.First, a.End}
		if groups[k] == nil {
			order = append(order, k)
		}
		groups[k] = append(groups[k], i)
	}
	for _, k := range order {
		members := groups[k]
		shards := min(spread, len(members), experts)
		if shards < 2 {
			for _, i := range members {
				pl.Assignments[i].Experts = nil
			}
			continue
		}
		cut := ExpertShards(experts, shards, k[0], k[1], load)
		for j, i := range members {
			pl.Assignments[i].Experts = slices.Clone(cut[j%shards])
		}
	}
}

// ExpertShards cuts experts 0..experts-1 into n shards of about equal load
// (see SpreadExperts), each sorted ascending.
func ExpertShards(experts, n, first, end int, load [][]int64) [][]int {
	weight := make([]int64, experts)
	for e := range weight {
		weight[e] = 1
		for l := first; l < end && l < len(load); l++ {
			if e < len(load[l]) {
				weight[e] += load[l][e]
			}
		}
	}
	byWeight := make([]int, experts)
	for e := range byWeight {
		byWeight[e] = e
	}
	slices.SortStableFunc(byWeight, func(a, b int) int { return cmp.Compare(weight[b], weight[a]) })
	shards := make([][]int, n)
	total := make([]int64, n)
	for _, e := range byWeight {
		lightest := 0
		for s := 1; s < n; s++ {
			if total[s] < total[lightest] || (total[s] == total[lightest] && len(shards[s]) < len(shards[lightest])) {
				lightest = s
			}
		}
		shards[lightest] = append(shards[lightest], e)
		total[lightest] += weight[e]
	}
	for _, s := range shards {
		slices.Sort(s)
	}
	return shards
}
