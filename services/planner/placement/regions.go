package placement

import (
	"slices"
)

// mergeAllNodes is the fleet size up to which regions that can serve alone
// still try joining others: on small fleets a joint pipeline can beat
// separate ones (coarse layer counts waste less), on large ones it cannot
// pay for its slow crossings and costs too much to try.
const mergeAllNodes = 256

// exhaustiveSets is the number of region sets up to which merging tries
// every pair; beyond it, regions that cannot serve alone are first grouped
// along their fastest links.
const exhaustiveSets = 8

// regionSet is regions planned as one pipeline, with its solved chain.
type regionSet struct {
	regions []int
	ch      *chain
}

// regionChains decides which regions form a pipeline together. A region
// that cannot hold the whole model joins the pipeline it helps most; on
// small fleets, so may any region when that raises the total. Merging stops
// when no merge raises the total throughput.
func regionChains(f *Fleet, nw *network, byRegion map[int][]*class) []*chain {
	var regions []int
	nodes := 0
	for r, cs := range byRegion {
		regions = append(regions, r)
		for _, c := range cs {
			nodes += len(c.nodes)
		}
	}
	slices.Sort(regions)
	sets := make([]*regionSet, 0, len(regions))
	for _, r := range regions {
		ch := newChain(f, []int{r}, byRegion)
		ch.solve(f, nw)
		sets = append(sets, &regionSet{regions: []int{r}, ch: ch})
	}
	if len(sets) > exhaustiveSets {
		sets = groupOrphans(f, nw, byRegion, sets)
	}
	for {
		bestGain, bestA, bestB := 0.0, -1, -1
		var bestChain *chain
		// An orphan that no merge makes serve still joins the orphan it has
		// the fastest links to, so that small regions can pool.
		fallbackA, fallbackB, fallbackTok := -1, -1, 0.0
		for a, sa := range sets {
			if sa.ch.target > 0 && nodes > mergeAllNodes {
				continue // on large fleets only regions that cannot serve alone look for partners
			}
			for b, sb := range sets {
				if a == b || len(sets) > exhaustiveSets && sb.ch.target == 0 && sa.ch.target == 0 {
					continue
				}
				merged := bestOrder(f, nw, append(slices.Clone(sb.regions), sa.regions...), byRegion)
				gain := merged.target - sa.ch.target - sb.ch.target
				if gain > bestGain*(1+1e-12) {
					bestGain, bestA, bestB, bestChain = gain, a, b, merged
				}
				if sa.ch.target == 0 && sb.ch.target == 0 && merged.target == 0 {
					if tok := nw.fastest(sa.regions, sb.regions); tok > fallbackTok {
						fallbackA, fallbackB, fallbackTok = a, b, tok
					}
				}
			}
		}
		if bestA < 0 {
			if fallbackA < 0 {
				break
			}
			bestA, bestB = fallbackA, fallbackB
			bestChain = bestOrder(f, nw, append(slices.Clone(sets[bestB].regions), sets[bestA].regions...), byRegion)
		}
		sets[bestB] = &regionSet{regions: bestChain.regions, ch: bestChain}
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

// groupOrphans pools regions that cannot serve alone, on fleets of many
// regions: starting from the largest, a group takes the orphan with the
// fastest links to it until its nodes could hold the model twice over.
func groupOrphans(f *Fleet, nw *network, byRegion map[int][]*class, sets []*regionSet) []*regionSet {
	L := f.problem.Model.Layers
	capacity := func(regions []int) int {
		sum := 0
		for _, r := range regions {
			for _, c := range byRegion[r] {
				sum += c.limit * len(c.nodes)
			}
		}
		return sum
	}
	var out, orphans []*regionSet
	for _, s := range sets {
		if s.ch.target > 0 {
			out = append(out, s)
		} else {
			orphans = append(orphans, s)
		}
	}
	slices.SortStableFunc(orphans, func(a, b *regionSet) int { return capacity(b.regions) - capacity(a.regions) })
	for len(orphans) > 0 {
		group := slices.Clone(orphans[0].regions)
		orphans = orphans[1:]
		for capacity(group) < 2*L && len(orphans) > 0 {
			pick, best := 0, -1.0
			for k, o := range orphans {
				if tok := nw.fastest(group, o.regions); tok > best {
					pick, best = k, tok
				}
			}
			group = append(group, orphans[pick].regions...)
			orphans = slices.Delete(orphans, pick, pick+1)
		}
		out = append(out, &regionSet{regions: group, ch: bestOrder(f, nw, group, byRegion)})
	}
	return out
}

// fastest is the fastest planning link between two sets of regions.
func (nw *network) fastest(a, b []int) float64 {
	best := 0.0
	for _, x := range a {
		for _, y := range b {
			best = max(best, min(nw.pairTok[x][y], nw.pairTok[y][x]))
		}
	}
	return best
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
