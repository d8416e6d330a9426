package placement_test

import (
	"context"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

// TestCoordinatorReach plans a fleet whose coordinator links to one region
// only: the other region cannot start or end a pipeline, so the plan must
// begin and end every pipeline in the linked region.
func TestCoordinatorReach(t *testing.T) {
	p := mixedFleet(24, [][]int{{2, 3, 4}, {1, 6, 2}}, 4)
	p.Network.CoordinatorRegion = "hq"
	p.Network.RegionLinks = append(p.Network.RegionLinks, placement.Link{From: "hq", To: "r0", BandwidthBytesPerS: 1e9})
	pl := flowingPlan(t, p)
	region := map[string]string{}
	for _, n := range p.Nodes {
		region[n.ID] = n.Region
	}
	for _, a := range pl.Assignments {
		if (a.First == 0 || a.End == p.Model.Layers) && region[a.Node] != "r0" {
			t.Errorf("node %s of %s holds an end layer [%d,%d) without a coordinator link", a.Node, region[a.Node], a.First, a.End)
		}
	}
}

// TestManySmallRegions plans twelve regions of three nodes, none of which
// can hold the model alone: they must pool into pipelines across regions.
func TestManySmallRegions(t *testing.T) {
	var counts [][]int
	for r := range 12 {
		counts = append(counts, []int{r % 2, 1, 2 - r%2})
	}
	p := mixedFleet(48, counts, 9)
	pl := flowingPlan(t, p)
	exo, err := placement.Exo{}.Place(context.Background(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	if pl.TokensPerS < exo.TokensPerS {
		t.Fatalf("tessera %.1f < exo %.1f", pl.TokensPerS, exo.TokensPerS)
	}
}

// flowingPlan plans p with tessera and checks the plan is valid and carries tokens.
func flowingPlan(t *testing.T, p *placement.Problem) *placement.Placement {
	t.Helper()
	pl, err := placement.Tessera{}.Place(context.Background(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkPlan(t, p, pl, true)
	if pl.TokensPerS <= 0 {
		t.Fatal("no flow")
	}
	return pl
}
