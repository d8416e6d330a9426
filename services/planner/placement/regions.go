package placement

import (
	"slices"
)

// mergeAllNodes is the fleet size up to which regions that can serve alone
// still try joining others: on small fleets a joint pipeline can beat
// separate ones (coarse layer counts waste less), on large ones it cannot
// pay for its slow crossings and costs too much to try.
const mergeAllNodes = 256

// regionChains decides which regions form a pipeline together. A region
// that cannot hold the whole model joins the pipeline it helps most; on
// small fleets, so may any region when that raises the total. Merging stops
// when no merge raises the total throughput.
func regionChains(f *Fleet, nw *network, byRegion map[int][]*class) []*chain {
	var regions []int
	for r := range byRegion {
		regions = append(regions, r)
	}
	slices.Sort(regions)
	type set struct {
		regions []int
		ch      *chain
	}
	sets := make([]*set, 0, len(regions))
	for _, r := range regions {
		ch := newChain(f, []int{r}, byRegion)
		ch.solve(f, nw)
		sets = append(sets, &set{regions: []int{r}, ch: ch})
	}
	nodes := 0
	for _, cs := range byRegion {
		for _, c := range cs {
			nodes += len(c.nodes)
		}
	}
	for {
		bestGain, bestA, bestB := 0.0, -1, -1
		var bestChain *chain
		for a, sa := range sets {
			if sa.ch.target > 0 && nodes > mergeAllNodes {
				continue // on large fleets only regions that cannot serve alone look for partners
			}
			for b, sb := range sets {
				if a == b {
					continue
				}
				merged := bestOrder(f, nw, append(slices.Clone(sb.regions), sa.regions...), byRegion)
				gain := merged.target - sa.ch.target - sb.ch.target
				if gain > bestGain*(1+1e-12) {
					bestGain, bestA, bestB, bestChain = gain, a, b, merged
				}
			}
		}
		if bestA < 0 {
			break
		}
		sets[bestB] = &set{regions: bestChain.regions, ch: bestChain}
		sets = slices.Delete(sets, bestA, bestA+1)
	}
	var out []*chain
	for _, s := range sets {
		if s.ch.target > 0 {
			out = append(out, s.ch)
		}
	}
	return out
}

// bestOrder tries the orders of the regions (all of them for a few, else a
// greedy walk along the fastest links) and returns the best solved chain.
func bestOrder(f *Fleet, nw *network, regions []int, byRegion map[int][]*class) *chain {
	slices.Sort(regions)
	var best *chain
	try := func(order []int) {
		ch := newChain(f, slices.Clone(order), byRegion)
		ch.solve(f, nw)
		if best == nil || ch.target > best.target*(1+1e-12) {
			best = ch
		}
	}
	if len(regions) <= 4 {
		permute(regions, 0, try)
		return best
	}
	for _, start := range regions {
		order := []int{start}
		left := slices.DeleteFunc(slices.Clone(regions), func(r int) bool { return r == start })
		for len(left) > 0 {
			last := order[len(order)-1]
			pick := 0
			for i, r := range left {
				if nw.pairTok[last][r] > nw.pairTok[last][left[pick]] {
					pick = i
				}
			}
			order = append(order, left[pick])
			left = slices.Delete(left, pick, pick+1)
		}
		try(order)
	}
	return best
}

// permute calls visit with every permutation of s[k:] (s[:k] fixed).
func permute(s []int, k int, visit func([]int)) {
	if k == len(s) {
		visit(s)
		return
	}
	for i := k; i < len(s); i++ {
		s[k], s[i] = s[i], s[k]
		permute(s, k+1, visit)
		s[k], s[i] = s[i], s[k]
	}
}
