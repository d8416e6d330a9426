package placement_test

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

func TestValidate(t *testing.T) {
	ok := func() *placement.Problem { return chainProblem(node("a", 8, 800), node("b", 8, 800)) }
	tests := []struct {
		name   string
		mutate func(p *placement.Problem)
	}{
		{"no layers", func(p *placement.Problem) { p.Model.Layers = 0 }},
		{"negative layer size", func(p *placement.Problem) { p.Model.LayerBytes = -1 }},
		{"experts larger than the layer", func(p *placement.Problem) { p.Model.Experts, p.Model.ExpertBytes = 8, 1<<40 }},
		{"empty id", func(p *placement.Problem) { p.Nodes[0].ID = "" }},
		{"duplicate id", func(p *placement.Problem) { p.Nodes[1].ID = "a" }},
		{"no throughput model", func(p *placement.Problem) { p.Nodes[0].Throughput = nil }},
		{"unknown state", func(p *placement.Problem) { p.Nodes[0].State = "sleepy" }},
		{"link to an unknown node", func(p *placement.Problem) {
			p.Network.NodeLinks = []placement.Link{{From: "a", To: "zz", BandwidthBytesPerS: 1}}
		}},
		{"zero bandwidth", func(p *placement.Problem) {
			p.Network.RegionLinks = []placement.Link{{From: "eu", To: "us", BandwidthBytesPerS: 0}}
		}},
		{"NaN bandwidth", func(p *placement.Problem) {
			p.Network.NodeLinks = []placement.Link{{From: "a", To: "b", BandwidthBytesPerS: math.NaN()}}
		}},
	}
	if err := ok().Validate(); err != nil {
		t.Fatalf("valid problem: %v", err)
	}
	for _, tc := range tests {
		p := ok()
		tc.mutate(p)
		if err := p.Validate(); !errors.Is(err, placement.ErrInvalidProblem) {
			t.Errorf("%s: err = %v, want ErrInvalidProblem", tc.name, err)
		}
	}
}

func TestFiltersRecordRejections(t *testing.T) {
	small := node("small", 8, 800)
	small.MemoryBytes = 1 << 29 // half a layer
	drain := node("drain", 8, 800)
	drain.State = placement.StateDraining
	far := node("far", 8, 800)
	far.Region = "mars"
	dead := node("dead", 8, 800)
	dead.Throughput = placement.ThroughputTable{0, 0}
	p := chainProblem(node("ok", 8, 800), small, drain, far, dead)
	p.ExcludeRegions = []string{"mars"}
	f, err := placement.NewFleet(p)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"small": "memory", "drain": "state", "far": "region", "dead": "throughput"}
	got := map[string]string{}
	for _, r := range f.Rejections() {
		got[r.Node] = r.Step
		if r.Reason == "" {
			t.Errorf("rejection of %s has no reason", r.Node)
		}
	}
	for id, step := range want {
		if got[id] != step {
			t.Errorf("%s rejected by %q, want %q (all: %v)", id, got[id], step, f.Rejections())
		}
	}
	if _, rejected := got["ok"]; rejected || f.MaxLayers(0) != 8 {
		t.Errorf("node ok: rejected=%v, max layers %d", rejected, f.MaxLayers(0))
	}
	// The rejections travel with every plan.
	pl, err := placement.Tessera{}.Place(t.Context(), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(pl.Rejections) != 4 || len(pl.Assignments) != 1 || pl.Assignments[0].Node != "ok" {
		t.Fatalf("plan uses %v, rejects %v", pl.Assignments, pl.Rejections)
	}
}

func TestMemoryLimit(t *testing.T) {
	n := node("a", 0, 800)
	n.Throughput = placement.LayerTiming{PrefillSecondsPerToken: 1e-4, DecodeSecondsPerToken: 1e-3, PromptShare: 0.75}
	n.MemoryBytes = 3<<30 + 1<<29
	p := chainProblem(n)
	p.Model.KVBytesPerTokenLayer = 1 << 10
	p.Model.KVReserveTokens = 1 << 18 // 256 MiB of KV per layer
	f, err := placement.NewFleet(p)
	if err != nil {
		t.Fatal(err)
	}
	// 3.5 GiB at 1.25 GiB per layer: 2 layers.
	if got := f.MaxLayers(0); got != 2 {
		t.Fatalf("max layers = %d, want 2", got)
	}
	// LayerTiming: 1 / (k × (0.75·1e-4 + 0.25·1e-3)) tokens/s.
	if got, want := f.Capacity(0, 2), 1/(2*(0.75e-4+0.25e-3)); !near(got, want) {
		t.Fatalf("capacity(2) = %v, want %v", got, want)
	}
	if _, err := (placement.Tessera{}).Place(t.Context(), p, nil); !errors.Is(err, placement.ErrInfeasible) ||
		!strings.Contains(err.Error(), "8 layers") {
		t.Fatalf("2 layers of 8 planned: err = %v", err)
	}
}
