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

// A node's back-off grows once per outage, not once per request that saw
// it fail; it ends when the node joins again or serves a route.
func TestHealthBackOff(t *testing.T) {
	h := newHealth()
	joined := time.Now().Add(-time.Hour)
	for range 20 {
		h.fail("n1") // twenty requests hit the same dead node
	}
	if !h.backedOff("n1", joined) {
		t.Fatal("n1 not backed off after failing")
	}
	if f := h.fails["n1"]; f.count != 1 || time.Until(f.until) > 600*time.Millisecond {
		t.Fatalf("back-off after one outage: count %d, %v left; want 1 and at most 0.5s", f.count, time.Until(f.until))
	}
	// The node restarted and joined the grid again: it starts afresh.
	if h.backedOff("n1", time.Now()) {
		t.Fatal("n1 still backed off after joining again")
	}
	if _, ok := h.fails["n1"]; ok {
		t.Fatal("n1's failures kept after it joined again")
	}
	// A failure whose back-off has passed is forgotten when the node serves.
	h.fail("n2")
	h.fails["n2"].until = time.Now().Add(-time.Millisecond)
	h.succeeded([]hop{{node: "n2", first: 0, end: 5}})
	if _, ok := h.fails["n2"]; ok {
		t.Fatal("n2's failure kept after it served a route")
	}
}
