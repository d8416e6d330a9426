package placement

import (
	"cmp"
	"context"
	"fmt"
	"slices"
)

// spreadRounds bounds how often PlaceSpread plans again with the nodes
// that did not fit their experts sized for all of them, before it sizes
// every node so.
const spreadRounds = 3

// PlaceSpread places p with s and spreads the experts (SpreadExperts),
// so that a node too small for a layer's experts but big enough for its
// trunk and a shard of them holds layers beside partners that hold the
// other shards. A node that ends up needing more memory than it has (too
// few partners hold its range) is planned again sized for all the experts
// of its layers (Node.AllExperts); after spreadRounds every node is. No
// node of the result needs more memory than it has, or it is an error.
// A model whose experts are not spread is placed by s alone (whose limits
// keep nodes within memory, but for exo's baseline).
func PlaceSpread(ctx context.Context, s Strategy, p *Problem, prev *Placement, load [][]int64) (*Placement, error) {
	if p.Model.Experts < 2 || p.Model.ExpertSpread < 2 {
		return s.Place(ctx, p, prev)
	}
	q := *p
	q.Nodes = slices.Clone(p.Nodes)
	for round := 0; ; round++ {
		pl, err := s.Place(ctx, &q, prev)
		if err != nil {
			return nil, err
		}
		over := SpreadExperts(&q, pl, load)
		if len(over) == 0 {
			return pl, nil
		}
		if round == spreadRounds {
			return nil, fmt.Errorf("%w: nodes %v need more memory than they have for their layers and experts", ErrInfeasible, over)
		}
		for i := range q.Nodes {
			if round+1 == spreadRounds || slices.Contains(over, q.Nodes[i].ID) {
				q.Nodes[i].AllExperts = true
			}
		}
	}
}

// SpreadExperts divides the experts of every layer range among the nodes
// that hold that range, so that one layer's experts live on several nodes
// and a token reaches only the nodes of the experts it chooses. Nodes with
// the same range [First, End) form a group; a group of n nodes is cut into
// min(p.Model.ExpertSpread, n) shards and node i of the group holds shard
// i mod shards, so that a group larger than the spread replicates every
// shard. Experts go to shards heaviest first, each to the lightest shard
// (longest processing time first), weighed by 1 plus its counted uses in
// the range's layers (load[layer][expert], may be nil), so that hot
// experts land on different nodes; a shard takes an expert only while it
// fits the memory its nodes have left beside their trunks and KV reserve,
// and when that cut finds no room an even cut by count (what MemoryFilter
// sizes nodes for) is used. Groups smaller than 2 nodes, a spread below 2,
// or a model with fewer than 2 experts leave every node of the group
// holding all experts of its layers (Experts nil), as dense models always
// do. It returns the nodes that need more memory than they have
// (OverBudget).
func SpreadExperts(p *Problem, pl *Placement, load [][]int64) []string {
	m := &p.Model
	memory := p.memory()
	groups := map[[2]int][]int{}
	var order [][2]int
	for i, a := range pl.Assignments {
		pl.Assignments[i].Experts = nil
		k := [2]int{a.First, a.End}
		if groups[k] == nil {
			order = append(order, k)
		}
		groups[k] = append(groups[k], i)
	}
	if m.Experts < 2 || m.ExpertSpread < 2 {
		return OverBudget(p, pl)
	}
	for _, k := range order {
		members := groups[k]
		shards := min(m.ExpertSpread, len(members), m.Experts)
		if shards < 2 {
			continue
		}
		// room[s] is what the tightest node holding shard s has left for experts.
		room := make([]int64, shards)
		trunks := m.Footprint(Assignment{First: k[0], End: k[1], Experts: []int{}})
		for j, i := range members {
			left := memory[pl.Assignments[i].Node] - trunks
			if s := j % shards; j < shards || left < room[s] {
				room[s] = left
			}
		}
		cut, ok := cutShards(m, shards, k[0], k[1], load, room)
		if !ok {
			cut = evenShards(m.Experts, shards)
		}
		for j, i := range members {
			pl.Assignments[i].Experts = slices.Clone(cut[j%shards])
		}
	}
	return OverBudget(p, pl)
}

// ExpertShards cuts experts 0..experts-1 into n shards of about equal load
// (see SpreadExperts), each sorted ascending, without regard to memory.
func ExpertShards(experts, n, first, end int, load [][]int64) [][]int {
	cut, _ := cutShards(&Model{Experts: experts}, n, first, end, load, nil)
	return cut
}

// cutShards is the load-balanced cut of SpreadExperts: shard s takes
// experts whose bytes in layers [first, end) add up to at most room[s]
// (nil: no limit). It reports false when an expert fits no shard.
func cutShards(m *Model, n, first, end int, load [][]int64, room []int64) ([][]int, bool) {
	experts := m.Experts
	weight := make([]int64, experts)
	for e := range weight {
		weight[e] = 1
		for l := first; l < end && l < len(load); l++ {
			if e < len(load[l]) {
				weight[e] += load[l][e]
			}
		}
	}
	byWeight := make([]int, experts)
	for e := range byWeight {
		byWeight[e] = e
	}
	slices.SortStableFunc(byWeight, func(a, b int) int { return cmp.Compare(weight[b], weight[a]) })
	shards := make([][]int, n)
	total := make([]int64, n)
	used := make([]int64, n)
	for _, e := range byWeight {
		var size int64
		for l := first; l < end && room != nil; l++ {
			if _, sizes := m.layer(l); e < len(sizes) {
				size += sizes[e]
			}
		}
		lightest := -1
		for s := range n {
			if room != nil && used[s]+size > room[s] {
				continue
			}
			if lightest < 0 || total[s] < total[lightest] || (total[s] == total[lightest] && len(shards[s]) < len(shards[lightest])) {
				lightest = s
			}
		}
		if lightest < 0 {
			return nil, false
		}
		shards[lightest] = append(shards[lightest], e)
		total[lightest] += weight[e]
		used[lightest] += size
	}
	for _, s := range shards {
		slices.Sort(s)
	}
	return shards, true
}

// evenShards deals experts 0..experts-1 round robin into n shards: each
// holds at most ceil(experts/n), the share MemoryFilter sizes nodes for.
func evenShards(experts, n int) [][]int {
	shards := make([][]int, n)
	for e := range experts {
		shards[e%n] = append(shards[e%n], e)
	}
	return shards
}
