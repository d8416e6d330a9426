package planner

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/planner/placement"
)

// With TESSERA_PLANNER_EXPERT_SPREAD set, a plan spreads a mixture's
// experts over the nodes that hold the same layers, weighed by the
// routers' counts in KV expertload: the two hot experts land on different
// nodes. A dense model's plan lists no experts.
func TestReplanSpreadsExpertsByLoad(t *testing.T) {
	ctx := context.Background()
	c := bustest.Connect(t, bustest.Server(t), "planner-test")
	st, err := placement.StrategyByName("petals")
	if err != nil {
		t.Fatal(err)
	}
	p := &Planner{cfg: Config{ExpertSpread: 2, KVReserveTokens: 16, DefaultLayerTime: time.Millisecond},
		bus: c, log: slog.New(slog.NewTextHandler(io.Discard, nil)), strategy: st, last: map[string]*placement.Placement{}}
	if p.plans, err = c.JS.KeyValue(ctx, subjects.BucketPlans); err != nil {
		t.Fatal(err)
	}
	if p.load, err = c.JS.KeyValue(ctx, subjects.BucketExpertLoad); err != nil {
		t.Fatal(err)
	}
	moe := manifest("moe", 4)
	dense := manifest("dense", 0)
	// Experts 2 and 3 are hot.
	load, _ := json.Marshal(wire.ExpertLoad{Model: "moe", Layers: 2, Experts: 4, Counts: [][]int64{{1, 2, 90, 80}, {0, 1, 70, 60}}, Tokens: 152, Updated: time.Now().UTC()})
	if _, err := p.load.Put(ctx, "moe", load); err != nil {
		t.Fatal(err)
	}
	var nodes []wire.NodeRecord
	for _, id := range []string{"a", "b"} {
		nodes = append(nodes, wire.NodeRecord{State: wire.NodeReady, Heartbeat: wire.Heartbeat{Node: id, Region: "eu", MemoryBudget: 1 << 30, State: wire.NodeReady}})
	}
	for _, m := range []wire.ModelManifest{moe, dense} {
		if err := p.replan(ctx, m, nodes, "test"); err != nil {
			t.Fatal(err)
		}
	}
	plan := func(id string) wire.Plan {
		e, err := p.plans.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		var pl wire.Plan
		if err := json.Unmarshal(e.Value(), &pl); err != nil {
			t.Fatal(err)
		}
		return pl
	}
	held := map[int]string{}
	for _, a := range plan("moe").Assignments {
		if a.First != 0 || a.End != 2 || len(a.Experts) == 0 || len(a.Experts) == 4 {
			t.Fatalf("moe assignment %+v: want both layers and some of the four experts", a)
		}
		for _, e := range a.Experts {
			held[e] = a.Node
		}
	}
	// Load balance: the hottest expert alone, the three others together.
	if len(held) != 4 || held[2] == held[3] || held[0] != held[3] || held[1] != held[3] {
		t.Fatalf("experts held %v: want all four, expert 2 alone and 0, 1, 3 together", held)
	}
	for _, a := range plan("dense").Assignments {
		if a.Experts != nil {
			t.Fatalf("dense assignment %+v lists experts", a)
		}
	}
}

// manifest is a two-layer model with experts groups of separately stored
// experts per layer (0: dense).
func manifest(id string, experts int) wire.ModelManifest {
	m := wire.ModelManifest{ID: id, DType: "f32", Config: wire.ModelConfig{Dim: 64, HiddenDim: 96, Layers: 2, Heads: 4, KVHeads: 4, Vocab: 512, SeqLen: 128},
		LayerWeightBytes: 1 << 20, KVBytesPerToken: 512, ExpertLayout: &wire.ExpertLayout{Groups: 1, TopK: 1}}
	for l := 0; l < 2; l++ {
		m.Fragments = append(m.Fragments, wire.FragmentRef{ID: "layer", Kind: "layer", Layer: l, Expert: -1})
		for e := 0; e < experts; e++ {
			m.Fragments = append(m.Fragments, wire.FragmentRef{ID: "expert", Kind: "expert", Layer: l, Expert: e})
		}
	}
	if experts > 0 {
		m.Config.Experts, m.Config.TopK = experts, 2
		m.ExpertLayout = &wire.ExpertLayout{Groups: experts, TopK: 2, Native: true}
	}
	return m
}
