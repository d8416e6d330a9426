package placement

import (
	"cmp"
	"slices"
)

// layer returns layer l's trunk bytes and the bytes of each of its
// experts: the stored sizes when the model lists them, else estimates
// from LayerBytes and ExpertBytes.
func (m *Model) layer(l int) (int64, []int64) {
	if l >= 0 && l < len(m.LayerFragments) {
		return m.LayerFragments[l].Trunk, m.LayerFragments[l].Experts
	}
	experts := make([]int64, m.Experts)
	for e := range experts {
		experts[e] = m.ExpertBytes
	}
	return m.LayerBytes - int64(m.Experts)*m.ExpertBytes, experts
}

// memory is each node's memory budget by id.
func (p *Problem) memory() map[string]int64 {
	memory := make(map[string]int64, len(p.Nodes))
	for _, n := range p.Nodes {
		memory[n.ID] = n.MemoryBytes
	}
	return memory
}

// expertBytes is the bytes of the listed experts of layer l (nil: all).
func (m *Model) expertBytes(l int, experts []int) int64 {
	_, sizes := m.layer(l)
	var sum int64
	if experts == nil {
		for _, b := range sizes {
			sum += b
		}
		return sum
	}
	for _, e := range experts {
		if e >= 0 && e < len(sizes) {
			sum += sizes[e]
		}
	}
	return sum
}

// WeightBytes is the weight bytes of layers [first, end) with the listed
// experts of each: nil means all of them, an empty list none (the trunks
// alone).
func (m *Model) WeightBytes(first, end int, experts []int) int64 {
	var sum int64
	for l := first; l < end; l++ {
		trunk, _ := m.layer(l)
		sum += trunk + m.expertBytes(l, experts)
	}
	return sum
}

// kvReserve is the KV cache a node keeps room for in each layer it holds.
func (m *Model) kvReserve() int64 { return m.KVReserveTokens * m.KVBytesPerTokenLayer }

// Footprint is the memory a node needs for assignment a: the weights of
// the fragments it holds (its layers' trunks and the experts it lists, all
// when it lists none) and the KV reserve of its layers.
func (m *Model) Footprint(a Assignment) int64 {
	return m.WeightBytes(a.First, a.End, a.Experts) + int64(a.Layers())*m.kvReserve()
}

// share is how many experts of each layer n is sized for: a shard's worth
// when the model spreads its experts (at most ExpertSpread shards), else
// all of them.
func (m *Model) share(n *Node) int {
	if m.Experts < 2 || m.ExpertSpread < 2 || n.AllExperts {
		return m.Experts
	}
	shards := min(m.ExpertSpread, m.Experts)
	return (m.Experts + shards - 1) / shards
}

// layerNeeds returns, largest first, the memory each layer takes on a node
// holding `share` of its experts: its trunk, its `share` largest experts
// and the KV reserve. Any k layers together need at most the sum of the
// first k.
func (m *Model) layerNeeds(share int) []int64 {
	need := make([]int64, m.Layers)
	for l := range need {
		trunk, sizes := m.layer(l)
		need[l] = trunk + m.kvReserve()
		if share >= len(sizes) {
			for _, b := range sizes {
				need[l] += b
			}
			continue
		}
		largest := slices.Clone(sizes)
		slices.SortFunc(largest, func(a, b int64) int { return cmp.Compare(b, a) })
		for _, b := range largest[:share] {
			need[l] += b
		}
	}
	slices.SortFunc(need, func(a, b int64) int { return cmp.Compare(b, a) })
	return need
}

// OverBudget lists, in placement order, the nodes of pl whose Footprint
// exceeds their memory in p (nodes p does not know are left out).
func OverBudget(p *Problem, pl *Placement) []string {
	memory := p.memory()
	var out []string
	for _, a := range pl.Assignments {
		if m, ok := memory[a.Node]; ok && p.Model.Footprint(a) > m {
			out = append(out, a.Node)
		}
	}
	return out
}
