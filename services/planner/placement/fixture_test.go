package placement_test

import (
	"github.com/tessera-grid/tessera/services/planner/placement"
)

// chainProblem is a small hand-built fleet: one region, a model of 8
// layers, nodes whose throughput halves with every extra layer.
func chainProblem(nodes ...placement.Node) *placement.Problem {
	return &placement.Problem{
		Model: placement.Model{Name: "toy", Layers: 8, LayerBytes: 1 << 30,
			ActivationBytesPerToken: 1000, TokenBytes: 2},
		Nodes: nodes,
	}
}

// node makes an active node in region "eu" that may hold up to maxLayers
// layers and serves rate/k tokens/s with k layers.
func node(id string, maxLayers int, rate float64) placement.Node {
	table := make(placement.ThroughputTable, maxLayers+1)
	for k := 1; k <= maxLayers; k++ {
		table[k] = rate / float64(k)
	}
	return placement.Node{ID: id, Device: "gpu", Region: "eu", MemoryBytes: 100 << 30, MaxLayers: maxLayers, Throughput: table}
}
