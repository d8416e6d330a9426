package placement_test

import (
	"context"
	"fmt"
	"time"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

// A planner service builds the Problem from its live node records: the
// model's sizes, each node's memory, region and measured speed, and the
// links between regions. Then any strategy plans it.
func Example() {
	p := &placement.Problem{
		Model: placement.Model{
			Name: "llama-8b", Layers: 32, LayerBytes: 436 << 20,
			KVBytesPerTokenLayer: 2 * 8 * 128 * 2, KVReserveTokens: 16384,
			ActivationBytesPerToken: 4096 * 2, TokenBytes: 4,
		},
		Network: placement.Network{RegionLinks: []placement.Link{
			{From: "eu", To: "us", BandwidthBytesPerS: 12.5e6, Latency: 80 * time.Millisecond},
		}},
	}
	// Measured per-layer times per token: prefill (batched) and decode.
	// Node 3 is alone in "us": it runs a pipeline of its own.
	fast := placement.LayerTiming{PrefillSecondsPerToken: 2e-6, DecodeSecondsPerToken: 40e-6, PromptShare: 0.75}
	slow := placement.LayerTiming{PrefillSecondsPerToken: 8e-6, DecodeSecondsPerToken: 150e-6, PromptShare: 0.75}
	for i, n := range []struct {
		region string
		mem    int64
		speed  placement.LayerTiming
	}{{"eu", 80e9, fast}, {"eu", 24e9, slow}, {"eu", 24e9, slow}, {"us", 24e9, slow}} {
		p.Nodes = append(p.Nodes, placement.Node{
			ID: fmt.Sprintf("node-%d", i), Device: "gpu", Region: n.region,
			MemoryBytes: n.mem, Throughput: n.speed,
		})
	}
	pl, err := placement.Tessera{}.Place(context.Background(), p, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%.0f tokens/s\n", pl.TokensPerS)
	for _, st := range pl.Stages {
		fmt.Printf("layers [%d,%d):", st.First, st.End)
		for _, r := range st.Replicas {
			fmt.Printf(" %s", r.Node)
		}
		fmt.Println()
	}
	// Output:
	// 4859 tokens/s
	// layers [0,21): node-0 node-3
	// layers [21,32): node-3 node-1 node-2
}
