package generate

import (
	"testing"
	"time"
)

func TestChooseRoute(t *testing.T) {
	costs := RouteCosts{Region: "eu", HopOverhead: 100 * time.Microsecond, RegionLatency: 20 * time.Millisecond}
	fast := func(n string) candidate { return candidate{node: n, region: "eu", layerSec: 0.001} }
	cases := []struct {
		name   string
		stages []stageCandidates
		want   []hop
	}{
		{"single replicas", []stageCandidates{{0, 2, []candidate{fast("a")}}, {2, 5, []candidate{fast("b")}}},
			[]hop{{"a", 0, 2}, {"b", 2, 5}}},
		{"least loaded replica", []stageCandidates{{0, 5, []candidate{{node: "a", region: "eu", layerSec: 0.001, load: 3}, fast("b")}}},
			[]hop{{"b", 0, 5}}},
		{"faster replica", []stageCandidates{{0, 5, []candidate{{node: "slow", region: "eu", layerSec: 0.01}, fast("quick")}}},
			[]hop{{"quick", 0, 5}}},
		{"same node saves a hop", []stageCandidates{
			{0, 2, []candidate{fast("a"), fast("b")}},
			{2, 4, []candidate{fast("c"), fast("b")}},
		}, []hop{{"b", 0, 4}}},
		{"remote region costs latency", []stageCandidates{{0, 5, []candidate{{node: "far", region: "us", layerSec: 0.0005}, fast("near")}}},
			[]hop{{"near", 0, 5}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, cost := chooseRoute(tc.stages, costs)
			if len(got) != len(tc.want) {
				t.Fatalf("route %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("route %v, want %v", got, tc.want)
				}
			}
			if cost <= 0 {
				t.Fatalf("cost %v", cost)
			}
		})
	}
}
