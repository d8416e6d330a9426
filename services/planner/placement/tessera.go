package placement

import (
	"cmp"
	"context"
	"fmt"
	"slices"
)

// TesseraName is the name of the default strategy.
const TesseraName = "tessera"

// Tessera is the default strategy: throughput-balanced pipelines of blocks
// over heterogeneous nodes, region-aware, polished by local search on the
// exact max flow. With a previous placement it re-plans incrementally.
type Tessera struct {
	// Evaluations bounds the local search that polishes a plan, in max-flow
	// evaluations (0: DefaultEvaluations; negative: no search). A count, not
	// a time, so that plans are reproducible on any machine.
	Evaluations int
	// Seed seeds the local search.
	Seed uint64
	// FlowFloor is the share of a from-scratch plan's throughput that an
	// incremental re-plan must keep (0: DefaultFlowFloor).
	FlowFloor float64
}

// DefaultFlowFloor is the FlowFloor of a Tessera with FlowFloor 0.
const DefaultFlowFloor = 0.95

var _ Strategy = Tessera{}

// Name implements Strategy.
func (Tessera) Name() string { return TesseraName }

// Place implements Strategy. Without prev it plans from scratch; with prev
// it keeps what it can of prev (see Replan).
func (t Tessera) Place(ctx context.Context, p *Problem, prev *Placement) (*Placement, error) {
	f, err := NewFleet(p)
	if err != nil {
		return nil, err
	}
	if prev != nil {
		return t.replan(ctx, f, prev)
	}
	spans, err := t.scratch(ctx, f)
	if err != nil {
		return nil, err
	}
	return finish(f, TesseraName, spans, nil, Strict), nil
}

// compile builds the fleet of p and lists its eligible nodes; a fleet
// without any is ErrInfeasible.
func compile(p *Problem) (*Fleet, []int, error) {
	f, err := NewFleet(p)
	if err != nil {
		return nil, nil, err
	}
	nodes := f.eligible()
	if len(nodes) == 0 {
		return nil, nil, fmt.Errorf("%w: none of the %d nodes may hold layers", ErrInfeasible, len(p.Nodes))
	}
	return f, nodes, nil
}

// eligible lists the nodes that may hold layers.
func (f *Fleet) eligible() []int {
	var out []int
	for i := range f.problem.Nodes {
		if f.limit[i] > 0 {
			out = append(out, i)
		}
	}
	return out
}

// scratch plans without regard to any previous placement.
func (t Tessera) scratch(ctx context.Context, f *Fleet) ([]span, error) {
	nodes := f.eligible()
	spans, err := construct(f, nodes)
	if err != nil {
		return nil, err
	}
	return t.polish(ctx, f, spans), nil
}

// construct builds the block pipelines of the given nodes.
func construct(f *Fleet, nodes []int) ([]span, error) {
	classes := buildClasses(f, nodes)
	byRegion := map[int][]*class{}
	for _, c := range classes {
		byRegion[c.region] = append(byRegion[c.region], c)
	}
	nw := newNetwork(f, nodes)
	for round := 0; ; round++ {
		chains := regionChains(f, nw, byRegion)
		if len(chains) == 0 {
			return nil, fmt.Errorf("%w: %d eligible nodes cannot hold the %d layers of %s between them",
				ErrInfeasible, len(nodes), f.problem.Model.Layers, f.problem.Model.Name)
		}
		var spans []span
		calibrated := false
		for pipe, ch := range chains {
			blocks, idle := ch.blocks(f)
			fill(f, blocks, idle)
			if nw.calibrate(f, blocks, ch.target) {
				calibrated = true
			}
			spans = append(spans, blockSpans(blocks, pipe)...)
		}
		if !calibrated || round == calibrationRounds {
			return spans, nil
		}
	}
}

// calibrationRounds bounds how often construct re-plans after learning that
// a crossing's links are slower than the regions' mean suggested.
const calibrationRounds = 3

// calibrate checks every region crossing of laid-out blocks against the
// real links of the chosen nodes; where they carry less than target, it
// lowers the planning bandwidth of that region pair to what they carry and
// reports true.
func (nw *network) calibrate(f *Fleet, blocks []block, target float64) bool {
	act := float64(f.problem.Model.ActivationBytesPerToken)
	changed := false
	for bi := 0; bi+1 < len(blocks); bi++ {
		a, b := &blocks[bi], &blocks[bi+1]
		ra, rb := a.region, b.region
		if ra == rb {
			continue
		}
		real := 0.0
		for _, i := range a.nodes {
			for _, j := range b.nodes {
				real += perUnit(f.bandwidth(i, j), act)
			}
		}
		if real < target*(1-1e-9) {
			perPair := real / float64(len(a.nodes)*len(b.nodes)) * (1 - 1e-6)
			if perPair < nw.pairTok[ra][rb] {
				nw.pairTok[ra][rb] = perPair
				changed = true
			}
		}
	}
	return changed
}

// fill adds idle nodes beside the weakest block of their region that they
// can hold, strongest node first: spare capacity where it raises the
// bottleneck.
func fill(f *Fleet, blocks []block, idle []int) {
	slices.SortStableFunc(idle, func(a, b int) int {
		return cmp.Compare(f.capacity[b][f.limit[b]], f.capacity[a][f.limit[a]])
	})
	for _, i := range idle {
		best := -1
		for bi := range blocks {
			b := &blocks[bi]
			if b.region != f.region[i] || b.layers > f.limit[i] || f.capacity[i][b.layers] <= 0 {
				continue
			}
			if best < 0 || b.capacity() < blocks[best].capacity() {
				best = bi
			}
		}
		if best >= 0 {
			b := &blocks[best]
			b.nodes = append(b.nodes, i)
			b.extra += f.capacity[i][b.layers]
		}
	}
}
