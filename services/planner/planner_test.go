package planner

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"reflect"
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

// The planner sizes nodes from the manifest's fragment sizes: nodes too
// small for a whole layer (trunk 1000 bytes, four experts of 4000, 8192
// bytes of KV reserve) serve it in pairs, each with two of its experts,
// where sized for every expert none of them could.
func TestReplanSizesNodesForTheirExperts(t *testing.T) {
	ctx := context.Background()
	c := bustest.Connect(t, bustest.Server(t), "planner-test")
	moe := manifest("moe", 4)
	for i, f := range moe.Fragments {
		moe.Fragments[i].Bytes = map[bool]int64{true: 1000, false: 4000}[f.Expert < 0]
	}
	var nodes []wire.NodeRecord
	for _, id := range []string{"a", "b", "c", "d"} {
		nodes = append(nodes, wire.NodeRecord{State: wire.NodeReady, Heartbeat: wire.Heartbeat{Node: id, Region: "eu", MemoryBudget: 20000, State: wire.NodeReady}})
	}
	for _, spread := range []int{0, 2} {
		p := &Planner{cfg: Config{ExpertSpread: spread, KVReserveTokens: 16, DefaultLayerTime: time.Millisecond},
			bus: c, log: slog.New(slog.NewTextHandler(io.Discard, nil)), strategy: placement.Tessera{}, last: map[string]*placement.Placement{}}
		var err error
		if p.plans, err = c.JS.KeyValue(ctx, subjects.BucketPlans); err != nil {
			t.Fatal(err)
		}
		if p.load, err = c.JS.KeyValue(ctx, subjects.BucketExpertLoad); err != nil {
			t.Fatal(err)
		}
		err = p.replan(ctx, moe, nodes, "test")
		if spread == 0 {
			if !errors.Is(err, placement.ErrInfeasible) {
				t.Fatalf("sized for every expert: got %v, want %v", err, placement.ErrInfeasible)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		e, err := p.plans.Get(ctx, "moe")
		if err != nil {
			t.Fatal(err)
		}
		var plan wire.Plan
		if err := json.Unmarshal(e.Value(), &plan); err != nil {
			t.Fatal(err)
		}
		if len(plan.Assignments) != 4 {
			t.Fatalf("plan uses %d of 4 nodes: %+v", len(plan.Assignments), plan.Assignments)
		}
		for _, a := range plan.Assignments {
			held := int64(a.End-a.First) * (1000 + 16*512 + 4000*int64(len(a.Experts)))
			if len(a.Experts) != 2 || held > 20000 {
				t.Errorf("node %s holds layers [%d,%d) with experts %v: %d bytes of its 20000", a.Node, a.First, a.End, a.Experts, held)
			}
		}
	}
}

func TestLayerFragments(t *testing.T) {
	sized := func(experts int) wire.ModelManifest {
		m := manifest("m", experts)
		for i, f := range m.Fragments {
			m.Fragments[i].Bytes = int64(1000*(f.Layer+1) + 10*(f.Expert+1))
		}
		return m
	}
	missing := sized(2)
	missing.Fragments = missing.Fragments[1:]
	cases := []struct {
		name string
		m    wire.ModelManifest
		want []placement.LayerFragments
	}{
		{"dense", sized(0), []placement.LayerFragments{{Trunk: 1000}, {Trunk: 2000}}},
		{"experts apart", sized(2), []placement.LayerFragments{{Trunk: 1000, Experts: []int64{1010, 1020}}, {Trunk: 2000, Experts: []int64{2010, 2020}}}},
		{"a fragment missing", missing, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := layerFragments(tc.m, tc.m.ExpertGroups())
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}
