package placement

import (
	"fmt"
	"slices"
)

// Placement is a plan: which node holds which layers, the throughput that
// gives, and the stages the router walks.
type Placement struct {
	// Version increases with every plan of the same model; a strategy sets it
	// to prev.Version+1 (1 without a previous plan).
	Version uint64 `json:"version"`
	// Model is the model's name.
	Model string `json:"model"`
	// Strategy names the strategy that made the plan.
	Strategy string `json:"strategy"`
	// Mode is the hand-off rule TokensPerS was computed with.
	Mode FlowMode `json:"mode"`
	// TokensPerS is the max-flow throughput of the plan.
	TokensPerS float64 `json:"tokens_per_s"`
	// Assignments lists the nodes that hold layers, ordered by (First, End, node order).
	Assignments []Assignment `json:"assignments"`
	// Stages cut [0, layers) at every range boundary; each lists its replicas.
	Stages []Stage `json:"stages"`
	// Rejections lists the nodes that could not hold layers, and why.
	Rejections []Rejection `json:"rejections,omitempty"`
	// Replan compares an incremental plan with a fresh one (nil for a fresh plan).
	Replan *Replan `json:"replan,omitempty"`
}

// Assignment is one node's share: the contiguous layers [First, End).
type Assignment struct {
	Node  string `json:"node"`
	First int    `json:"first"`
	End   int    `json:"end"`
	// Pipeline numbers the chain of blocks the node was planned in: a
	// strategy builds one or more pipelines that each cover every layer
	// (tessera: one per region or group of regions). Re-planning keeps them.
	Pipeline int `json:"pipeline"`
	// Experts lists the experts the node holds in each of its layers; nil
	// means all of them (and always for a dense model).
	Experts []int `json:"experts,omitempty"`
	// TokensPerS is the flow through this node in the max flow.
	TokensPerS float64 `json:"tokens_per_s"`
}

// Layers is the number of layers the assignment holds.
func (a Assignment) Layers() int { return a.End - a.First }

// Stage is a range of layers that the same set of nodes covers entirely;
// the router picks one replica per stage.
type Stage struct {
	First    int       `json:"first"`
	End      int       `json:"end"`
	Replicas []Replica `json:"replicas"`
}

// Replica is a node covering a stage, with the flow the max flow sends
// through it (a routing weight; 0 for a node kept only as a spare).
type Replica struct {
	Node       string  `json:"node"`
	TokensPerS float64 `json:"tokens_per_s"`
}

// Assignment returns the assignment of node id, if it holds layers.
func (pl *Placement) Assignment(id string) (Assignment, bool) {
	for _, a := range pl.Assignments {
		if a.Node == id {
			return a, true
		}
	}
	return Assignment{}, false
}

// BuildStages cuts [0, layers) at every boundary of the assignments and lists,
// per stage, the nodes whose range covers it.
func BuildStages(layers int, assignments []Assignment) []Stage {
	cuts := []int{0, layers}
	for _, a := range assignments {
		cuts = append(cuts, a.First, a.End)
	}
	slices.Sort(cuts)
	cuts = slices.Compact(cuts)
	var stages []Stage
	for c := 0; c+1 < len(cuts); c++ {
		st := Stage{First: cuts[c], End: cuts[c+1]}
		for _, a := range assignments {
			if a.First <= st.First && st.End <= a.End {
				st.Replicas = append(st.Replicas, Replica{Node: a.Node, TokensPerS: a.TokensPerS})
			}
		}
		stages = append(stages, st)
	}
	return stages
}

// MovedBytes is the weight bytes the nodes of next must fetch that they do
// not already hold under prev: for each node, the fragments of its new
// range outside its old range (trunks and the experts it holds), and in
// the layers it keeps, the experts it did not hold. Nodes that only drop
// layers or experts move nothing.
func MovedBytes(m Model, prev, next *Placement) int64 {
	old := map[string]Assignment{}
	if prev != nil {
		for _, a := range prev.Assignments {
			old[a.Node] = a
		}
	}
	var moved int64
	for _, a := range next.Assignments {
		o, ok := old[a.Node]
		for l := a.First; l < a.End; l++ {
			if !ok || l < o.First || l >= o.End {
				moved += m.WeightBytes(l, l+1, a.Experts)
			} else if o.Experts != nil {
				moved += m.expertBytes(l, missing(m.Experts, a.Experts, o.Experts))
			}
		}
	}
	return moved
}

// missing lists the experts of want (nil: all n) that have lacks (empty
// when none do).
func missing(n int, want, have []int) []int {
	out := []int{}
	for e := range n {
		if (want == nil || slices.Contains(want, e)) && !slices.Contains(have, e) {
			out = append(out, e)
		}
	}
	return out
}

// CheckPlacement reports the first reason pl is not a valid plan for p:
// an unknown or ineligible node, a range outside the model, a node holding
// more layers than its limit, or a layer nobody holds.
func CheckPlacement(f *Fleet, pl *Placement) error {
	spans, err := f.spans(pl.Assignments)
	if err != nil {
		return err
	}
	covered := make([]bool, f.problem.Model.Layers)
	for _, s := range spans {
		id := f.problem.Nodes[s.node].ID
		if s.layers() > f.limit[s.node] {
			return fmt.Errorf("%w: node %q holds %d layers, its limit is %d",
				ErrInvalidPlacement, id, s.layers(), f.limit[s.node])
		}
		for l := s.first; l < s.end; l++ {
			covered[l] = true
		}
	}
	if i := slices.Index(covered, false); i >= 0 {
		return fmt.Errorf("%w: no node holds layer %d", ErrInvalidPlacement, i)
	}
	return nil
}

// finish turns spans into a Placement: it evaluates the max flow, orders
// the assignments and cuts the stages.
func finish(f *Fleet, name string, spans []span, prev *Placement, mode FlowMode) *Placement {
	p := f.problem
	spans = sortedSpans(spans)
	var ev evaluator
	total, per := ev.run(f, spans, mode, true)
	pl := &Placement{
		Version:    1,
		Model:      p.Model.Name,
		Strategy:   name,
		Mode:       mode,
		TokensPerS: total,
		Rejections: f.Rejections(),
	}
	if prev != nil {
		pl.Version = prev.Version + 1
	}
	for i, s := range spans {
		pl.Assignments = append(pl.Assignments, Assignment{
			Node: p.Nodes[s.node].ID, First: s.first, End: s.end, Pipeline: s.pipe, TokensPerS: per[i],
		})
	}
	pl.Stages = BuildStages(p.Model.Layers, pl.Assignments)
	return pl
}
