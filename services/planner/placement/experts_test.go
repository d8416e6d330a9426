package placement_test

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

func TestSpreadExperts(t *testing.T) {
	full := func() *placement.Placement {
		return &placement.Placement{Assignments: []placement.Assignment{
			{Node: "a", First: 0, End: 4}, {Node: "b", First: 0, End: 4}, {Node: "c", First: 0, End: 4},
			{Node: "d", First: 0, End: 2}, {Node: "e", First: 2, End: 4},
		}}
	}
	experts := func(pl *placement.Placement) map[string][]int {
		out := map[string][]int{}
		for _, a := range pl.Assignments {
			out[a.Node] = a.Experts
		}
		return out
	}
	cases := []struct {
		name    string
		experts int
		spread  int
		load    [][]int64
		want    map[string][]int
		// memory, when set, is every node's; an expert is 10 bytes a layer.
		memory int64
	}{
		{"dense model unchanged", 0, 3, nil, map[string][]int{"a": nil, "b": nil, "c": nil, "d": nil, "e": nil}, 0},
		{"no spread unchanged", 8, 1, nil, map[string][]int{"a": nil, "b": nil, "c": nil, "d": nil, "e": nil}, 0},
		{"even spread over three", 8, 3, nil, map[string][]int{"a": {0, 3, 6}, "b": {1, 4, 7}, "c": {2, 5}, "d": nil, "e": nil}, 0},
		{"two shards replicated", 4, 2, nil, map[string][]int{"a": {0, 2}, "b": {1, 3}, "c": {0, 2}, "d": nil, "e": nil}, 0},
		// Experts 0 and 1 are hot: they go to different shards, and the
		// cold ones fill up the other shard.
		{"hot experts apart", 4, 2, [][]int64{{50, 40, 1, 1}, {50, 40, 1, 1}, {0, 0, 0, 0}, {0, 0, 0, 0}},
			map[string][]int{"a": {0}, "b": {1, 2, 3}, "c": {0}, "d": nil, "e": nil}, 0},
		// The same, but a node of 130 bytes holds its 4 trunks (40 bytes)
		// and only 2 experts of 40 bytes: a cold expert joins the hottest.
		{"hot experts apart within memory", 4, 2, [][]int64{{50, 40, 1, 1}, {50, 40, 1, 1}, {0, 0, 0, 0}, {0, 0, 0, 0}},
			map[string][]int{"a": {0, 3}, "b": {1, 2}, "c": {0, 3}, "d": nil, "e": nil}, 130},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pl := full()
			p := &placement.Problem{Model: placement.Model{Name: "m", Layers: 4, LayerBytes: 10 + 10*int64(tc.experts), Experts: tc.experts, ExpertBytes: 10, ExpertSpread: tc.spread}}
			memory := cmp.Or(tc.memory, 1<<20)
			for n := range tc.want {
				p.Nodes = append(p.Nodes, placement.Node{ID: n, MemoryBytes: memory})
			}
			if over := placement.SpreadExperts(p, pl, tc.load); len(over) > 0 {
				t.Fatalf("nodes %v over budget", over)
			}
			got := experts(pl)
			for n, w := range tc.want {
				if !slices.Equal(got[n], w) {
					t.Errorf("node %s holds experts %v, want %v", n, got[n], w)
				}
			}
		})
	}
}

// moeModel has 4 layers, each a 10-byte trunk and 8 experts of 8 to 12
// bytes (80 in all), and keeps 2 bytes of KV cache per layer: a node
// holding a whole layer needs 92 bytes, one holding its trunk and 4 of its
// experts at most 56.
func moeModel(spread int) placement.Model {
	m := placement.Model{Name: "moe", Layers: 4, LayerBytes: 90, Experts: 8, ExpertSpread: spread,
		KVBytesPerTokenLayer: 2, KVReserveTokens: 1, ActivationBytesPerToken: 64, TokenBytes: 4}
	for range m.Layers {
		m.LayerFragments = append(m.LayerFragments, placement.LayerFragments{Trunk: 10, Experts: []int64{12, 8, 10, 10, 12, 8, 10, 10}})
	}
	return m
}

// memoryNode is a node of the given memory whose speed is the same per layer.
func memoryNode(id string, memory int64) placement.Node {
	return placement.Node{ID: id, Device: "gpu", Region: "eu", MemoryBytes: memory,
		Throughput: placement.LayerTiming{PrefillSecondsPerToken: 1e-3, DecodeSecondsPerToken: 1e-3, PromptShare: 0.5}}
}

// heldBytes is what node a holds under m, counted from the fragment sizes:
// per layer its trunk, its experts (all when it lists none) and the KV reserve.
func heldBytes(m placement.Model, a placement.Assignment) int64 {
	var sum int64
	for l := a.First; l < a.End; l++ {
		lf := m.LayerFragments[l]
		sum += lf.Trunk + m.KVReserveTokens*m.KVBytesPerTokenLayer
		if a.Experts == nil {
			for _, b := range lf.Experts {
				sum += b
			}
		}
		for _, e := range a.Experts {
			sum += lf.Experts[e]
		}
	}
	return sum
}

// checkHeld fails unless every node of pl holds at most its memory and
// every expert of every layer is held by a node covering the layer.
func checkHeld(t *testing.T, p *placement.Problem, pl *placement.Placement) {
	t.Helper()
	memory := map[string]int64{}
	for _, n := range p.Nodes {
		memory[n.ID] = n.MemoryBytes
	}
	for _, a := range pl.Assignments {
		if held := heldBytes(p.Model, a); held > memory[a.Node] {
			t.Errorf("node %s holds %d bytes (layers [%d,%d), experts %v), its memory is %d", a.Node, held, a.First, a.End, a.Experts, memory[a.Node])
		}
	}
	for l := range p.Model.Layers {
		held := make([]bool, p.Model.Experts)
		for _, a := range pl.Assignments {
			if a.First > l || l >= a.End {
				continue
			}
			for e := range held {
				held[e] = held[e] || a.Experts == nil || slices.Contains(a.Experts, e)
			}
		}
		if i := slices.Index(held, false); i >= 0 {
			t.Errorf("no node holds expert %d of layer %d", i, l)
		}
	}
}

// Spreading experts sizes each node for its trunks and its share of the
// experts: nodes too small for a whole layer serve, where sizing them for
// every expert fails or leaves them out.
func TestPlaceSpreadSizesNodesForTheirExperts(t *testing.T) {
	nodes := func(memory int64, n int, prefix string) []placement.Node {
		var out []placement.Node
		for i := range n {
			out = append(out, memoryNode(fmt.Sprintf("%s%d", prefix, i), memory))
		}
		return out
	}
	cases := []struct {
		name   string
		nodes  []placement.Node
		spread int
		// wholeFails: sized for every expert, no plan is feasible; else
		// wholeLeavesOut lists the nodes such a plan cannot use.
		wholeFails     bool
		wholeLeavesOut []string
		// spreadFails: no plan even with the experts spread.
		spreadFails bool
	}{
		{name: "small nodes only", nodes: nodes(60, 8, "s"), spread: 2, wholeFails: true},
		{name: "a big node and small ones", nodes: append(nodes(400, 1, "b"), nodes(60, 8, "s")...), spread: 2,
			wholeLeavesOut: []string{"s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"}},
		// Shards of 2 experts would fit, but with 8 nodes for 4 layers no
		// layer gets 4 holders; sized for all their experts, nodes of 40
		// bytes hold nothing.
		{name: "spread wider than the partners", nodes: nodes(40, 8, "s"), spread: 4, wholeFails: true, spreadFails: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			whole := &placement.Problem{Model: moeModel(0), Nodes: tc.nodes}
			pl, err := placement.PlaceSpread(ctx, placement.Tessera{}, whole, nil, nil)
			switch {
			case tc.wholeFails && !errors.Is(err, placement.ErrInfeasible):
				t.Fatalf("sized for all experts: got %v, want %v", err, placement.ErrInfeasible)
			case !tc.wholeFails && err != nil:
				t.Fatal(err)
			case !tc.wholeFails:
				checkHeld(t, whole, pl)
				for _, n := range tc.wholeLeavesOut {
					if _, ok := pl.Assignment(n); ok {
						t.Errorf("sized for all experts, node %s holds layers", n)
					}
				}
			}
			spread := &placement.Problem{Model: moeModel(tc.spread), Nodes: tc.nodes}
			pl, err = placement.PlaceSpread(ctx, placement.Tessera{}, spread, nil, nil)
			if tc.spreadFails {
				if !errors.Is(err, placement.ErrInfeasible) {
					t.Fatalf("spread: got %v, want %v", err, placement.ErrInfeasible)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			checkHeld(t, spread, pl)
			if len(pl.Assignments) != len(tc.nodes) {
				t.Errorf("spread: %d of %d nodes hold layers: %+v", len(pl.Assignments), len(tc.nodes), pl.Assignments)
			}
			for _, a := range pl.Assignments {
				if heldBytes(spread.Model, a) > 92*int64(a.Layers()) {
					t.Errorf("node %s holds more than its layers", a.Node)
				}
				if a.Node[0] == 's' && len(a.Experts) == 0 {
					t.Errorf("small node %s holds every expert of layers [%d,%d)", a.Node, a.First, a.End)
				}
			}
		})
	}
}

// Whatever the fleet, a node is never given more than its memory: random
// fleets, fragment sizes and spreads, planned with and without expert
// counts.
func TestPlaceSpreadNeverExceedsMemory(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	planned, spread := 0, 0
	for trial := range 40 {
		m := placement.Model{Name: "moe", Layers: 2 + rng.IntN(5), Experts: 2 + rng.IntN(7), ExpertSpread: rng.IntN(5),
			KVBytesPerTokenLayer: 1 + rng.Int64N(4), KVReserveTokens: 4, ActivationBytesPerToken: 64, TokenBytes: 4}
		var load [][]int64
		for range m.Layers {
			lf := placement.LayerFragments{Trunk: 5 + rng.Int64N(20)}
			counts := make([]int64, m.Experts)
			for e := range m.Experts {
				lf.Experts = append(lf.Experts, 5+rng.Int64N(30))
				counts[e] = rng.Int64N(100)
			}
			m.LayerFragments = append(m.LayerFragments, lf)
			m.LayerBytes = max(m.LayerBytes, lf.Trunk+sum(lf.Experts))
			load = append(load, counts)
		}
		p := &placement.Problem{Model: m}
		for i := range 2 + rng.IntN(9) {
			p.Nodes = append(p.Nodes, memoryNode(fmt.Sprintf("n%d", i), m.LayerBytes/3+rng.Int64N(3*m.LayerBytes)))
		}
		if trial%2 == 0 {
			load = nil
		}
		pl, err := placement.PlaceSpread(context.Background(), placement.Tessera{Evaluations: 200}, p, nil, load)
		if errors.Is(err, placement.ErrInfeasible) {
			continue
		}
		if err != nil {
			t.Fatalf("trial %d: %v", trial, err)
		}
		planned++
		if slices.ContainsFunc(pl.Assignments, func(a placement.Assignment) bool { return a.Experts != nil }) {
			spread++
		}
		checkHeld(t, p, pl)
		if over := placement.OverBudget(p, pl); len(over) > 0 {
			t.Errorf("trial %d: OverBudget says %v", trial, over)
		}
	}
	if planned < 10 || spread < 5 {
		t.Fatalf("only %d of 40 fleets planned, %d with experts spread: the trials test too little", planned, spread)
	}
}

func sum(xs []int64) int64 {
	var s int64
	for _, x := range xs {
		s += x
	}
	return s
}
