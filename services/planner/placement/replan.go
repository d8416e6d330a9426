package placement

import (
	"context"
	"maps"
	"math"
	"slices"
)

// Replan reports how an incremental plan compares with planning from scratch.
type Replan struct {
	// Method is how the plan was made: "repair" (the previous pipelines,
	// boundaries moved, maybe a few nodes moved into holes), "relabel" (a
	// fresh plan, nodes matched to the layers they already hold) or
	// "relayout" (a fresh plan with its blocks reordered, then relabelled),
	// or "scratch" (the fresh plan as it is).
	Method string `json:"method"`
	// MovedBytes is what this plan makes nodes fetch (MovedBytes(prev, plan)).
	MovedBytes int64 `json:"moved_bytes"`
	// ScratchMovedBytes and ScratchTokensPerS describe the plan the same
	// strategy makes without a previous plan.
	ScratchMovedBytes int64   `json:"scratch_moved_bytes"`
	ScratchTokensPerS float64 `json:"scratch_tokens_per_s"`
}

// candidate is one way to re-plan.
type candidate struct {
	method string
	spans  []span
	flow   float64
	moved  int64
}

// replan keeps as much of prev as it can. It plans from scratch to learn
// the throughput the fleet can reach, then considers two plans: the previous
// pipelines repaired (blocks keep their order and nodes, boundaries move to
// close holes and rebalance; see repair) and the fresh plan relabelled (each
// class's nodes matched to the fresh ranges so as to keep what they hold).
// Of the plans that keep FlowFloor of the fresh plan's throughput it takes
// the one that moves the fewest bytes.
func (t Tessera) replan(ctx context.Context, f *Fleet, prev *Placement) (*Placement, error) {
	scratch, err := t.scratch(ctx, f)
	if err != nil {
		return nil, err
	}
	var ev evaluator
	old := prevRanges(f, prev)
	layerBytes := f.problem.Model.LayerBytes
	scratchFlow, _ := ev.run(f, scratch, Strict, false)
	report := Replan{ScratchTokensPerS: scratchFlow, ScratchMovedBytes: movedLayers(old, scratch) * layerBytes}
	floor := scratchFlow * t.flowFloor()

	var cands []candidate
	add := func(method string, spans []span) {
		if spans == nil {
			return
		}
		flow, _ := ev.run(f, spans, Strict, false)
		cands = append(cands, candidate{method: method, spans: spans, flow: flow, moved: movedLayers(old, spans)})
	}
	add("scratch", scratch)
	add("relabel", relabel(f, scratch, old))
	add("relayout", relabel(f, relayout(f, scratch, old), old))
	add("repair", repair(f, old, scratchFlow, floor))
	best := -1
	for ci, c := range cands {
		if best < 0 {
			best = ci
			continue
		}
		b := cands[best]
		okC, okB := c.flow >= floor*(1-1e-9), b.flow >= floor*(1-1e-9)
		switch {
		case okC && !okB:
			best = ci
		case okC == okB && okC && (c.moved < b.moved || c.moved == b.moved && c.flow > b.flow):
			best = ci
		case okC == okB && !okC && c.flow > b.flow:
			best = ci
		}
	}
	chosen := cands[best]
	pl := finish(f, TesseraName, chosen.spans, prev, Strict)
	report.Method = chosen.method
	report.MovedBytes = chosen.moved * layerBytes
	pl.Replan = &report
	return pl, nil
}

func (t Tessera) flowFloor() float64 {
	if t.FlowFloor <= 0 {
		return DefaultFlowFloor
	}
	return min(t.FlowFloor, 1)
}

// prevRanges maps node index to the range it holds under prev (absent: none).
func prevRanges(f *Fleet, prev *Placement) map[int]span {
	index := make(map[string]int, len(f.problem.Nodes))
	for i := range f.problem.Nodes {
		index[f.problem.Nodes[i].ID] = i
	}
	old := map[int]span{}
	for _, a := range prev.Assignments {
		if i, ok := index[a.Node]; ok && a.First < a.End && a.End <= f.problem.Model.Layers {
			old[i] = span{node: i, first: a.First, end: a.End, pipe: a.Pipeline}
		}
	}
	return old
}

// fetch is the number of layers of [first, end) that node i does not hold.
func fetch(old map[int]span, i, first, end int) int {
	o, ok := old[i]
	if !ok {
		return end - first
	}
	return end - first - max(0, min(end, o.end)-max(first, o.first))
}

// movedLayers counts the layers spans make nodes fetch.
func movedLayers(old map[int]span, spans []span) int64 {
	var n int64
	for _, s := range spans {
		n += int64(fetch(old, s.node, s.first, s.end))
	}
	return n
}

// relabel gives each range of a fresh plan to the node of the same class
// that already holds most of it: per class, an assignment problem between
// the class's nodes and the ranges its members were given, solved exactly.
func relabel(f *Fleet, spans []span, old map[int]span) []span {
	classes, classOf := classesOf(f)
	slots := make([][]span, len(classes))
	var out []span
	pinned := crossingSpans(f, spans)
	fixed := map[int]bool{}
	for k, s := range spans {
		if pinned[k] {
			fixed[s.node] = true
		}
	}
	for k, s := range spans {
		ci, ok := classOf[s.node]
		if !ok || pinned[k] {
			out = append(out, s) // crossing nodes were chosen for their links
			continue
		}
		slots[ci] = append(slots[ci], s)
	}
	for ci, c := range classes {
		if len(slots[ci]) == 0 {
			continue
		}
		members := slices.DeleteFunc(slices.Clone(c.nodes), func(i int) bool { return fixed[i] })
		cost := make([][]float64, len(slots[ci]))
		for si, s := range slots[ci] {
			cost[si] = make([]float64, len(members))
			for ni, i := range members {
				if s.layers() > f.limit[i] || f.capacity[i][s.layers()] <= 0 {
					cost[si][ni] = math.Inf(1)
				} else {
					cost[si][ni] = float64(fetch(old, i, s.first, s.end))
				}
			}
		}
		match := assign(cost)
		for si, s := range slots[ci] {
			if ni := match[si]; ni >= 0 {
				out = append(out, span{node: members[ni], first: s.first, end: s.end, pipe: s.pipe})
			} else {
				out = append(out, s)
			}
		}
	}
	return out
}

// crossingSpans marks the spans whose block borders a block of another
// region in the same pipeline.
func crossingSpans(f *Fleet, spans []span) []bool {
	type key struct{ pipe, first, end int }
	regions := map[key]map[int]bool{}
	for _, s := range spans {
		k := key{s.pipe, s.first, s.end}
		if regions[k] == nil {
			regions[k] = map[int]bool{}
		}
		regions[k][f.region[s.node]] = true
	}
	out := make([]bool, len(spans))
	for n, s := range spans {
		for k, rs := range regions {
			if k.pipe != s.pipe || (k.end != s.first && k.first != s.end) {
				continue
			}
			for r := range rs {
				if r != f.region[s.node] {
					out[n] = true
				}
			}
		}
	}
	return out
}

// assign solves the rectangular assignment problem (rows ≤ columns): each
// row gets a distinct column, minimising the summed cost. It returns the
// column of each row (-1 when only infinite costs remain). Hungarian method
// with potentials, O(rows² · columns).
func assign(cost [][]float64) []int {
	n := len(cost)
	m := len(cost[0])
	if n > m {
		// More ranges than nodes cannot happen for a plan of these nodes.
		out := make([]int, n)
		for i := range out {
			out[i] = -1
		}
		return out
	}
	const big = 1e18
	c := func(i, j int) float64 { return min(cost[i][j], big) }
	u, v := make([]float64, n+1), make([]float64, m+1)
	p, way := make([]int, m+1), make([]int, m+1)
	minv, used := make([]float64, m+1), make([]bool, m+1)
	for i := 1; i <= n; i++ {
		p[0] = i
		j0 := 0
		for j := range minv {
			minv[j], used[j] = math.Inf(1), false
		}
		for {
			used[j0] = true
			i0, delta, j1 := p[j0], math.Inf(1), 0
			for j := 1; j <= m; j++ {
				if used[j] {
					continue
				}
				if cur := c(i0-1, j-1) - u[i0] - v[j]; cur < minv[j] {
					minv[j], way[j] = cur, j0
				}
				if minv[j] < delta {
					delta, j1 = minv[j], j
				}
			}
			for j := 0; j <= m; j++ {
				if used[j] {
					u[p[j]] += delta
					v[j] -= delta
				} else {
					minv[j] -= delta
				}
			}
			j0 = j1
			if p[j0] == 0 {
				break
			}
		}
		for j0 != 0 {
			j1 := way[j0]
			p[j0] = p[j1]
			j0 = j1
		}
	}
	out := make([]int, n)
	for i := range out {
		out[i] = -1
	}
	for j := 1; j <= m; j++ {
		if p[j] > 0 && cost[p[j]-1][j-1] < big {
			out[p[j]-1] = j - 1
		}
	}
	return out
}

// rblock is a block of the previous plan: the surviving nodes that shared
// one range in one pipeline.
type rblock struct {
	first, end int
	nodes      []int
	// cap[λ] is the block's capacity with λ layers (nodes that cannot hold
	// λ stay idle).
	cap []float64
}

// repairSkip is how many blocks a repaired pipeline may drop in a row.
const repairSkip = 3

// repair keeps prev's pipelines and their order of blocks, and moves the
// block boundaries so that the surviving nodes cover every layer again:
// per pipeline, a dynamic programme over (block, boundary) finds the layout
// whose blocks all carry a target throughput while fetching the fewest
// layers. Where a departed node left a hole, it also tries moving a few
// nodes into the hole (greedily, the ones that save most), since closing a
// wide hole by shifting every boundary makes many nodes fetch a little. The
// target is the fresh plan's throughput, lowered a little when that saves
// many bytes, never below the floor. It returns nil when prev's pipelines
// are not chains of disjoint blocks.
func repair(f *Fleet, old map[int]span, scratchFlow, floor float64) []span {
	byPipe := map[int][]int{}
	for i, s := range old {
		if f.limit[i] > 0 {
			byPipe[s.pipe] = append(byPipe[s.pipe], i)
		}
	}
	pipes := make([]int, 0, len(byPipe))
	for p := range byPipe {
		pipes = append(pipes, p)
		slices.Sort(byPipe[p])
	}
	slices.Sort(pipes)
	var rps []*repairPipe
	for _, p := range pipes {
		rp := newRepairPipe(f, old, byPipe[p], p, nil)
		if rp == nil {
			return nil
		}
		rps = append(rps, rp)
	}
	if len(rps) == 0 {
		return nil
	}
	// The pipelines share the target in proportion to what each reaches.
	reach := make([]float64, len(rps))
	total := 0.0
	for k, rp := range rps {
		reach[k] = rp.maxTarget(scratchFlow)
		total += reach[k]
	}
	if total <= 0 {
		return nil
	}
	idle := idleByRegion(f, old)
	var out []span
	for k, rp := range rps {
		share := reach[k] / total
		targets := targetLevels(scratchFlow*share, floor*share)
		opts := rp.options(targets)
		opts = append(opts, insertions(rp, byPipe[rp.pipe], idle, targets)...)
		o, ok := pickOption(opts)
		if !ok {
			return nil
		}
		out = append(out, o.rp.spans(o.ranges)...)
	}
	return out
}

// targetLevels are the targets a repair tries: the goal, a few steps below
// it, and just above the floor.
func targetLevels(goal, floor float64) []float64 {
	out := []float64{goal}
	for _, share := range []float64{0.99, 0.98, 0.97, 0.96} {
		if goal*share >= floor*1.005 {
			out = append(out, goal*share)
		}
	}
	if floor*1.005 < goal {
		out = append(out, floor*1.005)
	}
	return out
}

// option is a repaired layout of one pipeline at one target.
type option struct {
	rp     *repairPipe
	target float64
	ranges [][2]int
	cost   float64
}

// options lays rp out at every target it reaches.
func (rp *repairPipe) options(targets []float64) []option {
	var out []option
	for _, t := range targets {
		if r, c, ok := rp.layout(t); ok {
			out = append(out, option{rp: rp, target: t, ranges: r, cost: c})
		}
	}
	return out
}

// pickOption takes the highest target whose cost is within 10% (and one
// layer) of the cheapest option's: throughput first unless it costs clearly more.
func pickOption(opts []option) (option, bool) {
	if len(opts) == 0 {
		return option{}, false
	}
	cheapest := opts[0].cost
	for _, o := range opts {
		cheapest = min(cheapest, o.cost)
	}
	best := -1
	for k, o := range opts {
		if o.cost > cheapest*1.1+1 {
			continue
		}
		if best < 0 || o.target > opts[best].target*(1+1e-12) ||
			o.target >= opts[best].target*(1-1e-12) && o.cost < opts[best].cost {
			best = k
		}
	}
	return opts[best], true
}

// maxDonors bounds how many nodes move into one hole.
const maxDonors = 3

// insertions tries moving nodes into the holes of rp: for each hole, it
// adds donors one at a time (idle nodes of the pipeline's regions, or nodes
// of the pipeline itself), each time the one whose move makes the cheapest
// layout, while that keeps getting cheaper.
func insertions(rp *repairPipe, nodes []int, idle map[int][]int, targets []float64) []option {
	var out []option
	regions := map[int]bool{}
	for _, i := range nodes {
		regions[rp.f.region[i]] = true
	}
	var pool []int
	for r := range regions {
		pool = append(pool, idle[r]...)
	}
	pool = append(pool, nodes...)
	slices.Sort(pool)
	cheapest := func(opts []option) float64 {
		c := math.Inf(1)
		for _, o := range opts {
			c = min(c, o.cost)
		}
		return c
	}
	baseCost := cheapest(rp.options(targets))
	for _, hole := range rp.holes() {
		inserts := map[int]int{}
		cur := baseCost
		for range maxDonors {
			bestCost, bestDonor := cur, -1
			var bestOpts []option
			for _, d := range pool {
				if _, used := inserts[d]; used {
					continue
				}
				inserts[d] = hole
				v := newRepairPipe(rp.f, rp.old, nodes, rp.pipe, inserts)
				delete(inserts, d)
				if v == nil {
					continue
				}
				opts := v.options(targets)
				if c := cheapest(opts); c < bestCost {
					bestCost, bestDonor, bestOpts = c, d, opts
				}
			}
			if bestDonor < 0 {
				break
			}
			inserts[bestDonor] = hole
			cur = bestCost
			out = append(out, bestOpts...)
		}
	}
	return out
}

// idleByRegion lists, per region, the eligible nodes that held nothing.
func idleByRegion(f *Fleet, old map[int]span) map[int][]int {
	out := map[int][]int{}
	for _, i := range f.eligible() {
		if _, ok := old[i]; !ok {
			out[f.region[i]] = append(out[f.region[i]], i)
		}
	}
	return out
}

// repairPipe is one pipeline of the previous plan, ready for the programme.
type repairPipe struct {
	f      *Fleet
	old    map[int]span
	pipe   int
	blocks []rblock
	// link[j][d] is the throughput the links from block j to block j+d carry.
	link [][]float64
	cost []float64
	from []int32
}

// newRepairPipe builds the blocks of one pipeline from its surviving nodes.
// inserts moves nodes (of the pipeline or idle) into holes: each becomes a
// block of its own at the hole's boundary.
func newRepairPipe(f *Fleet, old map[int]span, nodes []int, pipe int, inserts map[int]int) *repairPipe {
	byRange := map[[2]int][]int{}
	for _, i := range nodes {
		if _, moved := inserts[i]; moved {
			continue
		}
		s := old[i]
		byRange[[2]int{s.first, s.end}] = append(byRange[[2]int{s.first, s.end}], i)
	}
	rp := &repairPipe{f: f, old: old, pipe: pipe}
	for r, members := range byRange {
		slices.Sort(members)
		rp.blocks = append(rp.blocks, rblock{first: r[0], end: r[1], nodes: members})
	}
	for _, i := range slices.Sorted(maps.Keys(inserts)) {
		h := inserts[i]
		rp.blocks = append(rp.blocks, rblock{first: h, end: h, nodes: []int{i}})
	}
	slices.SortStableFunc(rp.blocks, func(a, b rblock) int {
		if a.first != b.first {
			return a.first - b.first
		}
		return b.end - a.end // a hole's new blocks go after the block ending there
	})
	for j := 1; j < len(rp.blocks); j++ {
		if rp.blocks[j].first < rp.blocks[j-1].end {
			return nil // overlapping ranges: not a chain of blocks
		}
	}
	if len(rp.blocks) == 0 {
		return nil
	}
	L := f.problem.Model.Layers
	for j := range rp.blocks {
		b := &rp.blocks[j]
		b.cap = make([]float64, L+1)
		for _, i := range b.nodes {
			for l := 1; l <= f.limit[i]; l++ {
				b.cap[l] += f.capacity[i][l]
			}
		}
	}
	act := float64(f.problem.Model.ActivationBytesPerToken)
	rp.link = make([][]float64, len(rp.blocks))
	for j := range rp.blocks {
		rp.link[j] = make([]float64, repairSkip+2)
		for d := 1; d <= repairSkip+1 && j+d < len(rp.blocks); d++ {
			total := 0.0
			for _, a := range rp.blocks[j].nodes {
				for _, b := range rp.blocks[j+d].nodes {
					total += perUnit(f.bandwidth(a, b), act)
				}
			}
			rp.link[j][d] = total
		}
	}
	return rp
}

// layout runs the programme at target: the cheapest layout in fetched
// layers whose blocks and hand-offs all carry target, or ok=false. The
// layout gives each block its new range (first == end: dropped).
func (rp *repairPipe) layout(target float64) (ranges [][2]int, cost float64, ok bool) {
	L := rp.f.problem.Model.Layers
	n := len(rp.blocks)
	stride := L + 1
	rp.cost = resize(rp.cost, n*stride)
	rp.from = resize(rp.from, n*stride)
	inf := math.Inf(1)
	for k := range rp.cost {
		rp.cost[k], rp.from[k] = inf, -1
	}
	// cost[j*stride+b]: block j kept, ending at boundary b.
	for j := range n {
		b := &rp.blocks[j]
		for l := 1; l < len(b.cap) && l <= L; l++ {
			if b.cap[l] < target {
				continue
			}
			// As the first kept block.
			if j <= repairSkip {
				if c := rp.blockCost(j, 0, l); c < rp.cost[j*stride+l] {
					rp.cost[j*stride+l], rp.from[j*stride+l] = c, -1
				}
			}
			// After block j-d ending at boundary e.
			for d := 1; d <= repairSkip+1 && j-d >= 0; d++ {
				if rp.link[j-d][d] < target {
					continue
				}
				for e := 1; e+l <= L; e++ {
					prev := rp.cost[(j-d)*stride+e]
					if math.IsInf(prev, 1) {
						continue
					}
					if c := prev + rp.blockCost(j, e, l); c < rp.cost[j*stride+e+l] {
						rp.cost[j*stride+e+l], rp.from[j*stride+e+l] = c, int32((j-d)*stride+e)
					}
				}
			}
		}
	}
	best, bestJ := inf, -1
	for j := max(0, n-1-repairSkip); j < n; j++ {
		if c := rp.cost[j*stride+L]; c < best {
			best, bestJ = c, j
		}
	}
	if bestJ < 0 {
		return nil, 0, false
	}
	ranges = make([][2]int, n)
	for k := bestJ*stride + L; k >= 0; {
		j, b := k/stride, k%stride
		prev := int(rp.from[k])
		start := 0
		if prev >= 0 {
			start = prev % stride
		}
		ranges[j] = [2]int{start, b}
		k = prev
	}
	return ranges, best, true
}

// blockCost is the layers block j's nodes fetch to hold [first, first+l).
func (rp *repairPipe) blockCost(j, first, l int) float64 {
	c := 0
	for _, i := range rp.blocks[j].nodes {
		if l <= rp.f.limit[i] && rp.f.capacity[i][l] > 0 {
			c += fetch(rp.old, i, first, first+l)
		}
	}
	return float64(c)
}

// maxTarget is the highest target (≤ hi) the pipeline can be laid out for.
func (rp *repairPipe) maxTarget(hi float64) float64 {
	if _, _, ok := rp.layout(hi); ok {
		return hi
	}
	lo := 0.0
	if _, _, ok := rp.layout(hi * 1e-9); !ok {
		return 0
	}
	for range 30 {
		mid := (lo + hi) / 2
		if _, _, ok := rp.layout(mid); ok {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo
}

// holes lists the boundaries where the pipeline's surviving blocks leave
// layers uncovered (a hole starts there).
func (rp *repairPipe) holes() []int {
	var out []int
	at := 0
	for _, b := range rp.blocks {
		if b.first > at {
			out = append(out, at)
		}
		at = max(at, b.end)
	}
	if at < rp.f.problem.Model.Layers {
		out = append(out, at)
	}
	return out
}

// spans turns a layout into the spans of the nodes that hold layers.
func (rp *repairPipe) spans(ranges [][2]int) []span {
	var out []span
	for j, r := range ranges {
		l := r[1] - r[0]
		if l <= 0 {
			continue
		}
		for _, i := range rp.blocks[j].nodes {
			if l <= rp.f.limit[i] && rp.f.capacity[i][l] > 0 {
				out = append(out, span{node: i, first: r[0], end: r[1], pipe: rp.pipe})
			}
		}
	}
	return out
}
