package placement

import (
	"fmt"
	"math"
	"slices"
)

// FlowMode says which hand-offs between nodes the max flow may use.
type FlowMode int

const (
	// Strict lets node i hand a token to node j only when i's range ends
	// where j's begins (End_i == First_j). This is the objective the Helix
	// MILP maximises, and what this package's figures use.
	Strict FlowMode = iota
	// Partial also lets j take over inside its range (First_j ≤ End_i <
	// End_j), skipping the layers i already ran, as Petals does.
	Partial
)

// String returns "strict" or "partial".
func (m FlowMode) String() string {
	if m == Partial {
		return "partial"
	}
	return "strict"
}

// MarshalText implements encoding.TextMarshaler.
func (m FlowMode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (m *FlowMode) UnmarshalText(b []byte) error {
	v, err := ParseFlowMode(string(b))
	*m = v
	return err
}

// ParseFlowMode reads "strict" or "partial".
func ParseFlowMode(s string) (FlowMode, error) {
	switch s {
	case "strict", "":
		return Strict, nil
	case "partial":
		return Partial, nil
	}
	return Strict, fmt.Errorf("flow mode %q: want strict or partial", s)
}

// Flow is the result of evaluating a placement.
type Flow struct {
	// TokensPerS is the max flow from the coordinator through the nodes and
	// back: the placement's token throughput.
	TokensPerS float64
	// NodeTokensPerS is the flow through each assignment, in the order given.
	NodeTokensPerS []float64
}

// Evaluate computes the max-flow throughput of assignments on p, as the
// Helix paper defines it (its MILP objective): node i holding k layers is an
// edge of capacity min(throughput(k), NIC/activation bytes); the coordinator
// feeds nodes starting at layer 0 (link bandwidth / token bytes) and drains
// nodes ending at the last layer; node i feeds node j over their link
// (bandwidth / activation bytes) when mode allows the hand-off.
// Assignments may come from anywhere: a node may hold more layers than its
// limit (it is then scored as its throughput model says), but it must exist
// and its range must lie inside the model.
func Evaluate(p *Problem, assignments []Assignment, mode FlowMode) (Flow, error) {
	f, err := NewFleet(p)
	if err != nil {
		return Flow{}, err
	}
	spans, err := f.spans(assignments)
	if err != nil {
		return Flow{}, err
	}
	var ev evaluator
	total, per := ev.run(f, spans, mode, true)
	return Flow{TokensPerS: total, NodeTokensPerS: per}, nil
}

// span is an assignment by node index; pipe numbers the pipeline it
// belongs to (see Assignment.Pipeline).
type span struct {
	node, first, end int
	pipe             int
}

func (s span) layers() int { return s.end - s.first }

// spans resolves assignments to node indices and checks their ranges.
func (f *Fleet) spans(as []Assignment) ([]span, error) {
	index := make(map[string]int, len(f.problem.Nodes))
	for i := range f.problem.Nodes {
		index[f.problem.Nodes[i].ID] = i
	}
	out := make([]span, 0, len(as))
	seen := make(map[int]bool, len(as))
	for _, a := range as {
		i, ok := index[a.Node]
		if !ok {
			return nil, fmt.Errorf("%w: node %q is not in the problem", ErrInvalidPlacement, a.Node)
		}
		if seen[i] {
			return nil, fmt.Errorf("%w: node %q is assigned twice", ErrInvalidPlacement, a.Node)
		}
		if a.First < 0 || a.End > f.problem.Model.Layers || a.First >= a.End {
			return nil, fmt.Errorf("%w: node %q has layers [%d, %d) outside [0, %d)",
				ErrInvalidPlacement, a.Node, a.First, a.End, f.problem.Model.Layers)
		}
		seen[i] = true
		out = append(out, span{node: i, first: a.First, end: a.End, pipe: a.Pipeline})
	}
	return out, nil
}

// evaluator builds the flow graph of a placement and keeps its buffers for
// the next one.
type evaluator struct {
	net     flowNet
	groups  []flowGroup
	members []int
	byKey   map[groupKey]int
	starts  [][]int32
	nodeCap []int
}

// flowGroup is a set of interchangeable nodes (same range, region, capacity
// and links), evaluated as one vertex pair: by symmetry an even split of the
// group's flow is feasible, so merging them changes nothing but the size of
// the graph.
type flowGroup struct {
	first, end int
	region     int
	capacity   float64
	src, sink  float64
	members    []int // indices into the spans slice
	pinned     bool  // has node-level links: a group of one
}

type groupKey struct {
	first, end, region  int
	capacity, src, sink float64
}

// groupThreshold is the number of spans above which interchangeable nodes are
// merged; below it the graph is small anyway and merging costs more than it saves.
const groupThreshold = 64

// run returns the max flow and, when perNode is set, the flow through each span.
func (ev *evaluator) run(f *Fleet, spans []span, mode FlowMode, perNode bool) (float64, []float64) {
	L := f.problem.Model.Layers
	ev.group(f, spans)
	g := &ev.net
	g.reset(2 + 2*len(ev.groups))
	const source, sink = 0, 1
	tok := float64(f.problem.Model.TokenBytes)
	ev.nodeCap = ev.nodeCap[:0]
	for gi := range ev.groups {
		gr := &ev.groups[gi]
		in, out := 2+2*gi, 3+2*gi
		ev.nodeCap = append(ev.nodeCap, g.addEdge(in, out, gr.capacity))
		if gr.first == 0 && gr.src > 0 {
			g.addEdge(source, in, perUnit(gr.src, tok))
		}
		if gr.end == L && gr.sink > 0 {
			g.addEdge(out, sink, perUnit(gr.sink, tok))
		}
	}
	ev.addLinks(f, spans, mode)
	total := g.maxFlow(source, sink)
	if !perNode {
		return total, nil
	}
	per := make([]float64, len(spans))
	for gi := range ev.groups {
		gr := &ev.groups[gi]
		share := g.flowOn(ev.nodeCap[gi]) / float64(len(gr.members))
		for _, m := range gr.members {
			per[m] = share
		}
	}
	return total, per
}

// perUnit turns a bandwidth into a token rate for items of `size` bytes.
func perUnit(bw, size float64) float64 {
	if size <= 0 {
		return math.Inf(1)
	}
	return bw / size
}

// group fills ev.groups from spans.
func (ev *evaluator) group(f *Fleet, spans []span) {
	ev.groups = ev.groups[:0]
	ev.members = ev.members[:0]
	merge := len(spans) > groupThreshold
	if merge {
		if ev.byKey == nil {
			ev.byKey = map[groupKey]int{}
		}
		clear(ev.byKey)
	}
	for si, s := range spans {
		c := f.capacityAt(s.node, s.layers())
		pinned := f.hasOverride[s.node]
		if merge && !pinned {
			k := groupKey{s.first, s.end, f.region[s.node], c, f.srcBW[s.node], f.sinkBW[s.node]}
			if gi, ok := ev.byKey[k]; ok {
				gr := &ev.groups[gi]
				gr.members = append(gr.members, si)
				gr.capacity += c
				gr.src += f.srcBW[s.node]
				gr.sink += f.sinkBW[s.node]
				continue
			}
			ev.byKey[k] = len(ev.groups)
		}
		ev.groups = append(ev.groups, flowGroup{
			first: s.first, end: s.end, region: f.region[s.node], capacity: c,
			src: f.srcBW[s.node], sink: f.sinkBW[s.node], members: []int{si}, pinned: pinned,
		})
	}
}

// addLinks adds the hand-off edges between groups that mode allows.
func (ev *evaluator) addLinks(f *Fleet, spans []span, mode FlowMode) {
	L := f.problem.Model.Layers
	ev.starts = resize(ev.starts, L+1)
	for b := range ev.starts {
		ev.starts[b] = ev.starts[b][:0]
	}
	for gi := range ev.groups {
		ev.starts[ev.groups[gi].first] = append(ev.starts[ev.groups[gi].first], int32(gi))
	}
	act := float64(f.problem.Model.ActivationBytesPerToken)
	for gi := range ev.groups {
		from := &ev.groups[gi]
		if from.end >= L {
			continue
		}
		lo, hi := from.end, from.end
		if mode == Partial {
			lo = 0
		}
		for b := lo; b <= hi; b++ {
			for _, hj := range ev.starts[b] {
				to := &ev.groups[hj]
				if int(hj) == gi || to.end <= from.end {
					continue
				}
				if c := ev.linkCapacity(f, spans, from, to); c > 0 {
					ev.net.addEdge(3+2*gi, 2+2*int(hj), perUnit(c, act))
				}
			}
		}
	}
}

// linkCapacity is the total bandwidth between the members of two groups.
func (ev *evaluator) linkCapacity(f *Fleet, spans []span, from, to *flowGroup) float64 {
	if !from.pinned && !to.pinned {
		return float64(len(from.members)*len(to.members)) * f.regionBW[from.region][to.region]
	}
	total := 0.0
	for _, a := range from.members {
		for _, b := range to.members {
			total += f.bandwidth(spans[a].node, spans[b].node)
		}
	}
	return total
}

// sortedSpans returns spans ordered by (first, end, node): the order stages
// and outputs use.
func sortedSpans(spans []span) []span {
	out := slices.Clone(spans)
	slices.SortFunc(out, func(a, b span) int {
		if a.first != b.first {
			return a.first - b.first
		}
		if a.end != b.end {
			return a.end - b.end
		}
		return a.node - b.node
	})
	return out
}
