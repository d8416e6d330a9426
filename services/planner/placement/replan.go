package placement

import (
	"cmp"
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
	add("repair", repair(f, old, pipelineFlows(prev), scratchFlow, floor))
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

// pipelineFlows is the flow each pipeline of prev carried: the flow
// through its nodes that hold the first layer.
func pipelineFlows(prev *Placement) map[int]float64 {
	out := map[int]float64{}
	for _, a := range prev.Assignments {
		if a.First == 0 {
			out[a.Pipeline] += a.TokensPerS
		}
	}
	return out
}

// holdings is what each node (by index) holds under the previous plan; a
// span with end 0 means nothing.
type holdings []span

func (h holdings) holds(i int) bool { return h[i].end > 0 }

// prevRanges returns what every node of f holds under prev.
func prevRanges(f *Fleet, prev *Placement) holdings {
	index := make(map[string]int, len(f.problem.Nodes))
	for i := range f.problem.Nodes {
		index[f.problem.Nodes[i].ID] = i
	}
	old := make(holdings, len(f.problem.Nodes))
	for _, a := range prev.Assignments {
		if i, ok := index[a.Node]; ok && a.First < a.End && a.End <= f.problem.Model.Layers {
			old[i] = span{node: i, first: a.First, end: a.End, pipe: a.Pipeline}
		}
	}
	return old
}

// fetch is the number of layers of [first, end) that node i does not hold.
func fetch(old holdings, i, first, end int) int {
	o := old[i]
	return end - first - max(0, min(end, o.end)-max(first, o.first))
}

// movedLayers counts the layers spans make nodes fetch.
func movedLayers(old holdings, spans []span) int64 {
	var n int64
	for _, s := range spans {
		n += int64(fetch(old, s.node, s.first, s.end))
	}
	return n
}

// relabel gives each range of a fresh plan to the node of the same class
// that already holds most of it: per class, an assignment problem between
// the class's nodes and the ranges its members were given, solved exactly.
func relabel(f *Fleet, spans []span, old holdings) []span {
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
	// fetch caches the layers the block's nodes fetch for each new range.
	fetch []float64
}

// repairSkip is how many blocks a repaired pipeline may drop in a row.
const repairSkip = 3

// repair keeps prev's pipelines and their order of blocks, and moves the
// block boundaries so that the surviving nodes cover every layer again:
// per pipeline, a dynamic programme over (block, boundary) finds the layout
// whose blocks all carry a target throughput while fetching the fewest
// layers. Where a departed node left a hole, it also tries moving a few
// nodes into the hole (greedily, the ones that help most), since closing a
// wide hole by shifting every boundary makes many nodes fetch a little.
// Each pipeline gets a menu of (target, cheapest layout) around the flow it
// carried before; the pipelines' targets are then chosen together so that
// they add up to the floor at the least cost (preferring more throughput
// when it costs little more). It returns nil when prev's pipelines are not
// chains of disjoint blocks or cannot reach the floor.
func repair(f *Fleet, old holdings, before map[int]float64, scratchFlow, floor float64) []span {
	byPipe := map[int][]int{}
	for i, s := range old {
		if old.holds(i) && f.limit[i] > 0 {
			byPipe[s.pipe] = append(byPipe[s.pipe], i)
		}
	}
	pipes := make([]int, 0, len(byPipe))
	for p := range byPipe {
		pipes = append(pipes, p)
		slices.Sort(byPipe[p])
	}
	slices.Sort(pipes)
	// A pipeline's share of the fresh plan's flow and of the floor follows
	// the flow it carried before.
	share := map[int]float64{}
	sum := 0.0
	for _, p := range pipes {
		sum += before[p]
	}
	for _, p := range pipes {
		if sum > 0 {
			share[p] = before[p] / sum
		} else {
			share[p] = 1 / float64(len(pipes))
		}
	}
	idle := idleByRegion(f, old)
	menus := make([][]option, len(pipes))
	for k, p := range pipes {
		rp := newRepairPipe(f, old, byPipe[p], p, nil)
		if rp == nil {
			return nil
		}
		base := before[p]
		if base <= 0 {
			base = rp.maxTarget(floor)
		}
		levels := menuTargets(base, share[p]*scratchFlow, share[p]*floor)
		variants := append([]*repairPipe{rp}, insertions(rp, byPipe[p], idle, levels)...)
		for _, t := range []float64{share[p] * floor * 1.02, share[p] * scratchFlow} {
			if v := reinforce(rp, byPipe[p], idle, t); v != nil {
				variants = append(variants, v)
			}
		}
		menus[k] = menu(variants, levels)
	}
	choice, ok := allocate(menus, floor*1.005)
	if !ok {
		return nil
	}
	var out []span
	for _, o := range choice {
		if o.rp != nil {
			out = append(out, o.rp.spans(o.ranges)...)
		}
	}
	return out
}

// menuTargets are the targets a repaired pipeline is offered at, highest
// first: around the flow it carried before, around its share of the fresh
// plan's flow, and just above its share of the floor.
func menuTargets(before, scratch, floor float64) []float64 {
	var out []float64
	for _, s := range []float64{1.1, 1.05, 1, 0.97, 0.94, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5} {
		out = append(out, before*s)
	}
	for _, s := range []float64{1, 0.99, 0.98, 0.97, 0.96} {
		out = append(out, scratch*s)
	}
	for _, s := range []float64{1.005, 1.02, 1.05, 1.1} {
		out = append(out, floor*s)
	}
	slices.Sort(out)
	slices.Reverse(out)
	return slices.Compact(out)
}

// option is a repaired layout of one pipeline at one target (rp nil: the
// pipeline is given up, its nodes idle).
type option struct {
	rp     *repairPipe
	target float64
	ranges [][2]int
	cost   float64
}

// menu lists, per target level, the cheapest layout among the variants.
func menu(variants []*repairPipe, levels []float64) []option {
	out := []option{{}} // giving the pipeline up is always possible
	for _, t := range levels {
		best := option{cost: math.Inf(1)}
		for _, v := range variants {
			if r, c, ok := v.layout(t); ok && c < best.cost {
				best = option{rp: v, target: t, ranges: r, cost: c}
			}
		}
		if best.rp != nil {
			out = append(out, best)
		}
	}
	return out
}

// allocateExhaustive is the number of pipelines up to which allocate tries
// every combination of menu entries.
const allocateExhaustive = 4

// allocate picks one option per pipeline whose targets add up to at least
// need: the cheapest such pick, or among those within 10% (and one layer)
// of it the one with the most throughput. Beyond a few pipelines it lowers
// targets greedily from the top instead.
func allocate(menus [][]option, need float64) ([]option, bool) {
	if len(menus) > allocateExhaustive {
		return allocateGreedy(menus, need)
	}
	type pick struct {
		idx         []int
		cost, total float64
	}
	var picks []pick
	idx := make([]int, len(menus))
	var walk func(k int, cost, total float64)
	walk = func(k int, cost, total float64) {
		if k == len(menus) {
			if total >= need {
				picks = append(picks, pick{slices.Clone(idx), cost, total})
			}
			return
		}
		for e, o := range menus[k] {
			idx[k] = e
			walk(k+1, cost+o.cost, total+o.target)
		}
	}
	walk(0, 0, 0)
	if len(picks) == 0 {
		return nil, false
	}
	cheapest := math.Inf(1)
	for _, p := range picks {
		cheapest = min(cheapest, p.cost)
	}
	best := -1
	for k, p := range picks {
		if p.cost > cheapest*1.1+1 {
			continue
		}
		if best < 0 || p.total > picks[best].total*(1+1e-12) ||
			p.total >= picks[best].total*(1-1e-12) && p.cost < picks[best].cost {
			best = k
		}
	}
	out := make([]option, len(menus))
	for k, e := range picks[best].idx {
		out[k] = menus[k][e]
	}
	return out, true
}

// allocateGreedy starts every pipeline at its highest target and, while the
// total stays at least need, steps down the pipeline whose lower option
// saves the most layers.
func allocateGreedy(menus [][]option, need float64) ([]option, bool) {
	at := make([]int, len(menus))
	total := 0.0
	for k, m := range menus {
		for e := range m {
			if m[e].target > m[at[k]].target {
				at[k] = e
			}
		}
		total += m[at[k]].target
	}
	if total < need {
		return nil, false
	}
	for {
		bestK, bestE, bestSave := -1, -1, 0.0
		for k, m := range menus {
			cur := m[at[k]]
			for e, o := range m {
				if o.target < cur.target && total-cur.target+o.target >= need && cur.cost-o.cost > bestSave {
					bestK, bestE, bestSave = k, e, cur.cost-o.cost
				}
			}
		}
		if bestK < 0 {
			break
		}
		total += menus[bestK][bestE].target - menus[bestK][at[bestK]].target
		at[bestK] = bestE
	}
	out := make([]option, len(menus))
	for k, e := range at {
		out[k] = menus[k][e]
	}
	return out, true
}

// maxDonors bounds how many nodes move into one hole.
const maxDonors = 4

// insertions tries moving nodes into the holes of rp: for each hole, it
// adds donors one at a time (idle nodes of the pipeline's regions, or nodes
// of the pipeline itself), each time the one whose move lets the pipeline
// reach the highest of the levels at the lowest cost, while that improves.
// It returns the variants it built.
func insertions(rp *repairPipe, nodes []int, idle map[int][]int, levels []float64) []*repairPipe {
	var out []*repairPipe
	regions := map[int]bool{}
	for _, i := range nodes {
		regions[rp.f.region[i]] = true
	}
	var idlePool []int
	for r := range regions {
		idlePool = append(idlePool, idle[r]...)
	}
	slices.Sort(idlePool)
	// score ranks a variant: the first (highest) level it reaches, then its cost there.
	score := func(v *repairPipe) (int, float64) {
		for l, t := range levels {
			if _, c, ok := v.layout(t); ok {
				return l, c
			}
		}
		return len(levels), 0
	}
	better := func(l1 int, c1 float64, l2 int, c2 float64) bool { return l1 < l2 || l1 == l2 && c1 < c2 }
	baseL, baseC := score(rp)
	for _, hole := range rp.holes() {
		pool := rp.donors(hole, idlePool)
		inserts := map[int]move{}
		slots := 0
		curL, curC := baseL, baseC
		for range maxDonors {
			bestL, bestC, bestDonor := curL, curC, -1
			var bestSlot move
			var bestV *repairPipe
			for _, d := range pool {
				if _, used := inserts[d]; used {
					continue
				}
				// Beside a node already moved in, or after them.
				for k := 0; k <= slots; k++ {
					inserts[d] = move{hole: hole, k: k}
					v := newRepairPipe(rp.f, rp.old, nodes, rp.pipe, inserts)
					delete(inserts, d)
					if v == nil {
						continue
					}
					if l, c := score(v); better(l, c, bestL, bestC) {
						bestL, bestC, bestDonor, bestSlot, bestV = l, c, d, move{hole: hole, k: k}, v
					}
				}
			}
			if bestDonor < 0 {
				break
			}
			inserts[bestDonor] = bestSlot
			slots = max(slots, bestSlot.k+1)
			curL, curC = bestL, bestC
			out = append(out, bestV)
		}
	}
	return out
}

// reinforce makes every block of rp carry target again, for pipelines that
// lost many nodes (too many holes and thinned blocks for a greedy search):
// each hole gets blocks of nodes side by side whose capacity reaches target
// over the hole's width (in pieces the nodes can hold), and each block that
// fell below target gets nodes beside it. Nodes come from the idle ones
// first, then from blocks that keep target without them. It returns nil
// when nothing could be done.
func reinforce(rp *repairPipe, nodes []int, idle map[int][]int, target float64) *repairPipe {
	f := rp.f
	L := f.problem.Model.Layers
	regions := map[int]bool{}
	for _, i := range nodes {
		regions[f.region[i]] = true
	}
	var pool []int
	for r := range regions {
		pool = append(pool, idle[r]...)
	}
	slices.Sort(pool)
	// Spare members: a block gives its weakest members while it keeps target.
	left := make([]float64, len(rp.blocks))
	for j, b := range rp.blocks {
		l := b.end - b.first
		if l >= len(b.cap) {
			continue
		}
		left[j] = b.cap[l]
		members := slices.Clone(b.nodes)
		slices.SortStableFunc(members, func(a, c int) int { return cmp.Compare(f.Capacity(a, l), f.Capacity(c, l)) })
		for _, i := range members[:len(members)-1] {
			if left[j]-f.Capacity(i, l) >= target {
				left[j] -= f.Capacity(i, l)
				pool = append(pool, i)
			}
		}
	}
	used := map[int]bool{}
	moves := map[int]move{}
	// fill picks free nodes side by side holding `width` layers until they
	// carry need; false when the pool runs short.
	fill := func(width int, need float64, mv move) bool {
		cands := slices.DeleteFunc(slices.Clone(pool), func(i int) bool { return used[i] || f.Capacity(i, width) <= 0 })
		slices.SortStableFunc(cands, func(a, c int) int { return cmp.Compare(f.Capacity(c, width), f.Capacity(a, width)) })
		got := 0.0
		var picked []int
		for _, i := range cands {
			if got >= need {
				break
			}
			got += f.Capacity(i, width)
			picked = append(picked, i)
		}
		if got < need {
			return false
		}
		for _, i := range picked {
			used[i] = true
			moves[i] = mv
		}
		return true
	}
	for _, h := range rp.holes() {
		next := L
		for _, b := range rp.blocks {
			if b.first > h {
				next = min(next, b.first)
			}
		}
		for k, at := 0, h; at < next; k++ {
			width := next - at
			for ; width > 0; width-- {
				if fill(width, target, move{hole: h, k: k}) {
					break
				}
			}
			if width == 0 {
				break // the programme closes what is left, or finds no layout
			}
			at += width
		}
	}
	for _, b := range rp.blocks {
		l := b.end - b.first
		if l < len(b.cap) && l > 0 && b.cap[l] < target {
			fill(l, target-b.cap[l], move{join: true, first: b.first, end: b.end})
		}
	}
	if len(moves) == 0 {
		return nil
	}
	return newRepairPipe(f, rp.old, nodes, rp.pipe, moves)
}

// move sends a node elsewhere in a repaired pipeline: into a hole, as part
// of the k-th block after the boundary where the hole starts (nodes of one
// hole and k stand side by side), or (join) beside the block holding
// [first, end).
type move struct {
	hole, k    int
	join       bool
	first, end int
}

// maxPool bounds the donors tried for one hole.
const maxPool = 24

// donors lists the nodes worth trying as donors for the hole at boundary h:
// idle nodes first, then members of blocks that keep others (no new hole),
// then the nodes nearest the hole.
func (rp *repairPipe) donors(h int, idle []int) []int {
	type cand struct{ node, width, dist int }
	var cands []cand
	for _, b := range rp.blocks {
		d := min(abs(b.first-h), abs(b.end-h))
		for _, i := range b.nodes {
			cands = append(cands, cand{i, len(b.nodes), d})
		}
	}
	slices.SortStableFunc(cands, func(a, b cand) int {
		if (a.width > 1) != (b.width > 1) {
			if a.width > 1 {
				return -1
			}
			return 1
		}
		return a.dist - b.dist
	})
	out := slices.Clone(idle[:min(len(idle), maxPool)])
	for _, c := range cands {
		if len(out) >= maxPool {
			break
		}
		out = append(out, c.node)
	}
	return out
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

// idleByRegion lists, per region, the eligible nodes that held nothing.
func idleByRegion(f *Fleet, old holdings) map[int][]int {
	out := map[int][]int{}
	for _, i := range f.eligible() {
		if !old.holds(i) {
			out[f.region[i]] = append(out[f.region[i]], i)
		}
	}
	return out
}

// repairPipe is one pipeline of the previous plan, ready for the programme.
type repairPipe struct {
	f      *Fleet
	old    holdings
	pipe   int
	blocks []rblock
	// link[j][d] is the throughput the links from block j to block j+d carry.
	link [][]float64
	cost []float64
	from []int32
}

// newRepairPipe builds the blocks of one pipeline from its surviving nodes.
// moves sends nodes (of the pipeline or idle) into holes or beside blocks.
func newRepairPipe(f *Fleet, old holdings, nodes []int, pipe int, moves map[int]move) *repairPipe {
	byRange := map[[2]int][]int{}
	for _, i := range nodes {
		if _, moved := moves[i]; moved {
			continue
		}
		s := old[i]
		byRange[[2]int{s.first, s.end}] = append(byRange[[2]int{s.first, s.end}], i)
	}
	inserts := map[int]move{}
	for _, i := range slices.Sorted(maps.Keys(moves)) {
		if mv := moves[i]; mv.join {
			byRange[[2]int{mv.first, mv.end}] = append(byRange[[2]int{mv.first, mv.end}], i)
		} else {
			inserts[i] = mv
		}
	}
	rp := &repairPipe{f: f, old: old, pipe: pipe}
	for r, members := range byRange {
		slices.Sort(members)
		rp.blocks = append(rp.blocks, rblock{first: r[0], end: r[1], nodes: members})
	}
	bySlot := map[move][]int{}
	for _, i := range slices.Sorted(maps.Keys(inserts)) {
		bySlot[inserts[i]] = append(bySlot[inserts[i]], i)
	}
	for _, sl := range slices.SortedFunc(maps.Keys(bySlot), func(a, b move) int {
		if a.hole != b.hole {
			return a.hole - b.hole
		}
		return a.k - b.k
	}) {
		rp.blocks = append(rp.blocks, rblock{first: sl.hole, end: sl.hole, nodes: bySlot[sl]})
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
		longest := 0
		for _, i := range b.nodes {
			longest = max(longest, f.limit[i])
		}
		b.cap = make([]float64, longest+1)
		for _, i := range b.nodes {
			for l := 1; l <= f.limit[i]; l++ {
				b.cap[l] += f.capacity[i][l]
			}
		}
		// fetch[first*(longest+1)+l]: layers the block's nodes fetch to hold [first, first+l).
		b.fetch = make([]float64, (L+1)*(longest+1))
		for first := 0; first < L; first++ {
			for l := 1; l <= longest && first+l <= L; l++ {
				c := 0
				for _, i := range b.nodes {
					if l <= f.limit[i] && f.capacity[i][l] > 0 {
						c += fetch(old, i, first, first+l)
					}
				}
				b.fetch[first*(longest+1)+l] = float64(c)
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
	b := &rp.blocks[j]
	return b.fetch[first*len(b.cap)+l]
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
