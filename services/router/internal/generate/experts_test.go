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
	x := newExpertLoad(0)
	r := wire.Routed{Rows: 2, K: 2, Experts: []int32{0, 3, 3, -1}}
	x.count("m", 2, 4, 0, r, 1)
	x.count("m", 2, 4, 1, r, 1)
	got := x.take()["m"]
	if got == nil || !slices.Equal(got.Counts[0], []int64{1, 0, 0, 2}) || !slices.Equal(got.Counts[1], []int64{1, 0, 0, 2}) || got.Tokens != 2 {
		t.Fatalf("%+v", got)
	}
	if len(x.take()) != 0 {
		t.Fatal("counts not reset after take")
	}
	x.count("m", 2, 4, 0, r, 1)
	x.giveBack(got)
	if c := x.take()["m"]; c.Counts[0][3] != 4 || c.Tokens != 4 {
		t.Fatalf("%+v", c)
	}
	// A sampled pass's counts stand for the passes not sampled.
	x.count("m", 2, 4, 0, r, 16)
	if c := x.take()["m"]; !slices.Equal(c.Counts[0], []int64{16, 0, 0, 32}) || c.Tokens != 32 {
		t.Fatalf("weighted: %+v", c)
	}
}

// One pass in every `every` is sampled, the every-th first; 0 samples none.
func TestExpertLoadSample(t *testing.T) {
	cases := []struct {
		every int
		want  []int // the sampled passes among the first 10, from 1
	}{
		{0, nil},
		{1, []int{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}},
		{4, []int{4, 8}},
		{16, nil},
	}
	for _, tc := range cases {
		x := newExpertLoad(tc.every)
		var got []int
		for pass := 1; pass <= 10; pass++ {
			if x.sample() {
				got = append(got, pass)
			}
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("every %d: sampled passes %v, want %v", tc.every, got, tc.want)
		}
	}
}

func TestHopLayers(t *testing.T) {
	if got := hopLayers(hop{node: "a", first: 2, end: 5}); !slices.Equal(got, []int{2, 3, 4}) {
		t.Fatalf("hop [2,5) runs layers %v", got)
	}
}
