package placement_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

// machine is a made-up GPU type: its rate with k layers falls faster than
// 1/k (less room for the KV cache), up to maxLayers.
type machine struct {
	name      string
	rate      float64
	maxLayers int
	memory    int64
}

var machines = []machine{
	{"big", 24000, 12, 80 << 30},
	{"mid", 7500, 7, 24 << 30},
	{"small", 5500, 4, 16 << 30},
}

func (m machine) node(id, region string) placement.Node {
	table := make(placement.ThroughputTable, m.maxLayers+1)
	for k := 1; k <= m.maxLayers; k++ {
		table[k] = m.rate / float64(k) * (1 - 0.04*float64(k-1))
	}
	return placement.Node{ID: id, Device: m.name, Region: region, MemoryBytes: m.memory,
		MaxLayers: m.maxLayers, InboundBytesPerS: 1.25e9, OutboundBytesPerS: 1.25e9, Throughput: table}
}

// mixedFleet builds a fleet with counts[r][t] machines of type t in region r,
// fast links inside regions and slow ones between them.
func mixedFleet(layers int, counts [][]int, seed uint64) *placement.Problem {
	rng := rand.New(rand.NewPCG(seed, 1))
	p := &placement.Problem{Model: placement.Model{Name: "toy", Layers: layers, LayerBytes: 1 << 30,
		ActivationBytesPerToken: 8192, TokenBytes: 4}}
	for r, row := range counts {
		region := fmt.Sprintf("r%d", r)
		for t, n := range row {
			for range n {
				p.Nodes = append(p.Nodes, machines[t].node(fmt.Sprintf("n%d", len(p.Nodes)), region))
			}
		}
		for s := range r {
			p.Network.RegionLinks = append(p.Network.RegionLinks, placement.Link{
				From: fmt.Sprintf("r%d", s), To: region, BandwidthBytesPerS: 8e6 + 4e6*rng.Float64()})
		}
	}
	return p
}

// fleets are the hand-made fleets every strategy is checked on.
func fleets() map[string]*placement.Problem {
	return map[string]*placement.Problem{
		"one region":          mixedFleet(32, [][]int{{2, 5, 9}}, 1),
		"one type":            mixedFleet(40, [][]int{{0, 0, 16}}, 2),
		"three regions":       mixedFleet(48, [][]int{{3, 0, 0}, {0, 4, 6}, {1, 2, 8}}, 3),
		"regions serve alone": mixedFleet(24, [][]int{{2, 3, 4}, {1, 6, 2}}, 4),
		"spare nodes":         mixedFleet(16, [][]int{{4, 10, 20}}, 5),
	}
}

// checkPlan asserts what every plan must satisfy: valid and memory-feasible
// ranges, stages that tile the model, and flow through every stage equal to
// the plan's throughput (each token passes every layer once).
func checkPlan(t *testing.T, p *placement.Problem, pl *placement.Placement, feasible bool) {
	t.Helper()
	f, err := placement.NewFleet(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := placement.CheckPlacement(f, pl); err != nil {
		if feasible {
			t.Fatalf("%s: %v", pl.Strategy, err)
		}
		return
	}
	flow, err := placement.Evaluate(p, pl.Assignments, placement.Strict)
	if err != nil {
		t.Fatal(err)
	}
	if !near(flow.TokensPerS, pl.TokensPerS) {
		t.Fatalf("%s: plan says %v tokens/s, evaluation %v", pl.Strategy, pl.TokensPerS, flow.TokensPerS)
	}
	at := 0
	for _, st := range pl.Stages {
		if st.First != at || st.End <= st.First {
			t.Fatalf("%s: stage [%d,%d) after layer %d", pl.Strategy, st.First, st.End, at)
		}
		at = st.End
		sum := 0.0
		for _, r := range st.Replicas {
			a, ok := pl.Assignment(r.Node)
			if !ok || a.First > st.First || a.End < st.End {
				t.Fatalf("%s: replica %s does not cover stage [%d,%d)", pl.Strategy, r.Node, st.First, st.End)
			}
			sum += r.TokensPerS
		}
		if math.Abs(sum-pl.TokensPerS) > 1e-6*math.Max(1, pl.TokensPerS) {
			t.Fatalf("%s: stage [%d,%d) carries %v, plan %v", pl.Strategy, st.First, st.End, sum, pl.TokensPerS)
		}
	}
	if at != p.Model.Layers {
		t.Fatalf("%s: stages end at %d of %d", pl.Strategy, at, p.Model.Layers)
	}
}

func TestStrategiesMakeValidPlans(t *testing.T) {
	for name, p := range fleets() {
		t.Run(name, func(t *testing.T) {
			flows := map[string]float64{}
			for _, s := range placement.Strategies() {
				pl, err := s.Place(context.Background(), p, nil)
				if err != nil {
					t.Fatalf("%s: %v", s.Name(), err)
				}
				if pl.Strategy != s.Name() || pl.Version != 1 || pl.Model != "toy" {
					t.Fatalf("%s: plan header %q v%d %q", s.Name(), pl.Strategy, pl.Version, pl.Model)
				}
				// exo ignores layer limits, so only it may be infeasible.
				checkPlan(t, p, pl, s.Name() != placement.ExoName)
				partial, err := placement.Evaluate(p, pl.Assignments, placement.Partial)
				if err != nil {
					t.Fatal(err)
				}
				flows[s.Name()] = pl.TokensPerS
				flows[s.Name()+"/partial"] = partial.TokensPerS
				again, _ := s.Place(context.Background(), p, nil)
				if !reflect.DeepEqual(pl, again) {
					t.Fatalf("%s: two plans of the same problem differ", s.Name())
				}
			}
			t.Logf("flows %v", flows)
			for _, base := range []string{"petals/partial", "exo", "exo/partial"} {
				if flows["tessera"] < flows[base] {
					t.Errorf("tessera %.1f < %s %.1f", flows["tessera"], base, flows[base])
				}
			}
		})
	}
}

func TestStrategyByName(t *testing.T) {
	for _, name := range placement.StrategyNames() {
		s, err := placement.StrategyByName(name)
		if err != nil || s.Name() != name {
			t.Errorf("StrategyByName(%q) = %v, %v", name, s, err)
		}
	}
	if s, err := placement.StrategyByName(""); err != nil || s.Name() != placement.TesseraName {
		t.Errorf("default strategy = %v, %v", s, err)
	}
	if _, err := placement.StrategyByName("random"); !errors.Is(err, placement.ErrUnknownStrategy) {
		t.Errorf("unknown strategy: %v", err)
	}
}

func TestInfeasibleFleet(t *testing.T) {
	p := mixedFleet(64, [][]int{{0, 2, 3}}, 1) // 2·7 + 3·4 = 26 layers of 64
	for _, s := range []placement.Strategy{placement.Tessera{}} {
		if _, err := s.Place(context.Background(), p, nil); !errors.Is(err, placement.ErrInfeasible) {
			t.Errorf("%s: err = %v, want ErrInfeasible", s.Name(), err)
		}
	}
	p.Nodes = nil
	for _, s := range placement.Strategies() {
		if _, err := s.Place(context.Background(), p, nil); !errors.Is(err, placement.ErrInfeasible) {
			t.Errorf("%s on no nodes: err = %v, want ErrInfeasible", s.Name(), err)
		}
	}
}
