package placement

import (
	"maps"
	"slices"
)

// relayout reorders the blocks of each pipeline of a fresh plan so that
// nodes land near the layers they already hold. Inside one region the order
// of blocks does not change the throughput, so blocks that do not sit at a
// region crossing are laid out again from the segment's start: at each
// boundary, the block (with nodes of the right classes, taken from the
// segment's own nodes and the idle ones) whose nodes fetch the fewest layers
// per layer held goes next.
func relayout(f *Fleet, spans []span, old holdings) []span {
	_, classOf := classesOf(f)
	used := map[int]bool{}
	for _, s := range spans {
		used[s.node] = true
	}
	idle := map[int][]int{} // by class
	for _, i := range f.eligible() {
		if !used[i] {
			idle[classOf[i]] = append(idle[classOf[i]], i)
		}
	}
	byPipe := map[int][]span{}
	for _, s := range spans {
		byPipe[s.pipe] = append(byPipe[s.pipe], s)
	}
	var out []span
	for _, pipe := range slices.Sorted(maps.Keys(byPipe)) {
		out = append(out, relayoutPipe(f, byPipe[pipe], old, classOf, idle)...)
	}
	return out
}

// lblock is a block of a fresh plan: a range and its members' classes.
type lblock struct {
	first, end int
	nodes      []int
	region     int
	fixed      bool
}

func relayoutPipe(f *Fleet, spans []span, old holdings, classOf map[int]int, idle map[int][]int) []span {
	byRange := map[[2]int][]int{}
	for _, s := range spans {
		byRange[[2]int{s.first, s.end}] = append(byRange[[2]int{s.first, s.end}], s.node)
	}
	var blocks []lblock
	for r, nodes := range byRange {
		slices.Sort(nodes)
		b := lblock{first: r[0], end: r[1], nodes: nodes, region: f.region[nodes[0]]}
		for _, i := range nodes {
			if f.region[i] != b.region {
				b.fixed = true
			}
		}
		blocks = append(blocks, b)
	}
	slices.SortFunc(blocks, func(a, b lblock) int { return a.first - b.first })
	for j := range blocks {
		if j > 0 && blocks[j].first != blocks[j-1].end || j == 0 && blocks[0].first != 0 {
			return spans // not a chain of blocks: keep it as it is
		}
		if j > 0 && blocks[j-1].region != blocks[j].region {
			blocks[j-1].fixed, blocks[j].fixed = true, true
		}
	}
	var out []span
	emit := func(b lblock, nodes []int, first int) {
		for _, i := range nodes {
			out = append(out, span{node: i, first: first, end: first + b.end - b.first, pipe: spans[0].pipe})
		}
	}
	for j := 0; j < len(blocks); {
		if blocks[j].fixed {
			emit(blocks[j], blocks[j].nodes, blocks[j].first)
			j++
			continue
		}
		k := j
		for k < len(blocks) && !blocks[k].fixed {
			k++
		}
		out = append(out, relayoutSegment(f, blocks[j:k], old, classOf, idle, spans[0].pipe)...)
		j = k
	}
	return out
}

// relayoutSegment lays out blocks (one region, no crossing) greedily from
// the segment's first boundary.
func relayoutSegment(f *Fleet, blocks []lblock, old holdings, classOf map[int]int, idle map[int][]int, pipe int) []span {
	pool := map[int][]int{} // available nodes by class
	for _, b := range blocks {
		for _, i := range b.nodes {
			pool[classOf[i]] = append(pool[classOf[i]], i)
		}
	}
	for c := range pool {
		pool[c] = append(pool[c], idle[c]...)
	}
	taken := map[int]bool{}
	left := slices.Clone(blocks)
	at := blocks[0].first
	var out []span
	for len(left) > 0 {
		bestK, bestScore := -1, 0.0
		var bestNodes []int
		for k, b := range left {
			l := b.end - b.first
			nodes, cost, ok := cheapestNodes(f, b, at, l, old, classOf, pool, taken)
			if !ok {
				continue
			}
			score := float64(cost) / float64(l)
			if bestK < 0 || score < bestScore || score == bestScore && l > left[bestK].end-left[bestK].first {
				bestK, bestScore, bestNodes = k, score, nodes
			}
		}
		if bestK < 0 {
			return spansOf(blocks, pipe) // cannot staff a block: keep the original layout
		}
		b := left[bestK]
		l := b.end - b.first
		for _, i := range bestNodes {
			taken[i] = true
			out = append(out, span{node: i, first: at, end: at + l, pipe: pipe})
		}
		at += l
		left = slices.Delete(left, bestK, bestK+1)
	}
	return out
}

// cheapestNodes picks, for each member class of b, the available nodes that
// fetch the fewest layers to hold [at, at+l).
func cheapestNodes(f *Fleet, b lblock, at, l int, old holdings, classOf map[int]int, pool map[int][]int, taken map[int]bool) ([]int, int, bool) {
	var nodes []int
	cost := 0
	pick := map[int]bool{}
	for _, member := range b.nodes {
		best, bestFetch := -1, 0
		for _, i := range pool[classOf[member]] {
			if taken[i] || pick[i] || l > f.limit[i] || f.capacity[i][l] <= 0 {
				continue
			}
			if fe := fetch(old, i, at, at+l); best < 0 || fe < bestFetch {
				best, bestFetch = i, fe
			}
		}
		if best < 0 {
			return nil, 0, false
		}
		pick[best] = true
		nodes = append(nodes, best)
		cost += bestFetch
	}
	return nodes, cost, true
}

func spansOf(blocks []lblock, pipe int) []span {
	var out []span
	for _, b := range blocks {
		for _, i := range b.nodes {
			out = append(out, span{node: i, first: b.first, end: b.end, pipe: pipe})
		}
	}
	return out
}
