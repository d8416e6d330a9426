package placement_test

import (
	"errors"
	"math"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func TestEvaluateChain(t *testing.T) {
	p := chainProblem(node("a", 8, 800), node("b", 8, 800), node("c", 8, 1200))
	tests := []struct {
		name string
		as   []placement.Assignment
		mode placement.FlowMode
		want float64
	}{
		{"one node holds all", []placement.Assignment{{Node: "a", First: 0, End: 8}}, placement.Strict, 100},
		{"two stages: the slower bounds", []placement.Assignment{{Node: "a", First: 0, End: 4}, {Node: "c", First: 4, End: 8}}, placement.Strict, 200},
		{"replicas add up", []placement.Assignment{{Node: "a", First: 0, End: 4}, {Node: "b", First: 0, End: 4}, {Node: "c", First: 4, End: 8}}, placement.Strict, 300},
		{"a gap blocks the flow", []placement.Assignment{{Node: "a", First: 0, End: 3}, {Node: "c", First: 4, End: 8}}, placement.Strict, 0},
		{"overlap: strict cannot hand over", []placement.Assignment{{Node: "a", First: 0, End: 5}, {Node: "c", First: 4, End: 8}}, placement.Strict, 0},
		{"overlap: partial can", []placement.Assignment{{Node: "a", First: 0, End: 5}, {Node: "c", First: 4, End: 8}}, placement.Partial, 160},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			flow, err := placement.Evaluate(p, tc.as, tc.mode)
			if err != nil {
				t.Fatal(err)
			}
			if !near(flow.TokensPerS, tc.want) {
				t.Fatalf("flow = %v, want %v", flow.TokensPerS, tc.want)
			}
			total := 0.0
			for i, a := range tc.as {
				if a.First == 0 {
					total += flow.NodeTokensPerS[i]
				}
			}
			if !near(total, tc.want) {
				t.Fatalf("flow out of the first stage = %v, want %v", total, tc.want)
			}
		})
	}
}

func TestEvaluateLinks(t *testing.T) {
	p := chainProblem(node("a", 8, 8000), node("b", 8, 8000))
	p.Nodes[1].Region = "us"
	as := []placement.Assignment{{Node: "a", First: 0, End: 4}, {Node: "b", First: 4, End: 8}}
	// No link between the regions: nothing flows.
	if f, err := placement.Evaluate(p, as, placement.Strict); err != nil || f.TokensPerS != 0 {
		t.Fatalf("flow without a link = %v, %v", f.TokensPerS, err)
	}
	// A region link of 500 kB/s carries 500 tokens/s of 1000-byte activations.
	p.Network.RegionLinks = []placement.Link{{From: "us", To: "eu", BandwidthBytesPerS: 500e3, Latency: 40 * time.Millisecond}}
	if f, _ := placement.Evaluate(p, as, placement.Strict); !near(f.TokensPerS, 500) {
		t.Fatalf("flow over the region link = %v, want 500", f.TokensPerS)
	}
	// A node link overrides it, one direction only.
	p.Network.NodeLinks = []placement.Link{{From: "a", To: "b", BandwidthBytesPerS: 300e3}}
	if f, _ := placement.Evaluate(p, as, placement.Strict); !near(f.TokensPerS, 300) {
		t.Fatalf("flow over the node link = %v, want 300", f.TokensPerS)
	}
	// The coordinator's link: 2-byte tokens at 100 B/s is 50 tokens/s.
	p.Network.NodeLinks = append(p.Network.NodeLinks, placement.Link{From: placement.Coordinator, To: "a", BandwidthBytesPerS: 100})
	if f, _ := placement.Evaluate(p, as, placement.Strict); !near(f.TokensPerS, 50) {
		t.Fatalf("flow from the coordinator = %v, want 50", f.TokensPerS)
	}
	// The NIC: 1000-byte activations through a 20 kB/s NIC is 20 tokens/s.
	p.Nodes[1].InboundBytesPerS = 20e3
	if f, _ := placement.Evaluate(p, as, placement.Strict); !near(f.TokensPerS, 20) {
		t.Fatalf("flow through the NIC = %v, want 20", f.TokensPerS)
	}
}

// TestEvaluateManyInterchangeable checks that a wide placement (where the
// evaluator merges interchangeable nodes) gives the flow of its narrow twin
// scaled up.
func TestEvaluateManyInterchangeable(t *testing.T) {
	var nodes []placement.Node
	var as []placement.Assignment
	for k := range 100 {
		n := node(string(rune('A'+k%26))+string(rune('a'+k/26)), 8, 400)
		nodes = append(nodes, n)
		first := 4 * (k % 2)
		as = append(as, placement.Assignment{Node: n.ID, First: first, End: first + 4})
	}
	p := chainProblem(nodes...)
	p.Nodes[0].Throughput = placement.ThroughputTable{0, 0, 0, 0, 50} // one slow node: a group of its own
	f, err := placement.Evaluate(p, as, placement.Strict)
	if err != nil {
		t.Fatal(err)
	}
	// 50 nodes per stage at 100 tokens/s each, one of the first stage at 50.
	if want := 49*100.0 + 50; !near(f.TokensPerS, want) {
		t.Fatalf("flow = %v, want %v", f.TokensPerS, want)
	}
	if !near(f.NodeTokensPerS[0], 50) || !near(f.NodeTokensPerS[2], 100) {
		t.Fatalf("node flows = %v, %v", f.NodeTokensPerS[0], f.NodeTokensPerS[2])
	}
}

func TestEvaluateRejectsBadPlacements(t *testing.T) {
	p := chainProblem(node("a", 8, 800))
	for name, as := range map[string][]placement.Assignment{
		"unknown node":   {{Node: "x", First: 0, End: 8}},
		"past the end":   {{Node: "a", First: 4, End: 9}},
		"empty range":    {{Node: "a", First: 3, End: 3}},
		"assigned twice": {{Node: "a", First: 0, End: 4}, {Node: "a", First: 4, End: 8}},
	} {
		if _, err := placement.Evaluate(p, as, placement.Strict); !errors.Is(err, placement.ErrInvalidPlacement) {
			t.Errorf("%s: err = %v, want ErrInvalidPlacement", name, err)
		}
	}
}

func TestParseFlowMode(t *testing.T) {
	for _, m := range []placement.FlowMode{placement.Strict, placement.Partial} {
		got, err := placement.ParseFlowMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseFlowMode(%q) = %v, %v", m, got, err)
		}
	}
	if _, err := placement.ParseFlowMode("loose"); err == nil {
		t.Error("ParseFlowMode accepted \"loose\"")
	}
}
