package placement

import (
	"cmp"
	"math"
	"slices"
)

// chain is a pipeline that walks through a list of regions in order; each
// region covers one contiguous part of the layers with its own blocks.
type chain struct {
	regions []int
	classes [][]*class // per region, in chain order
	fits    []regionFit
	// target is the throughput the blocks were sized for; layers the
	// layers they cover (≥ the model's when the chain is feasible).
	target float64
	layers int
	needs  []edgeNeed
	f      *Fleet
}

// network is the planning view of the links: tokens/s per node pair between
// regions (the mean over the pairs when links differ per pair).
type network struct {
	pairTok [][]float64
}

func newNetwork(f *Fleet, nodes []int) *network {
	r := len(f.regions)
	nw := &network{pairTok: make([][]float64, r)}
	act := float64(f.problem.Model.ActivationBytesPerToken)
	for a := range nw.pairTok {
		nw.pairTok[a] = make([]float64, r)
		for b := range nw.pairTok[a] {
			nw.pairTok[a][b] = perUnit(f.regionBW[a][b], act)
		}
	}
	var pinned []int
	for _, i := range nodes {
		if f.hasOverride[i] && f.limit[i] > 0 {
			pinned = append(pinned, i)
		}
	}
	if len(pinned) == 0 || len(pinned) > 4096 {
		return nw
	}
	sum := make([][]float64, r)
	cnt := make([][]int, r)
	for a := range sum {
		sum[a], cnt[a] = make([]float64, r), make([]int, r)
	}
	for _, i := range pinned {
		for _, j := range pinned {
			if i != j {
				a, b := f.region[i], f.region[j]
				sum[a][b] += min(perUnit(f.bandwidth(i, j), act), math.MaxFloat64)
				cnt[a][b]++
			}
		}
	}
	for a := range sum {
		for b := range sum[a] {
			if cnt[a][b] > 0 {
				nw.pairTok[a][b] = sum[a][b] / float64(cnt[a][b])
			}
		}
	}
	return nw
}

// maxEdgeWidth bounds the widths tried on one side of a region crossing.
const maxEdgeWidth = 12

// crossing is a way to cross between two regions: `out` nodes side by side
// at the end of the first region, `in` at the start of the next.
type crossing struct{ out, in int }

// crossings lists the ways to carry target over a link of pairTok per pair.
func crossings(pairTok, target float64, nOut, nIn int) []crossing {
	var opts []crossing
	if pairTok <= 0 {
		return nil
	}
	for x := 1; x <= min(nOut, maxEdgeWidth); x++ {
		y := int(math.Ceil(target / (float64(x) * pairTok)))
		y = max(y, 1)
		if y > min(nIn, maxEdgeWidth) {
			continue
		}
		if len(opts) > 0 && opts[len(opts)-1].in == y {
			continue // a wider exit with the same entry only costs layers
		}
		opts = append(opts, crossing{out: x, in: y})
		if y == 1 {
			break
		}
	}
	return opts
}

func newChain(f *Fleet, regions []int, byRegion map[int][]*class) *chain {
	ch := &chain{regions: regions, fits: make([]regionFit, len(regions)), f: f}
	for _, r := range regions {
		ch.classes = append(ch.classes, byRegion[r])
	}
	return ch
}

// cover returns the layers the chain covers at target with the best
// crossings, and remembers the edge needs that achieve it.
func (ch *chain) cover(nw *network, target float64) int {
	n := len(ch.regions)
	size := func(j int) int {
		s := 0
		for _, c := range ch.classes[j] {
			s += len(c.nodes)
		}
		return s
	}
	for j := range ch.regions {
		ch.fits[j].prepare(ch.classes[j], target)
	}
	if n == 1 {
		ch.fits[0].fit(edgeNeed{})
		ch.needs = []edgeNeed{{}}
		mixed, _ := mixedCover(ch.f, ch.fits[0].leftovers(), target)
		return ch.fits[0].layers + mixed
	}
	// opts[j] are the crossings between region j and j+1.
	opts := make([][]crossing, n-1)
	for j := range opts {
		opts[j] = crossings(nw.pairTok[ch.regions[j]][ch.regions[j+1]], target, size(j), size(j+1))
		if len(opts[j]) == 0 {
			return 0
		}
	}
	// dp[j][o]: layers of regions 0..j when crossing j uses option o.
	type cell struct{ layers, from int }
	dp := make([][]cell, n-1)
	for j := range dp {
		dp[j] = make([]cell, len(opts[j]))
		for o, x := range opts[j] {
			dp[j][o] = cell{layers: -1, from: -1}
			if j == 0 {
				ch.fits[0].fit(edgeNeed{out: x.out})
				dp[0][o].layers = ch.fits[0].layers
				continue
			}
			for po, px := range opts[j-1] {
				if dp[j-1][po].layers < 0 {
					continue
				}
				ch.fits[j].fit(edgeNeed{in: px.in, out: x.out})
				if v := dp[j-1][po].layers + ch.fits[j].layers; v > dp[j][o].layers {
					dp[j][o] = cell{layers: v, from: po}
				}
			}
		}
	}
	best, bestO := -1, -1
	for po, px := range opts[n-2] {
		if dp[n-2][po].layers < 0 {
			continue
		}
		ch.fits[n-1].fit(edgeNeed{in: px.in})
		if v := dp[n-2][po].layers + ch.fits[n-1].layers; v > best {
			best, bestO = v, po
		}
	}
	if bestO < 0 {
		return 0
	}
	ch.needs = make([]edgeNeed, n)
	o := bestO
	for j := n - 2; j >= 0; j-- {
		ch.needs[j].out = opts[j][o].out
		ch.needs[j+1].in = opts[j][o].in
		o = dp[j][o].from
	}
	return best
}

// solve finds the highest target the chain covers the model at, by
// bisection (coverage only falls as the target rises), and leaves the fits
// sized for it. It returns 0 when the chain cannot hold the model at all.
func (ch *chain) solve(f *Fleet, nw *network) float64 {
	L := f.problem.Model.Layers
	hi := 0.0
	for _, cs := range ch.classes {
		for _, c := range cs {
			best := 0.0
			for k := 1; k <= c.limit; k++ {
				best = max(best, float64(k)*c.cap[k])
			}
			hi += best * float64(len(c.nodes))
		}
	}
	hi = hi/float64(L) + 1
	// Tokens enter from the coordinator in the first region and leave in
	// the last: their links bound the chain.
	tok := float64(f.problem.Model.TokenBytes)
	entry, exit := 0.0, 0.0
	for _, c := range ch.classes[0] {
		for _, i := range c.nodes {
			entry += perUnit(f.srcBW[i], tok)
		}
	}
	for _, c := range ch.classes[len(ch.classes)-1] {
		for _, i := range c.nodes {
			exit += perUnit(f.sinkBW[i], tok)
		}
	}
	hi = min(hi, entry, exit)
	if hi <= 0 {
		ch.target, ch.layers = 0, 0
		return 0
	}
	lo := hi * 1e-9
	if ch.cover(nw, lo) < L {
		ch.target, ch.layers = 0, 0
		return 0
	}
	for range 48 {
		mid := (lo + hi) / 2
		if ch.cover(nw, mid) >= L {
			lo = mid
		} else {
			hi = mid
		}
		if hi-lo <= 1e-6*hi {
			break
		}
	}
	ch.layers = ch.cover(nw, lo)
	ch.target = lo
	return lo
}

// blocks lays the chain's blocks out along the layers, picks the nodes of
// every block, trims the excess layers where that helps most, and returns
// the nodes left idle.
func (ch *chain) blocks(f *Fleet) (blocks []block, idle []int) {
	for j := range ch.regions {
		ch.fits[j].prepare(ch.classes[j], ch.target)
		ch.fits[j].fit(ch.needs[j])
		blocks = append(blocks, ch.fits[j].blocks()...)
	}
	// Edge blocks carry the region crossings; the others may go idle.
	edge := make([]bool, len(blocks))
	at := 0
	for j := range ch.regions {
		n := len(ch.fits[j].blocks())
		if ch.needs[j].in > 0 {
			edge[at] = true
		}
		if ch.needs[j].out > 0 {
			edge[at+n-1] = true
		}
		at += n
	}
	staff(f, blocks)
	if len(ch.regions) == 1 {
		_, mixed := mixedCover(f, ch.fits[0].leftovers(), ch.target)
		blocks = append(blocks, mixed...)
		edge = append(edge, make([]bool, len(mixed))...)
	}
	kept := trim(blocks, f.problem.Model.Layers, func(bi int) bool { return edge[bi] })
	inUse := map[int]bool{}
	for _, b := range kept {
		for _, i := range b.nodes {
			inUse[i] = true
		}
	}
	for _, cs := range ch.classes {
		for _, c := range cs {
			for _, i := range c.nodes {
				if !inUse[i] {
					idle = append(idle, i)
				}
			}
		}
	}
	return kept, idle
}

// staff picks the nodes of every class block. At a region crossing it picks the exit block's nodes with the best
// links towards the next region's entry class, then the entry block's nodes
// with the best links from those; other blocks take members in order.
func staff(f *Fleet, blocks []block) {
	free := map[*class][]int{}
	for bi := range blocks {
		c := blocks[bi].c
		if _, ok := free[c]; !ok && c != nil {
			free[c] = slices.Clone(c.nodes)
		}
	}
	take := func(c *class, m int, score func(i int) float64) []int {
		nodes := free[c]
		if score != nil {
			slices.SortStableFunc(nodes, func(a, b int) int { return cmp.Compare(score(b), score(a)) })
		}
		out := slices.Clone(nodes[:m])
		free[c] = nodes[m:]
		return out
	}
	linkSum := func(i int, to []int, out bool) float64 {
		sum := 0.0
		for _, j := range to {
			if out {
				sum += min(f.bandwidth(i, j), math.MaxFloat64)
			} else {
				sum += min(f.bandwidth(j, i), math.MaxFloat64)
			}
		}
		return sum
	}
	for bi := 0; bi+1 < len(blocks); bi++ {
		a, b := &blocks[bi], &blocks[bi+1]
		if a.region == b.region || a.c == nil || b.c == nil {
			continue
		}
		if a.nodes == nil {
			peers := free[b.c]
			a.nodes = take(a.c, a.m, func(i int) float64 { return linkSum(i, peers, true) })
		}
		if b.nodes == nil {
			b.nodes = take(b.c, b.m, func(j int) float64 { return linkSum(j, a.nodes, false) })
		}
	}
	for bi := range blocks {
		if blocks[bi].nodes == nil {
			blocks[bi].nodes = take(blocks[bi].c, blocks[bi].m, nil)
		}
	}
}

// trim cuts the blocks down to exactly `layers` layers in all. Each block
// keeps at most its layers, or is dropped (its nodes go idle) unless it is
// an edge block (mandatory); among the ways to hit the total it picks one
// whose weakest block is strongest: a bisection over the candidate
// bottlenecks, each checked by a subset-sum over the blocks.
func trim(blocks []block, layers int, mandatory func(bi int) bool) []block {
	var cands []float64
	for bi := range blocks {
		b := &blocks[bi]
		for l := 1; l <= b.layers; l++ {
			cands = append(cands, b.capAt(l))
		}
	}
	slices.Sort(cands)
	cands = slices.Compact(cands)
	// choose[bi][s]: layers block bi keeps when blocks bi.. hold s layers (-1: impossible).
	choose := make([][]int16, len(blocks))
	for bi := range choose {
		choose[bi] = make([]int16, layers+1)
	}
	feasible := func(t float64) bool {
		// reach[s] for the suffix after bi; filled from the last block back.
		next := make([]bool, layers+1)
		next[0] = true
		for bi := len(blocks) - 1; bi >= 0; bi-- {
			b := &blocks[bi]
			cur := make([]bool, layers+1)
			for s := 0; s <= layers; s++ {
				choose[bi][s] = -1
				if !mandatory(bi) && next[s] {
					cur[s], choose[bi][s] = true, 0
				}
				for l := min(b.layers, s); l >= 1; l-- {
					if next[s-l] && b.capAt(l) >= t {
						cur[s], choose[bi][s] = true, int16(l)
						break
					}
				}
			}
			next = cur
		}
		return next[layers]
	}
	lo, hi := 0, len(cands)-1
	if !feasible(cands[0]) {
		return blocks // cannot happen for blocks that cover the model; keep them
	}
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if feasible(cands[mid]) {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	feasible(cands[lo])
	var out []block
	s := layers
	for bi := range blocks {
		l := int(choose[bi][s])
		if l > 0 {
			b := blocks[bi]
			b.layers = l
			out = append(out, b)
		}
		s -= l
	}
	return out
}

// spans turns laid-out blocks into node spans along [0, layers).
func blockSpans(blocks []block, pipe int) []span {
	var out []span
	at := 0
	for _, b := range blocks {
		for _, i := range b.nodes {
			out = append(out, span{node: i, first: at, end: at + b.layers, pipe: pipe})
		}
		at += b.layers
	}
	return out
}
