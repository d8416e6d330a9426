package helix

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

func problem(t testing.TB, cluster, model string) *placement.Problem {
	t.Helper()
	m, err := LoadModel(model)
	if err != nil {
		t.Fatal(err)
	}
	c, err := LoadCluster(filepath.Join(fixtures, cluster))
	if err != nil {
		t.Fatal(err)
	}
	profiles, err := MachineProfiles()
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.Problem(m, profiles, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const (
	single24   = "examples/simulation/config/single24.ini"
	geo24      = "artifact_evaluation/distributed_clusters/config/3cluster24.ini"
	milpSingle = 1289.5558 // Helix MILP, single24, LLaMA-2-70B (strict hand-offs)
	milpGeo    = 1212.1768 // Helix MILP, 3cluster24, LLaMA-2-70B
)

// TestTesseraBeatsPublished holds the default strategy to the quality
// targets on the published fleets: at least the Helix MILP's max flow, and
// 1.3× both baselines on the same evaluator, whichever hand-off rule the
// baselines are scored with.
func TestTesseraBeatsPublished(t *testing.T) {
	for _, tc := range []struct {
		cluster string
		milp    float64
	}{{single24, milpSingle}, {geo24, milpGeo}} {
		t.Run(filepath.Base(tc.cluster), func(t *testing.T) {
			p := problem(t, tc.cluster, "llama2_70b")
			f, err := placement.NewFleet(p)
			if err != nil {
				t.Fatal(err)
			}
			plans := map[string]*placement.Placement{}
			for _, s := range placement.Strategies() {
				if plans[s.Name()], err = s.Place(context.Background(), p, nil); err != nil {
					t.Fatal(err)
				}
			}
			ours := plans[placement.TesseraName]
			if err := placement.CheckPlacement(f, ours); err != nil {
				t.Fatal(err)
			}
			if ours.TokensPerS < tc.milp {
				t.Errorf("tessera %.2f tokens/s < Helix MILP %.2f", ours.TokensPerS, tc.milp)
			}
			for _, base := range []string{placement.PetalsName, placement.ExoName} {
				for _, mode := range []placement.FlowMode{placement.Strict, placement.Partial} {
					flow, err := placement.Evaluate(p, plans[base].Assignments, mode)
					if err != nil {
						t.Fatal(err)
					}
					if ours.TokensPerS < 1.3*flow.TokensPerS {
						t.Errorf("tessera %.2f < 1.3 × %s (%s) %.2f", ours.TokensPerS, base, mode, flow.TokensPerS)
					}
				}
			}
		})
	}
}

// TestSyntheticFleets plans fleets the strategy was not designed on: every
// Helix machine type, several regions, and checks valid plans that beat
// the baselines.
func TestSyntheticFleets(t *testing.T) {
	m, err := LoadModel("llama2_70b")
	if err != nil {
		t.Fatal(err)
	}
	profiles, err := MachineProfiles()
	if err != nil {
		t.Fatal(err)
	}
	specs := map[string]FleetSpec{
		"seven types, one region": {Regions: []map[string]int{{"A100": 2, "V100": 3, "L4": 4, "L4x2": 2, "T4": 6, "T4x2": 3, "T4x4": 1}}},
		"four regions":            RandomFleetSpec(48, 4, []string{"A100", "L4", "T4", "V100"}, 11),
		"multi-GPU machines":      RandomFleetSpec(30, 2, []string{"L4x2", "T4x2", "T4x4"}, 12),
	}
	for name, spec := range specs {
		t.Run(name, func(t *testing.T) {
			p, err := SyntheticProblem(m, profiles, spec)
			if err != nil {
				t.Fatal(err)
			}
			f, err := placement.NewFleet(p)
			if err != nil {
				t.Fatal(err)
			}
			ours, err := placement.Tessera{}.Place(context.Background(), p, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := placement.CheckPlacement(f, ours); err != nil {
				t.Fatal(err)
			}
			for _, s := range []placement.Strategy{placement.Petals{}, placement.Exo{}} {
				pl, err := s.Place(context.Background(), p, nil)
				if err != nil {
					t.Fatal(err)
				}
				partial, err := placement.Evaluate(p, pl.Assignments, placement.Partial)
				if err != nil {
					t.Fatal(err)
				}
				if ours.TokensPerS < partial.TokensPerS {
					t.Errorf("tessera %.1f < %s %.1f", ours.TokensPerS, s.Name(), partial.TokensPerS)
				}
				t.Logf("tessera %.1f, %s %.1f (partial)", ours.TokensPerS, s.Name(), partial.TokensPerS)
			}
		})
	}
}

func TestRegionsOf3Cluster24(t *testing.T) {
	c, err := LoadCluster(filepath.Join(fixtures, geo24))
	if err != nil {
		t.Fatal(err)
	}
	want := []int{0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2}
	got := c.Regions()
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("regions = %v, want %v", got, want)
		}
	}
	if mix := c.Mix().String(); mix != "A100:4,L4:8,T4:12" {
		t.Fatalf("mix = %s", mix)
	}
	single, err := LoadCluster(filepath.Join(fixtures, single24))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range single.Regions() {
		if r != 0 {
			t.Fatalf("single24 has region %d", r)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for name, text := range map[string]string{
		"no node count":    "[NodeNames]\n",
		"bad node count":   "[NodeNames]\ntotal_compute_nodes=x\n",
		"missing node":     "[NodeNames]\ntotal_compute_nodes=2\n[ComputeNode-0]\ntype=A100\n",
		"bad unit":         "[NodeNames]\ntotal_compute_nodes=1\n[ComputeNode-0]\ntype=A100\n[Link-source-0]\nbandwidth=1 * furlongs\nlatency=1 * MilliSec\n",
		"link to nowhere":  "[NodeNames]\ntotal_compute_nodes=1\n[ComputeNode-0]\ntype=A100\n[Link-0-7]\nbandwidth=1 * mbps\nlatency=1 * MilliSec\n",
		"line without key": "[NodeNames]\ntotal_compute_nodes\n",
	} {
		if _, err := ParseCluster(strings.NewReader(text), name); !errors.Is(err, ErrSyntax) {
			t.Errorf("%s: err = %v, want ErrSyntax", name, err)
		}
	}
	if _, err := ParseSolution(strings.NewReader("[Settings]\noffset=2\n[Solution]\ncompute_node_2=[1, 3]\n"), "gap"); !errors.Is(err, ErrSyntax) {
		t.Errorf("non-contiguous solution: err = %v", err)
	}
	if _, err := ParseTimingTable(strings.NewReader("0,0\n2,1.5\n2,1.7"), "dup"); !errors.Is(err, ErrSyntax) {
		t.Errorf("repeated batch size: err = %v", err)
	}
	if _, err := LoadModel("gpt5"); !errors.Is(err, ErrUnknownModel) {
		t.Errorf("unknown model: err = %v", err)
	}
	if _, err := ParseMix("A100:4,L4"); !errors.Is(err, ErrSyntax) {
		t.Errorf("bad mix: err = %v", err)
	}
}

func TestTimingInterpolation(t *testing.T) {
	tab, err := ParseTimingTable(strings.NewReader("0,0\n2,1.5\n4,2.5"), "t")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ x, want float64 }{{0, 0}, {2, 0.0015}, {3, 0.002}, {4, 0.0025}} {
		if got, err := tab.At(tc.x); err != nil || !close(got, tc.want, 1e-12) {
			t.Errorf("At(%v) = %v, %v; want %v", tc.x, got, err, tc.want)
		}
	}
	if _, err := tab.At(5); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("At(5) extrapolated: %v", err)
	}
}
