package placement

import (
	"fmt"
	"math"
	"slices"
)

// Filter is one feasibility step. It looks at a single node and returns the
// most layers the node may hold; 0 rejects the node, and then reason says
// why in words an operator understands. Filters never see other nodes, so
// each can be tested alone and a rejection names exactly one cause.
type Filter interface {
	// Name is the step's name as it appears in rejections.
	Name() string
	// Limit returns the most layers n may hold and, when that is 0, why.
	Limit(p *Problem, n *Node) (maxLayers int, reason string)
}

// Scorer is one scoring step: an upper bound on the token rate through a
// node holding k layers. A node's capacity is the smallest bound of all
// scorers, so each scorer models one resource (compute, NIC, ...).
type Scorer interface {
	// Name is the step's name as it appears in rejections.
	Name() string
	// TokensPerSecond bounds the rate through n when it holds `layers` layers.
	TokensPerSecond(p *Problem, n *Node, layers int) float64
}

// Rejection records why a node holds nothing: the step that rejected it and
// its reason.
type Rejection struct {
	Node   string `json:"node"`
	Step   string `json:"step"`
	Reason string `json:"reason"`
}

// StateFilter rejects nodes the registry does not report as active
// (draining, quarantined, offline).
type StateFilter struct{}

// MemoryFilter limits a node to the layers whose weights, plus the model's
// KV reserve, fit its memory, and to the node's own MaxLayers. When the
// model spreads its experts, a node is sized for its layers' trunks and a
// shard of their experts (Model.ExpertSpread), unless Node.AllExperts.
type MemoryFilter struct{}

// RegionFilter rejects nodes in the problem's excluded regions. (Whether a
// node's links carry enough traffic is the evaluator's business, not a filter's.)
type RegionFilter struct{}

// ModelScorer bounds a node by its own ThroughputModel.
type ModelScorer struct{}

// NICScorer bounds a node by its NIC: every token's activation passes
// through it once in each direction.
type NICScorer struct{}

var (
	_ Filter = StateFilter{}
	_ Filter = MemoryFilter{}
	_ Filter = RegionFilter{}
	_ Scorer = ModelScorer{}
	_ Scorer = NICScorer{}
)

// Name implements Filter.
func (StateFilter) Name() string { return "state" }

// Limit implements Filter.
func (StateFilter) Limit(p *Problem, n *Node) (int, string) {
	if !n.State.active() {
		return 0, fmt.Sprintf("node is %s", n.State)
	}
	return p.Model.Layers, ""
}

// Name implements Filter.
func (MemoryFilter) Name() string { return "memory" }

// Limit implements Filter. Layers may differ in size: the limit is the
// most layers whose largest ones fit, so that any range of that many does.
func (MemoryFilter) Limit(p *Problem, n *Node) (int, string) {
	limit := p.Model.Layers
	if n.MaxLayers > 0 {
		limit = min(limit, n.MaxLayers)
	}
	share := p.Model.share(n)
	need := p.Model.layerNeeds(share)
	fits, sum := 0, int64(0)
	for fits < limit && sum+need[fits] <= n.MemoryBytes {
		sum += need[fits]
		fits++
	}
	if fits > 0 {
		return fits, ""
	}
	if share < p.Model.Experts {
		return 0, fmt.Sprintf("one layer with %d of its %d experts needs %d bytes (weights and KV reserve), node has %d",
			share, p.Model.Experts, need[0], n.MemoryBytes)
	}
	return 0, fmt.Sprintf("one layer needs %d bytes (weights and KV reserve), node has %d", need[0], n.MemoryBytes)
}

// Name implements Filter.
func (RegionFilter) Name() string { return "region" }

// Limit implements Filter.
func (RegionFilter) Limit(p *Problem, n *Node) (int, string) {
	if slices.Contains(p.ExcludeRegions, n.Region) {
		return 0, fmt.Sprintf("region %q is excluded", n.Region)
	}
	return p.Model.Layers, ""
}

// Name implements Scorer.
func (ModelScorer) Name() string { return "throughput" }

// TokensPerSecond implements Scorer.
func (ModelScorer) TokensPerSecond(_ *Problem, n *Node, layers int) float64 {
	v := n.Throughput.TokensPerSecond(layers)
	if v < 0 || math.IsNaN(v) {
		return 0
	}
	return v
}

// Name implements Scorer.
func (NICScorer) Name() string { return "nic" }

// TokensPerSecond implements Scorer.
func (NICScorer) TokensPerSecond(p *Problem, n *Node, _ int) float64 {
	act := float64(p.Model.ActivationBytesPerToken)
	limit := math.Inf(1)
	for _, nic := range []float64{n.InboundBytesPerS, n.OutboundBytesPerS} {
		if nic > 0 && act > 0 {
			limit = min(limit, nic/act)
		}
	}
	return limit
}

// DefaultFilters are the feasibility steps every strategy uses unless told
// otherwise: state, region, memory.
func DefaultFilters() []Filter { return []Filter{StateFilter{}, RegionFilter{}, MemoryFilter{}} }

// DefaultScorers are the capacity bounds every strategy uses unless told
// otherwise: the node's throughput model and its NIC.
func DefaultScorers() []Scorer { return []Scorer{ModelScorer{}, NICScorer{}} }

// Fleet is a Problem compiled for planning: per node its layer limit after
// the filters, its capacity for each layer count after the scorers, and the
// link bandwidths, all indexed by the node's position in Problem.Nodes.
type Fleet struct {
	problem *Problem
	scorers []Scorer
	// limit[i] is the most layers node i may hold (0: rejected).
	limit []int
	// capacity[i][k] is node i's token rate holding k ≤ limit[i] layers.
	capacity [][]float64
	// region[i] indexes regions; coordRegion is -1 when the coordinator is everywhere.
	region      []int
	regions     []string
	coordRegion int
	regionBW    [][]float64
	// overrides holds NodeLinks by (from, to) with the coordinator as index -1.
	overrides   map[[2]int]float64
	hasOverride []bool
	// srcBW[i] and sinkBW[i] are the coordinator's links to and from node i.
	srcBW, sinkBW []float64
	rejections    []Rejection
}

// NewFleet compiles p with the default filters and scorers.
func NewFleet(p *Problem) (*Fleet, error) {
	return NewFleetWith(p, DefaultFilters(), DefaultScorers())
}

// NewFleetWith compiles p with the given feasibility and scoring steps.
func NewFleetWith(p *Problem, filters []Filter, scorers []Scorer) (*Fleet, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	n := len(p.Nodes)
	f := &Fleet{
		problem:     p,
		scorers:     scorers,
		limit:       make([]int, n),
		capacity:    make([][]float64, n),
		region:      make([]int, n),
		coordRegion: -1,
		overrides:   map[[2]int]float64{},
		hasOverride: make([]bool, n),
		srcBW:       make([]float64, n),
		sinkBW:      make([]float64, n),
	}
	f.compileNetwork()
	for i := range p.Nodes {
		f.limit[i] = f.screen(i, filters)
	}
	return f, nil
}

// screen runs the filters and scorers on node i, records a rejection if one
// applies, fills its capacity table and returns its layer limit.
func (f *Fleet) screen(i int, filters []Filter) int {
	p := f.problem
	node := &p.Nodes[i]
	limit := p.Model.Layers
	for _, flt := range filters {
		l, reason := flt.Limit(p, node)
		if l <= 0 {
			f.rejections = append(f.rejections, Rejection{Node: node.ID, Step: flt.Name(), Reason: reason})
			return 0
		}
		limit = min(limit, l)
	}
	table := make([]float64, limit+1)
	usable := 0
	for k := 1; k <= limit; k++ {
		table[k] = f.score(i, k)
		if table[k] > 0 {
			usable = k
		}
	}
	if usable == 0 {
		step := "scoring"
		for _, s := range f.scorers {
			if s.TokensPerSecond(p, node, 1) <= 0 {
				step = s.Name()
				break
			}
		}
		f.rejections = append(f.rejections, Rejection{Node: node.ID, Step: step, Reason: "0 tokens/s with any layer count"})
		return 0
	}
	f.capacity[i] = table[:usable+1]
	return usable
}

// score is node i's capacity holding k layers: the smallest scorer bound.
func (f *Fleet) score(i, k int) float64 {
	c := math.Inf(1)
	for _, s := range f.scorers {
		c = min(c, s.TokensPerSecond(f.problem, &f.problem.Nodes[i], k))
	}
	if math.IsInf(c, 1) || math.IsNaN(c) {
		return 0
	}
	return c
}

// capacityAt is node i's capacity with k layers, also beyond its limit (to
// evaluate placements made elsewhere).
func (f *Fleet) capacityAt(i, k int) float64 {
	if k <= 0 {
		return 0
	}
	if k < len(f.capacity[i]) {
		return f.capacity[i][k]
	}
	return f.score(i, k)
}

func (f *Fleet) compileNetwork() {
	p := f.problem
	index := map[string]int{}
	regionOf := func(name string) int {
		r, ok := index[name]
		if !ok {
			r = len(f.regions)
			index[name] = r
			f.regions = append(f.regions, name)
		}
		return r
	}
	for i := range p.Nodes {
		f.region[i] = regionOf(p.Nodes[i].Region)
	}
	if p.Network.CoordinatorRegion != "" {
		f.coordRegion = regionOf(p.Network.CoordinatorRegion)
	}
	r := len(f.regions)
	f.regionBW = make([][]float64, r)
	for a := range f.regionBW {
		f.regionBW[a] = make([]float64, r)
		f.regionBW[a][a] = math.Inf(1)
	}
	for _, l := range p.Network.RegionLinks {
		a, okA := index[l.From]
		b, okB := index[l.To]
		if okA && okB {
			f.regionBW[a][b] = l.BandwidthBytesPerS
			f.regionBW[b][a] = l.BandwidthBytesPerS
		}
	}
	nodeIndex := make(map[string]int, len(p.Nodes))
	for i := range p.Nodes {
		nodeIndex[p.Nodes[i].ID] = i
	}
	endpoint := func(id string) int {
		if id == Coordinator {
			return -1
		}
		return nodeIndex[id]
	}
	for _, l := range p.Network.NodeLinks {
		a, b := endpoint(l.From), endpoint(l.To)
		f.overrides[[2]int{a, b}] = l.BandwidthBytesPerS
		if a >= 0 && b >= 0 {
			f.hasOverride[a], f.hasOverride[b] = true, true
		}
	}
	for i := range p.Nodes {
		f.srcBW[i] = f.bandwidth(-1, i)
		f.sinkBW[i] = f.bandwidth(i, -1)
	}
}

// bandwidth is bytes/s from endpoint a to b (-1 is the coordinator), by the
// rules on Network.
func (f *Fleet) bandwidth(a, b int) float64 {
	if bw, ok := f.overrides[[2]int{a, b}]; ok {
		return bw
	}
	ra, rb := f.coordRegion, f.coordRegion
	if a >= 0 {
		ra = f.region[a]
	}
	if b >= 0 {
		rb = f.region[b]
	}
	if ra < 0 || rb < 0 {
		return math.Inf(1)
	}
	return f.regionBW[ra][rb]
}

// Problem returns the problem the fleet was compiled from.
func (f *Fleet) Problem() *Problem { return f.problem }

// Rejections lists the nodes that may hold nothing, with the step and reason.
func (f *Fleet) Rejections() []Rejection { return slices.Clone(f.rejections) }

// MaxLayers is the most layers node i (its index in Problem.Nodes) may hold.
func (f *Fleet) MaxLayers(i int) int { return f.limit[i] }

// Capacity is node i's token rate holding k layers (0 beyond its limit).
func (f *Fleet) Capacity(i, k int) float64 {
	if k <= 0 || k >= len(f.capacity[i]) {
		return 0
	}
	return f.capacity[i][k]
}
