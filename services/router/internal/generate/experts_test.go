package generate

import (
	"slices"
	"testing"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// A node's expert request holds only the rows that chose its experts, each
// with its own experts and weights, padded to the widest row.
func TestGatherTakesOnlyTheNodesRows(t *testing.T) {
	r := wire.Routed{Rows: 3, Dim: 2, K: 2,
		X:       []float32{0, 0, 1, 1, 2, 2},
		Experts: []int32{0, 1, 2, 3, 1, 2},
		Weights: []float32{.6, .4, .7, .3, .5, .5}}
	// This node holds experts 1 and 2.
	cs := []choice{{0, 1, .4}, {1, 2, .7}, {2, 1, .5}, {2, 2, .5}}
	p, rows := gather(r, cs)
	if !slices.Equal(rows, []int{0, 1, 2}) || p.Rows != 3 || p.K != 2 {
		t.Fatalf("rows %v, payload %+v", rows, p)
	}
	if !slices.Equal(p.Experts, []int32{1, -1, 2, -1, 1, 2}) || !slices.Equal(p.Weights, []float32{.4, 0, .7, 0, .5, .5}) {
		t.Fatalf("experts %v weights %v", p.Experts, p.Weights)
	}
	if !slices.Equal(p.X, r.X) {
		t.Fatalf("x %v", p.X)
	}
	p, rows = gather(r, []choice{{1, 3, .3}})
	if !slices.Equal(rows, []int{1}) || !slices.Equal(p.X, []float32{1, 1}) || p.K != 1 {
		t.Fatalf("rows %v payload %+v", rows, p)
	}
}

func TestExpertLoadCounts(t *testing.T) {
	x := newExpertLoad()
	r := wire.Routed{Rows: 2, K: 2, Experts: []int32{0, 3, 3, -1}}
	x.count("m", 2, 4, 0, r)
	x.count("m", 2, 4, 1, r)
	got := x.take()["m"]
	if got == nil || !slices.Equal(got.Counts[0], []int64{1, 0, 0, 2}) || !slices.Equal(got.Counts[1], []int64{1, 0, 0, 2}) || got.Tokens != 2 {
		t.Fatalf("%+v", got)
	}
	if len(x.take()) != 0 {
		t.Fatal("counts not reset after take")
	}
	x.count("m", 2, 4, 0, r)
	x.giveBack(got)
	if c := x.take()["m"]; c.Counts[0][3] != 4 || c.Tokens != 4 {
		t.Fatalf("%+v", c)
	}
}
