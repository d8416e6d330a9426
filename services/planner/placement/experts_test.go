package placement_test

import (
	"slices"
	"testing"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

func TestSpreadExperts(t *testing.T) {
	full := func() *placement.Placement {
		return &placement.Placement{Assignments: []placement.Assignment{
			{Node: "a", First: 0, End: 4}, {Node: "b", First: 0, End: 4}, {Node: "c", First: 0, End: 4},
			{Node: "d", First: 0, End: 2}, {Node: "e", First: 2, End: 4},
		}}
	}
	experts := func(pl *placement.Placement) map[string][]int {
		out := map[string][]int{}
		for _, a := range pl.Assignments {
			out[a.Node] = a.Experts
		}
		return out
	}
	cases := []struct {
		name    string
		experts int
		spread  int
		load    [][]int64
		want    map[string][]int
	}{
		{"dense model unchanged", 0, 3, nil, map[string][]int{"a": nil, "b": nil, "c": nil, "d": nil, "e": nil}},
		{"no spread unchanged", 8, 1, nil, map[string][]int{"a": nil, "b": nil, "c": nil, "d": nil, "e": nil}},
		{"even spread over three", 8, 3, nil, map[string][]int{"a": {0, 3, 6}, "b": {1, 4, 7}, "c": {2, 5}, "d": nil, "e": nil}},
		{"two shards replicated", 4, 2, nil, map[string][]int{"a": {0, 2}, "b": {1, 3}, "c": {0, 2}, "d": nil, "e": nil}},
		// Experts 0 and 1 are hot: they go to different shards, and the
		// cold ones fill up the other shard.
		{"hot experts apart", 4, 2, [][]int64{{50, 40, 1, 1}, {50, 40, 1, 1}, {0, 0, 0, 0}, {0, 0, 0, 0}},
			map[string][]int{"a": {0}, "b": {1, 2, 3}, "c": {0}, "d": nil, "e": nil}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pl := full()
			placement.SpreadExperts(pl, tc.experts, tc.spread, tc.load)
			got := experts(pl)
			for n, w := range tc.want {
				if !slices.Equal(got[n], w) {
					t.Errorf("node %s holds experts %v, want %v", n, got[n], w)
				}
			}
		})
	}
}
