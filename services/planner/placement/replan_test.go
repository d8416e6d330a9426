package placement_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

func TestReplanAfterChurn(t *testing.T) {
	for name, p := range fleets() {
		t.Run(name, func(t *testing.T) {
			s := placement.Tessera{}
			prev, err := s.Place(context.Background(), p, nil)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(42, 7))
			for range 5 {
				res, err := placement.ChurnTrial(context.Background(), s, p, prev, 0.1, rng)
				if err != nil {
					t.Fatal(err)
				}
				inc := res.Incremental
				after := withoutNodes(p, res.Removed)
				checkPlan(t, after, inc, true)
				if inc.Version != prev.Version+1 || inc.Replan == nil {
					t.Fatalf("incremental plan v%d (prev v%d), report %v", inc.Version, prev.Version, inc.Replan)
				}
				for _, id := range res.Removed {
					if _, ok := inc.Assignment(id); ok {
						t.Fatalf("removed node %s still holds layers", id)
					}
				}
				if res.FlowRatio < placement.DefaultFlowFloor-1e-9 {
					t.Errorf("removed %v: incremental %.1f < 95%% of scratch %.1f", res.Removed, inc.TokensPerS, res.Scratch.TokensPerS)
				}
				if res.MovedBytes > res.ScratchMovedBytes {
					t.Errorf("removed %v: incremental moves %d bytes, scratch %d", res.Removed, res.MovedBytes, res.ScratchMovedBytes)
				}
				if got := placement.MovedBytes(p.Model, prev, inc); got != inc.Replan.MovedBytes {
					t.Errorf("report says %d moved bytes, MovedBytes %d", inc.Replan.MovedBytes, got)
				}
			}
		})
	}
}

func withoutNodes(p *placement.Problem, ids []string) *placement.Problem {
	q := *p
	q.Nodes = slices.DeleteFunc(slices.Clone(p.Nodes), func(n placement.Node) bool { return slices.Contains(ids, n.ID) })
	return &q
}

// TestReplanNoChange keeps a plan whose fleet did not change: nothing moves.
func TestReplanNoChange(t *testing.T) {
	p := fleets()["three regions"]
	prev, err := placement.Tessera{}.Place(context.Background(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	next, err := placement.Tessera{}.Place(context.Background(), p, prev)
	if err != nil {
		t.Fatal(err)
	}
	if next.Replan.MovedBytes != 0 || next.TokensPerS < prev.TokensPerS*(1-1e-9) {
		t.Fatalf("unchanged fleet: moved %d bytes, flow %.1f -> %.1f", next.Replan.MovedBytes, prev.TokensPerS, next.TokensPerS)
	}
}

// TestReplanUsesNewNodes adds nodes: the re-plan must not lose throughput
// and must put new capacity to work.
func TestReplanUsesNewNodes(t *testing.T) {
	p := mixedFleet(32, [][]int{{2, 5, 9}}, 1)
	prev, err := placement.Tessera{}.Place(context.Background(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	grown := *p
	grown.Nodes = slices.Clone(p.Nodes)
	for k := range 4 {
		grown.Nodes = append(grown.Nodes, machines[k%2].node("new"+string(rune('a'+k)), "r0"))
	}
	next, err := placement.Tessera{}.Place(context.Background(), &grown, prev)
	if err != nil {
		t.Fatal(err)
	}
	checkPlan(t, &grown, next, true)
	if next.TokensPerS < next.Replan.ScratchTokensPerS*placement.DefaultFlowFloor || next.TokensPerS <= prev.TokensPerS {
		t.Fatalf("flow %.1f -> %.1f (scratch %.1f)", prev.TokensPerS, next.TokensPerS, next.Replan.ScratchTokensPerS)
	}
}

// TestReplanFromAnotherStrategy starts from a Petals plan, whose ranges
// overlap: the re-plan cannot repair it and must still be valid.
func TestReplanFromAnotherStrategy(t *testing.T) {
	p := fleets()["one region"]
	prev, err := placement.Petals{}.Place(context.Background(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	next, err := placement.Tessera{}.Place(context.Background(), withoutNodes(p, []string{"n3"}), prev)
	if err != nil {
		t.Fatal(err)
	}
	checkPlan(t, withoutNodes(p, []string{"n3"}), next, true)
	if next.Replan.Method == "repair" {
		t.Fatalf("repaired overlapping ranges")
	}
}

func TestMovedBytes(t *testing.T) {
	m := placement.Model{LayerBytes: 10}
	prev := &placement.Placement{Assignments: []placement.Assignment{{Node: "a", First: 0, End: 4}, {Node: "b", First: 4, End: 8}}}
	next := &placement.Placement{Assignments: []placement.Assignment{
		{Node: "a", First: 2, End: 6}, // fetches 4, 5
		{Node: "b", First: 6, End: 8}, // drops layers only
		{Node: "c", First: 0, End: 2}, // new node fetches all
	}}
	if got := placement.MovedBytes(m, prev, next); got != 40 {
		t.Fatalf("moved %d bytes, want 40", got)
	}
	if got := placement.MovedBytes(m, nil, next); got != 80 {
		t.Fatalf("moved %d bytes from nothing, want 80", got)
	}
	// Layers of a 2-byte trunk and 4 experts of 2 bytes: a node fetches
	// the experts it lacks in the layers it keeps.
	m = placement.Model{LayerBytes: 10, Experts: 4, ExpertBytes: 2}
	prev = &placement.Placement{Assignments: []placement.Assignment{{Node: "a", First: 0, End: 4, Experts: []int{0, 1}}, {Node: "b", First: 0, End: 4}}}
	next = &placement.Placement{Assignments: []placement.Assignment{
		{Node: "a", First: 2, End: 6, Experts: []int{1, 2}}, // expert 2 of 2, 3; layers 4, 5 with 2 experts
		{Node: "b", First: 0, End: 4, Experts: []int{3}},    // drops experts only
	}}
	if got := placement.MovedBytes(m, prev, next); got != 2*2+2*(2+2*2) {
		t.Fatalf("moved %d bytes with experts, want %d", got, 2*2+2*(2+2*2))
	}
}

func TestBuildStages(t *testing.T) {
	as := []placement.Assignment{{Node: "a", First: 0, End: 4, TokensPerS: 3}, {Node: "b", First: 0, End: 2, TokensPerS: 1}, {Node: "c", First: 2, End: 4, TokensPerS: 1}}
	got := placement.BuildStages(4, as)
	want := []placement.Stage{
		{First: 0, End: 2, Replicas: []placement.Replica{{Node: "a", TokensPerS: 3}, {Node: "b", TokensPerS: 1}}},
		{First: 2, End: 4, Replicas: []placement.Replica{{Node: "a", TokensPerS: 3}, {Node: "c", TokensPerS: 1}}},
	}
	if !slices.EqualFunc(got, want, func(a, b placement.Stage) bool {
		return a.First == b.First && a.End == b.End && slices.Equal(a.Replicas, b.Replicas)
	}) {
		t.Fatalf("stages = %+v", got)
	}
}

func TestWire(t *testing.T) {
	p := fleets()["three regions"]
	pl, err := placement.Tessera{}.Place(context.Background(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	w := pl.Wire(time.Unix(100, 0), "test")
	if w.Layers != p.Model.Layers || w.Version != pl.Version || w.ThroughputTokS != pl.TokensPerS || len(w.Stages) != len(pl.Stages) {
		t.Fatalf("wire plan %+v", w)
	}
	embed, head := 0, 0
	for _, a := range w.Assignments {
		if a.Embed {
			embed++
		}
		if a.Head {
			head++
		}
	}
	if embed == 0 || head == 0 {
		t.Fatalf("no node holds the embedding (%d) or the head (%d)", embed, head)
	}
	for k, st := range w.Stages {
		if st.First != pl.Stages[k].First || len(st.Replicas) != len(pl.Stages[k].Replicas) {
			t.Fatalf("stage %d: %+v vs %+v", k, st, pl.Stages[k])
		}
	}
}
