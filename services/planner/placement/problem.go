package placement

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Coordinator names the router in Network.NodeLinks: every token enters the
// grid from it (towards the node holding layer 0) and leaves towards it (from
// the node holding the last layer).
const Coordinator = "@coordinator"

// Problem is everything a strategy needs: the model, the live nodes and the
// network between them. It is plain data. The planner service builds one from
// the registry's node records; tests build one by hand:
//
//	p := &placement.Problem{
//		Model: placement.Model{Name: "m", Layers: 32, LayerBytes: 200 << 20,
//			ActivationBytesPerToken: 8192, TokenBytes: 4},
//		Nodes: []placement.Node{{ID: "a", Device: "L4", Region: "eu",
//			MemoryBytes: 24e9, Throughput: placement.ThroughputTable{0, 900, 450}}},
//	}
type Problem struct {
	// Model is what is being placed.
	Model Model `json:"model"`
	// Nodes are the candidates, in a stable order (strategies break ties by it).
	Nodes []Node `json:"nodes"`
	// Network gives the bandwidth between nodes, regions and the coordinator.
	Network Network `json:"network"`
	// ExcludeRegions lists regions whose nodes must hold nothing (maintenance,
	// data residency).
	ExcludeRegions []string `json:"exclude_regions,omitempty"`
}

// Model describes the layers being placed. Sizes are bytes.
type Model struct {
	// Name identifies the model (for example "llama2_70b").
	Name string `json:"name"`
	// Layers is the number of transformer layers; placements cut [0, Layers).
	Layers int `json:"layers"`
	// LayerBytes is the weight size of one layer, experts included (the
	// estimate for every layer when LayerFragments is empty).
	LayerBytes int64 `json:"layer_bytes"`
	// KVBytesPerTokenLayer is the KV cache of one token in one layer.
	KVBytesPerTokenLayer int64 `json:"kv_bytes_per_token_layer"`
	// KVReserveTokens is how many tokens of KV cache a node must be able to
	// hold in every layer it serves, on top of the weights (0: weights only).
	KVReserveTokens int64 `json:"kv_reserve_tokens,omitempty"`
	// ActivationBytesPerToken is the hidden state that crosses a stage
	// boundary for one token (hidden size × element size).
	ActivationBytesPerToken int64 `json:"activation_bytes_per_token"`
	// TokenBytes is the size of a token id on the coordinator's links.
	TokenBytes int64 `json:"token_bytes"`
	// Experts is the number of experts per layer that a node may hold only
	// some of: a mixture of experts' experts or a dense feed-forward
	// network's neuron groups, stored apart (0 when layers are stored whole).
	Experts int `json:"experts,omitempty"`
	// ExpertBytes is the size of one expert in one layer (part of LayerBytes;
	// the estimate when LayerFragments is empty).
	ExpertBytes int64 `json:"expert_bytes,omitempty"`
	// ExpertSpread is how many of the nodes holding the same layers may
	// divide each layer's experts among them (SpreadExperts); a node is
	// sized for its share unless AllExperts. Below 2 every node holds, and
	// is sized for, all the experts of its layers.
	ExpertSpread int `json:"expert_spread,omitempty"`
	// LayerFragments gives, per layer, the real weight bytes of its stored
	// fragments (empty: LayerBytes and ExpertBytes estimate them).
	LayerFragments []LayerFragments `json:"layer_fragments,omitempty"`
}

// LayerFragments is one layer's weights as stored: its trunk (attention,
// norms and whatever else every token uses, such as a split layer's gate
// and compensation) and each of its Model.Experts experts.
type LayerFragments struct {
	Trunk   int64   `json:"trunk"`
	Experts []int64 `json:"experts,omitempty"`
}

// NodeState is a node's lifecycle state as the registry reports it.
type NodeState string

// The node states. The zero value "" counts as active.
const (
	StateActive      NodeState = "active"
	StateDraining    NodeState = "draining"
	StateQuarantined NodeState = "quarantined"
	StateOffline     NodeState = "offline"
)

// Node is one placement target: a machine (one or several GPUs acting as one
// pipeline stage) that holds a contiguous range of layers.
type Node struct {
	// ID is unique within the Problem.
	ID string `json:"id"`
	// Device is the machine type, for example "A100" or "L4x2".
	Device string `json:"device"`
	// Region groups nodes on a fast local network.
	Region string `json:"region"`
	// MemoryBytes is the accelerator memory available for weights and KV cache.
	MemoryBytes int64 `json:"memory_bytes"`
	// MaxLayers caps the layers this node may hold beyond what memory allows
	// (0: memory alone decides).
	MaxLayers int `json:"max_layers,omitempty"`
	// InboundBytesPerS and OutboundBytesPerS are the NIC limits (0: unlimited).
	InboundBytesPerS  float64 `json:"inbound_bytes_per_s,omitempty"`
	OutboundBytesPerS float64 `json:"outbound_bytes_per_s,omitempty"`
	// Throughput gives the node's token rate for a given number of layers.
	Throughput ThroughputModel `json:"-"`
	// State is the registry's view of the node; only active nodes hold layers.
	State NodeState `json:"state,omitempty"`
	// AllExperts sizes the node for every expert of its layers even when
	// the model's experts are spread (PlaceSpread sets it for a node left
	// without enough partners to share them).
	AllExperts bool `json:"all_experts,omitempty"`
}

// ThroughputModel is a node's token rate: tokens per second that pass
// through the node when it holds `layers` contiguous layers (prompt and
// generated tokens together). It returns 0 when the node cannot hold that
// many. Helix's typical-throughput model is one implementation; LayerTiming
// turns measured per-layer times into one.
type ThroughputModel interface {
	TokensPerSecond(layers int) float64
}

// ThroughputTable is a ThroughputModel given by value: entry k is the rate
// with k layers (entry 0 is unused); beyond the table the node cannot serve.
type ThroughputTable []float64

var _ ThroughputModel = ThroughputTable(nil)

// TokensPerSecond returns entry `layers` of the table, or 0 outside it.
func (t ThroughputTable) TokensPerSecond(layers int) float64 {
	if layers <= 0 || layers >= len(t) {
		return 0
	}
	return t[layers]
}

// LayerTiming is a ThroughputModel built from measured per-layer times, as an
// executor reports them: a node holding k layers spends k times the per-layer
// time on every token.
type LayerTiming struct {
	// PrefillSecondsPerToken is the time one layer takes per prompt token at
	// the node's usual prefill batch.
	PrefillSecondsPerToken float64 `json:"prefill_seconds_per_token"`
	// DecodeSecondsPerToken is the time one layer takes per generated token at
	// the node's usual decode batch.
	DecodeSecondsPerToken float64 `json:"decode_seconds_per_token"`
	// PromptShare is the share of tokens that are prompt tokens (0..1).
	PromptShare float64 `json:"prompt_share"`
	// MaxLayers is the most layers the measurement is valid for (0: any).
	MaxLayers int `json:"max_layers,omitempty"`
}

var _ ThroughputModel = LayerTiming{}

// TokensPerSecond is 1 / (layers × the token-weighted per-layer time).
func (m LayerTiming) TokensPerSecond(layers int) float64 {
	if layers <= 0 || (m.MaxLayers > 0 && layers > m.MaxLayers) {
		return 0
	}
	perLayer := m.PromptShare*m.PrefillSecondsPerToken + (1-m.PromptShare)*m.DecodeSecondsPerToken
	if perLayer <= 0 {
		return 0
	}
	return 1 / (float64(layers) * perLayer)
}

// Network describes the links. The bandwidth from endpoint a to endpoint b
// (node IDs, or Coordinator) is found in this order:
//
//  1. a NodeLinks entry From a To b (directed);
//  2. a RegionLinks entry between their regions, in either direction (the
//     Coordinator's region is CoordinatorRegion);
//  3. unlimited when both are in the same region, or when one of them is the
//     Coordinator and CoordinatorRegion is empty;
//  4. otherwise there is no link.
//
// Bandwidth is per pair of endpoints: two nodes each get the full bandwidth
// of a region link between them, as every pair has its own connection.
type Network struct {
	// CoordinatorRegion is where the router runs ("": close to every node).
	CoordinatorRegion string `json:"coordinator_region,omitempty"`
	// RegionLinks are symmetric links between regions (From == To: inside one).
	RegionLinks []Link `json:"region_links,omitempty"`
	// NodeLinks are directed links between two nodes or a node and the
	// Coordinator; they override RegionLinks.
	NodeLinks []Link `json:"node_links,omitempty"`
}

// Link is a connection with its bandwidth and latency.
type Link struct {
	From string `json:"from"`
	To   string `json:"to"`
	// BandwidthBytesPerS is bytes per second in each direction; +Inf is unlimited.
	BandwidthBytesPerS float64 `json:"bandwidth_bytes_per_s"`
	// Latency is one-way.
	Latency time.Duration `json:"latency"`
}

// Validate reports the first thing that makes p unusable, wrapped in
// ErrInvalidProblem.
func (p *Problem) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidProblem}, args...)...)
	}
	m := p.Model
	switch {
	case m.Layers <= 0:
		return bad("model %q has %d layers", m.Name, m.Layers)
	case m.LayerBytes < 0 || m.KVBytesPerTokenLayer < 0 || m.KVReserveTokens < 0:
		return bad("model %q has a negative size", m.Name)
	case m.ActivationBytesPerToken < 0 || m.TokenBytes < 0:
		return bad("model %q has a negative activation or token size", m.Name)
	case m.Experts < 0 || m.ExpertBytes < 0 || int64(m.Experts)*m.ExpertBytes > m.LayerBytes:
		return bad("model %q: %d experts of %d bytes do not fit a layer of %d bytes",
			m.Name, m.Experts, m.ExpertBytes, m.LayerBytes)
	case m.ExpertSpread < 0:
		return bad("model %q has expert spread %d", m.Name, m.ExpertSpread)
	case len(m.LayerFragments) != 0 && len(m.LayerFragments) != m.Layers:
		return bad("model %q gives fragment sizes of %d layers, want %d", m.Name, len(m.LayerFragments), m.Layers)
	}
	for l, lf := range m.LayerFragments {
		if len(lf.Experts) != m.Experts {
			return bad("model %q layer %d lists %d expert sizes, want %d", m.Name, l, len(lf.Experts), m.Experts)
		}
		if lf.Trunk < 0 || slices.ContainsFunc(lf.Experts, func(b int64) bool { return b < 0 }) {
			return bad("model %q layer %d has a negative fragment size", m.Name, l)
		}
	}
	ids := make(map[string]bool, len(p.Nodes))
	for i := range p.Nodes {
		n := &p.Nodes[i]
		switch {
		case n.ID == "" || n.ID == Coordinator:
			return bad("node %d has id %q", i, n.ID)
		case ids[n.ID]:
			return bad("node id %q appears twice", n.ID)
		case n.Throughput == nil:
			return bad("node %q has no throughput model", n.ID)
		case n.MemoryBytes < 0 || n.MaxLayers < 0 || n.InboundBytesPerS < 0 || n.OutboundBytesPerS < 0:
			return bad("node %q has a negative memory, layer or NIC limit", n.ID)
		}
		switch n.State {
		case "", StateActive, StateDraining, StateQuarantined, StateOffline:
		default:
			return bad("node %q has unknown state %q", n.ID, n.State)
		}
		ids[n.ID] = true
	}
	for _, l := range p.Network.RegionLinks {
		if !(l.BandwidthBytesPerS > 0) || math.IsNaN(l.BandwidthBytesPerS) {
			return bad("region link %s-%s has bandwidth %v", l.From, l.To, l.BandwidthBytesPerS)
		}
	}
	for _, l := range p.Network.NodeLinks {
		for _, end := range []string{l.From, l.To} {
			if end != Coordinator && !ids[end] {
				return bad("node link %s->%s names unknown node %q", l.From, l.To, end)
			}
		}
		if !(l.BandwidthBytesPerS > 0) || math.IsNaN(l.BandwidthBytesPerS) {
			return bad("node link %s->%s has bandwidth %v", l.From, l.To, l.BandwidthBytesPerS)
		}
	}
	return nil
}

// active reports whether the state lets a node hold layers.
func (s NodeState) active() bool { return s == "" || s == StateActive }
