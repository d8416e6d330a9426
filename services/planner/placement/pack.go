package placement

import (
	"cmp"
	"maps"
	"math"
	"slices"
)

// The tessera strategy builds a pipeline of blocks. A block is a group of m
// interchangeable nodes that all hold the same λ layers, side by side; the
// router spreads the traffic over them, so the block carries m·c(λ) tokens/s
// where c is the node's capacity with λ layers. Blocks follow one another
// along [0, layers). With a target throughput F, a block of m nodes may hold
// the most layers λ with m·c(λ) ≥ F; a per-class knapsack then finds how many
// layers a region's nodes can cover at F, and a bisection on F finds the
// highest F whose blocks cover the whole model. Where the pipeline crosses
// from one region to another, the blocks on both sides must be wide enough
// that their pairwise links carry F.

// class is a set of interchangeable nodes: same region, device, layer limit
// and (nearly) the same capacity table, which is the members' minimum.
type class struct {
	region int
	nodes  []int
	limit  int
	cap    []float64
}

// classKey buckets capacities on a 3% log grid so that nodes measured at
// slightly different speeds still plan together.
type classKey struct {
	region int
	device string
	limit  int
	first  int
	last   int
}

func bucket(v float64) int {
	if v <= 0 {
		return math.MinInt32
	}
	return int(math.Round(math.Log(v) / math.Log(1.03)))
}

// buildClasses groups the eligible nodes among `nodes` into classes.
func buildClasses(f *Fleet, nodes []int) []*class {
	byKey := map[classKey]*class{}
	var out []*class
	for _, i := range nodes {
		lim := f.limit[i]
		if lim == 0 {
			continue
		}
		k := classKey{f.region[i], f.problem.Nodes[i].Device, lim, bucket(f.capacity[i][1]), bucket(f.capacity[i][lim])}
		c, ok := byKey[k]
		if !ok {
			c = &class{region: f.region[i], limit: lim, cap: slices.Clone(f.capacity[i])}
			byKey[k] = c
			out = append(out, c)
		}
		c.nodes = append(c.nodes, i)
		for l := 1; l <= lim; l++ {
			c.cap[l] = min(c.cap[l], f.capacity[i][l])
		}
	}
	return out
}

// classesOf builds the classes of all eligible nodes and maps each node to
// its class's index.
func classesOf(f *Fleet) ([]*class, map[int]int) {
	classes := buildClasses(f, f.eligible())
	classOf := map[int]int{}
	for ci, c := range classes {
		for _, i := range c.nodes {
			classOf[i] = ci
		}
	}
	return classes, classOf
}

// plan is a class's contribution at a target throughput: a knapsack over
// block sizes.
type plan struct {
	c *class
	// lam[m] is the most layers a block of m nodes may hold (0: none).
	lam []int
	// best[j] is the most layers j nodes can cover; pick[j] the size of the
	// last block in that optimum (0: node j left idle).
	best []int
	pick []int
}

// maxBlock bounds the block sizes tried, so a knapsack stays cheap on huge
// classes; blocks larger than this gain nothing on realistic tables.
const maxBlock = 256

func (pl *plan) reset(c *class, target float64) {
	pl.c = c
	n := len(c.nodes)
	maxM := min(n, maxBlock)
	pl.lam = resize(pl.lam, maxM+1)
	pl.lam[0] = 0
	for m := 1; m <= maxM; m++ {
		best := 0
		for l := c.limit; l >= 1; l-- {
			if float64(m)*c.cap[l] >= target {
				best = l
				break
			}
		}
		pl.lam[m] = best
	}
	// Sizes beyond the first one that reaches the limit add nothing.
	for m := 1; m <= maxM; m++ {
		if pl.lam[m] == c.limit {
			pl.lam = pl.lam[:m+1]
			break
		}
	}
	pl.best = resize(pl.best, n+1)
	pl.pick = resize(pl.pick, n+1)
	pl.best[0], pl.pick[0] = 0, 0
	for j := 1; j <= n; j++ {
		pl.best[j], pl.pick[j] = pl.best[j-1], 0
		for m := 1; m < len(pl.lam) && m <= j; m++ {
			if pl.lam[m] == 0 {
				continue
			}
			if v := pl.best[j-m] + pl.lam[m]; v > pl.best[j] {
				pl.best[j], pl.pick[j] = v, m
			}
		}
	}
}

// lamAt is the layers of a block of m nodes (m may exceed the table).
func (pl *plan) lamAt(m int) int {
	if m <= 0 {
		return 0
	}
	return pl.lam[min(m, len(pl.lam)-1)]
}

// blocks rebuilds the optimal blocks of j nodes.
func (pl *plan) blocks(j int, out []block) []block {
	for j > 0 {
		m := pl.pick[j]
		if m == 0 {
			j--
			continue
		}
		out = append(out, block{c: pl.c, m: m, layers: pl.lam[m], region: pl.c.region})
		j -= m
	}
	return out
}

// block is m nodes of one class, side by side, each holding `layers` layers;
// or, when mixed is set, the given nodes of any classes of one region.
type block struct {
	c      *class
	m      int
	layers int
	nodes  []int
	region int
	// mixed[l] is a mixed block's capacity with l layers.
	mixed []float64
	// extra is the capacity of nodes added beside the members.
	extra float64
}

// capAt is the block's capacity if it held l layers.
func (b *block) capAt(l int) float64 {
	if b.mixed != nil {
		return b.mixed[l] + b.extra
	}
	return float64(b.m)*b.c.cap[l] + b.extra
}

func (b *block) capacity() float64 { return b.capAt(b.layers) }

// edgeNeed asks a region to put a block of at least `in` nodes first (where
// the pipeline enters it from another region) and of at least `out` nodes
// last (where it leaves); 0 asks nothing.
type edgeNeed struct{ in, out int }

// regionFit is how a region covers layers at a target: the per-class plans
// and how the edge blocks were chosen.
type regionFit struct {
	plans   []plan
	classes []*class
	base    int
	layers  int
	// first and last are the edge blocks (class index, size); -1 when none.
	firstClass, firstM int
	lastClass, lastM   int
	// single: the region is one block that serves both edges.
	single bool
}

// prepare runs the per-class knapsacks of one region at target; fit then
// answers for any edge needs without running them again.
func (rf *regionFit) prepare(classes []*class, target float64) {
	if cap(rf.plans) < len(classes) {
		rf.plans = make([]plan, len(classes))
	}
	rf.plans = rf.plans[:len(classes)]
	rf.classes = classes
	rf.base = 0
	for ci, c := range classes {
		rf.plans[ci].reset(c, target)
		rf.base += rf.plans[ci].best[len(c.nodes)]
	}
}

// fit computes how many layers the region covers with the given edge needs
// (after prepare), keeping the choice for reconstruction.
func (rf *regionFit) fit(need edgeNeed) {
	classes, base := rf.classes, rf.base
	rf.firstClass, rf.lastClass, rf.single = -1, -1, false
	rf.firstM, rf.lastM = 0, 0
	if need.in == 0 && need.out == 0 {
		rf.layers = base
		return
	}
	rf.layers = 0
	// One edge: one class gives up its knapsack optimum for a wide block.
	edge := func(ci, x int) (int, int) {
		pl := &rf.plans[ci]
		n := len(pl.c.nodes)
		bestV, bestM := -1, 0
		for m := x; m <= n; m++ {
			l := pl.lamAt(m)
			if l == 0 {
				continue
			}
			if v := pl.best[n-m] + l; v > bestV {
				bestV, bestM = v, m
			}
			if m >= len(pl.lam)-1 {
				break // larger blocks only idle more nodes
			}
		}
		return bestV, bestM
	}
	switch {
	case need.in == 0 || need.out == 0:
		x := max(need.in, need.out)
		for ci := range classes {
			v, m := edge(ci, x)
			if v < 0 {
				continue
			}
			if total := base - rf.plans[ci].best[len(classes[ci].nodes)] + v; total > rf.layers {
				rf.layers = total
				if need.in > 0 {
					rf.firstClass, rf.firstM = ci, m
				} else {
					rf.lastClass, rf.lastM = ci, m
				}
			}
		}
	default:
		rf.fitBothEdges(classes, base, need, edge)
	}
}

// fitBothEdges handles a region the pipeline both enters and leaves.
func (rf *regionFit) fitBothEdges(classes []*class, base int, need edgeNeed, edge func(ci, x int) (int, int)) {
	// A single block serving both edges.
	for ci := range classes {
		pl := &rf.plans[ci]
		if m := max(need.in, need.out); m <= len(pl.c.nodes) {
			if l := pl.lamAt(m); l > rf.layers {
				rf.layers, rf.single = l, true
				rf.firstClass, rf.firstM, rf.lastClass, rf.lastM = ci, m, ci, m
			}
		}
	}
	for a := range classes {
		for b := range classes {
			pa, pb := &rf.plans[a], &rf.plans[b]
			na := len(pa.c.nodes)
			if a != b {
				va, ma := edge(a, need.in)
				vb, mb := edge(b, need.out)
				if va < 0 || vb < 0 {
					continue
				}
				total := base - pa.best[na] - pb.best[len(pb.c.nodes)] + va + vb
				if total > rf.layers {
					rf.layers, rf.single = total, false
					rf.firstClass, rf.firstM, rf.lastClass, rf.lastM = a, ma, b, mb
				}
				continue
			}
			// Both edge blocks from the same class.
			for m1 := need.in; m1 <= na; m1++ {
				l1 := pa.lamAt(m1)
				if l1 == 0 {
					continue
				}
				for m2 := need.out; m1+m2 <= na; m2++ {
					l2 := pa.lamAt(m2)
					if l2 == 0 {
						continue
					}
					total := base - pa.best[na] + pa.best[na-m1-m2] + l1 + l2
					if total > rf.layers {
						rf.layers, rf.single = total, false
						rf.firstClass, rf.firstM, rf.lastClass, rf.lastM = a, m1, a, m2
					}
					if m2 >= len(pa.lam)-1 {
						break
					}
				}
				if m1 >= len(pa.lam)-1 {
					break
				}
			}
		}
	}
}

// blocks rebuilds the region's blocks in pipeline order: the entry block,
// the knapsack blocks, the exit block. Nodes are not yet chosen.
func (rf *regionFit) blocks() []block {
	var first, last *block
	used := make([]int, len(rf.plans))
	if rf.firstClass >= 0 {
		pl := &rf.plans[rf.firstClass]
		first = &block{c: pl.c, m: rf.firstM, layers: pl.lamAt(rf.firstM), region: pl.c.region}
		used[rf.firstClass] += rf.firstM
	}
	if rf.single {
		return []block{*first}
	}
	if rf.lastClass >= 0 {
		pl := &rf.plans[rf.lastClass]
		last = &block{c: pl.c, m: rf.lastM, layers: pl.lamAt(rf.lastM), region: pl.c.region}
		used[rf.lastClass] += rf.lastM
	}
	var out []block
	if first != nil {
		out = append(out, *first)
	}
	var middle []block
	for ci := range rf.plans {
		pl := &rf.plans[ci]
		middle = pl.blocks(len(pl.c.nodes)-used[ci], middle)
	}
	// Strong blocks first: any order is valid inside a region; a fixed one
	// keeps plans reproducible.
	slices.SortStableFunc(middle, func(a, b block) int {
		return cmp.Compare(b.layers, a.layers)
	})
	out = append(out, middle...)
	if last != nil {
		out = append(out, *last)
	}
	return out
}

// mixedCover covers layers at target with blocks of nodes of any class,
// for the nodes the class knapsacks leave idle (classes too small or too
// slow to fill a block alone, common on fleets of many machine types). Each
// node takes the layer count that serves the most layer-tokens at target
// (λ·min(c(λ), target)); a node that reaches target alone is a block; the
// others are grouped by layer count, and each group is cut into blocks whose
// capacities add up to target, largest node first, each block closed by the
// smallest node that completes it.
func mixedCover(f *Fleet, nodes []int, target float64) (int, []block) {
	byLayers := map[int][]int{}
	var blocks []block
	layers := 0
	for _, i := range nodes {
		best, bestV := 0, 0.0
		for l := 1; l <= f.limit[i]; l++ {
			if v := float64(l) * min(f.capacity[i][l], target); v > bestV*(1+1e-12) {
				best, bestV = l, v
			}
		}
		if best == 0 {
			continue
		}
		if f.capacity[i][best] >= target {
			blocks = append(blocks, mixedBlock(f, []int{i}, best))
			layers += best
			continue
		}
		byLayers[best] = append(byLayers[best], i)
	}
	for _, l := range slices.Sorted(maps.Keys(byLayers)) {
		items := byLayers[l]
		slices.SortStableFunc(items, func(a, b int) int { return cmp.Compare(f.capacity[b][l], f.capacity[a][l]) })
		used := make([]bool, len(items))
		left := len(items)
		for left > 0 {
			var members []int
			sum := 0.0
			for sum < target && left > 0 {
				// The smallest unused node that completes the block, else the largest.
				pick := -1
				for k := len(items) - 1; k >= 0; k-- {
					if !used[k] && sum+f.capacity[items[k]][l] >= target {
						pick = k
						break
					}
				}
				if pick < 0 {
					for k := range items {
						if !used[k] {
							pick = k
							break
						}
					}
				}
				used[pick] = true
				left--
				members = append(members, items[pick])
				sum += f.capacity[items[pick]][l]
			}
			if sum < target {
				break // the rest cannot fill a block
			}
			blocks = append(blocks, mixedBlock(f, members, l))
			layers += l
		}
	}
	return layers, blocks
}

// leftovers lists the nodes the knapsack optimum of a region without edge
// needs leaves idle (class members are taken in order).
func (rf *regionFit) leftovers() []int {
	var out []int
	for ci := range rf.plans {
		pl := &rf.plans[ci]
		n := len(pl.c.nodes)
		used := 0
		for j := n; j > 0; {
			m := pl.pick[j]
			if m == 0 {
				j--
				continue
			}
			used += m
			j -= m
		}
		out = append(out, pl.c.nodes[used:]...)
	}
	return out
}

// mixedBlock makes a block of the given nodes holding l layers.
func mixedBlock(f *Fleet, nodes []int, l int) block {
	longest := 0
	for _, i := range nodes {
		longest = max(longest, f.limit[i])
	}
	table := make([]float64, longest+1)
	for k := 1; k <= longest; k++ {
		for _, i := range nodes {
			table[k] += f.Capacity(i, k)
		}
	}
	return block{layers: l, nodes: nodes, region: f.region[nodes[0]], mixed: table, m: len(nodes)}
}
