// Package wire holds the message types that travel between services. Every
// JSON type here has a JSON Schema of the same name in schemas/ (the contract
// that other-language clients read); a test encodes each type and validates it
// against its schema. Tensors travel as binary frames (frame.go), never JSON.
package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
)

// Schema names: one per JSON message type, matching schemas/<name>.json.
const (
	SchemaHeartbeat          = "heartbeat"
	SchemaNodeRecord         = "node_record"
	SchemaMembershipEvent    = "membership_event"
	SchemaModelManifest      = "model_manifest"
	SchemaFragmentManifest   = "fragment_manifest"
	SchemaPlan               = "plan"
	SchemaCompletionRequest  = "completion_request"
	SchemaCompletionResponse = "completion_response"
	SchemaChatRequest        = "chat_completion_request"
	SchemaErrorResponse      = "error_response"
	SchemaUsageEvent         = "usage_event"
	SchemaDeadLetter         = "dead_letter"
	SchemaPlanEvent          = "plan_event"
	SchemaControl            = "control"
	SchemaNodeQuery          = "node_query"
	SchemaNodeList           = "node_list"
	SchemaRegistryStats      = "registry_stats"
)

// Device is one compute device a node offers: a GPU found through NVML or a
// CPU device where there is none.
type Device struct {
	// Index is the device's position on its node.
	Index int `json:"index"`
	// Kind is "gpu" or "cpu".
	Kind string `json:"kind"`
	// Name is the product name, e.g. "NVIDIA A100-SXM4-40GB".
	Name string `json:"name"`
	// UUID is NVML's device UUID; CPU devices use "cpu-<node>-<index>".
	UUID string `json:"uuid"`
	// MemoryTotal and MemoryFree are in bytes.
	MemoryTotal uint64 `json:"memory_total_bytes"`
	MemoryFree  uint64 `json:"memory_free_bytes"`
	// ComputeCapability is "major.minor" for GPUs, empty for CPUs.
	ComputeCapability string `json:"compute_capability,omitempty"`
	// Utilization is the compute utilization in percent.
	Utilization float64 `json:"utilization_pct"`
	// TemperatureC is the die temperature; PowerW the current draw.
	TemperatureC float64 `json:"temperature_c,omitempty"`
	PowerW       float64 `json:"power_w,omitempty"`
	// Error is set when the device was found but could not be queried.
	Error string `json:"error,omitempty"`
}

// SpeedSample is a measured speed of one device on one layer of a model family.
type SpeedSample struct {
	Model  string `json:"model"`
	DType  string `json:"dtype"`
	Device string `json:"device"`
	// DecodeTokS and PrefillTokS are tokens/s through one layer.
	DecodeTokS  float64 `json:"decode_tok_s"`
	PrefillTokS float64 `json:"prefill_tok_s"`
}

// FetchProgress reports how much of the assigned fragments a node has fetched.
type FetchProgress struct {
	BytesDone  int64 `json:"bytes_done"`
	BytesTotal int64 `json:"bytes_total"`
}

// Node states, as reported in heartbeats and node records.
const (
	NodeStarting    = "starting"
	NodeReady       = "ready"
	NodeDraining    = "draining"
	NodeDegraded    = "degraded"
	NodeQuarantined = "quarantined"
	// NodeStopped is a node's last heartbeat: it has finished its work and
	// exits, so the registry marks it left at once instead of waiting for
	// its silence.
	NodeStopped = "stopped"
)

// Heartbeat is what an executor publishes every interval on
// subjects.Heartbeat(node), signed with its nkey.
type Heartbeat struct {
	Node     string `json:"node"`
	Supplier string `json:"supplier"`
	Region   string `json:"region"`
	// PublicKey is the node's ed25519 public nkey ("U..."); it signs
	// heartbeats and usage events.
	PublicKey string    `json:"public_key"`
	Seq       uint64    `json:"seq"`
	Time      time.Time `json:"time"`
	// IntervalMS is the heartbeat interval the node uses.
	IntervalMS int64    `json:"interval_ms"`
	State      string   `json:"state"`
	Devices    []Device `json:"devices"`
	// MemoryBudget is what the supplier offers for weights and caches, bytes.
	MemoryBudget uint64 `json:"memory_budget_bytes"`
	MemoryFree   uint64 `json:"memory_free_bytes"`
	// Models lists model ids the node is able to serve.
	Models []string `json:"models,omitempty"`
	// Fragments lists the fragments loaded and ready, "model/fragment".
	Fragments    []string      `json:"fragments"`
	Fetch        FetchProgress `json:"fetch"`
	KVTokensFree int64         `json:"kv_tokens_free"`
	QueueDepth   int           `json:"queue_depth"`
	// Sessions is the number of requests holding KV caches on the node.
	Sessions int           `json:"sessions"`
	Speed    []SpeedSample `json:"speed,omitempty"`
	// Signature is the base64 ed25519 signature over the heartbeat encoded
	// with Signature empty (see the executor's identity package).
	Signature string `json:"signature,omitempty"`
}

// NodeRecord is the value of a node's key in KV nodes, kept by the registry.
type NodeRecord struct {
	Heartbeat Heartbeat `json:"heartbeat"`
	// State is the registry's view: ready, draining, degraded, quarantined.
	State            string    `json:"state"`
	JoinedAt         time.Time `json:"joined_at"`
	LastSeen         time.Time `json:"last_seen"`
	QuarantineReason string    `json:"quarantine_reason,omitempty"`
}

// NodeQuery selects nodes from the registry (its nodes.list and nodes.get
// endpoints); empty fields match every node.
type NodeQuery struct {
	// Node is the node id (nodes.get).
	Node string `json:"node,omitempty"`
	// Model keeps nodes able to serve or holding fragments of the model.
	Model  string `json:"model,omitempty"`
	Region string `json:"region,omitempty"`
	// State keeps nodes in this registry state (ready, quarantined, ...).
	State string `json:"state,omitempty"`
}

// NodeList is the registry's answer to a node query, sorted by node id.
type NodeList struct {
	Nodes []NodeRecord `json:"nodes"`
}

// RegistryStats are the registry's counters since it started.
type RegistryStats struct {
	// Nodes is the number of live nodes; ByState splits them by state.
	Nodes   int            `json:"nodes"`
	ByState map[string]int `json:"by_state"`
	// HeartbeatsReceived counts every message on the heartbeat subjects,
	// HeartbeatsAccepted those that updated a node.
	HeartbeatsReceived uint64 `json:"heartbeats_received"`
	HeartbeatsAccepted uint64 `json:"heartbeats_accepted"`
	// Rejected counts refused heartbeats by reason (bad_signature,
	// key_not_bound, wrong_subject, invalid_heartbeat, replayed).
	Rejected map[string]uint64 `json:"rejected"`
	// Pending is the number of received heartbeats not yet processed.
	Pending int `json:"pending"`
	// RecordWrites counts writes of node records into KV nodes.
	RecordWrites uint64 `json:"record_writes"`
	// ChallengesPassed and ChallengesFailed count speed and correctness
	// challenges by outcome.
	ChallengesPassed uint64 `json:"challenges_passed"`
	ChallengesFailed uint64 `json:"challenges_failed"`
}

// Membership event kinds.
const (
	MemberJoined      = "joined"
	MemberLeft        = "left"
	MemberDegraded    = "degraded"
	MemberDraining    = "draining"
	MemberQuarantined = "quarantined"
	MemberRestored    = "restored"
)

// MembershipEvent records a change of a node's membership.
type MembershipEvent struct {
	ID     string    `json:"id"`
	Node   string    `json:"node"`
	Kind   string    `json:"kind"`
	Reason string    `json:"reason,omitempty"`
	Time   time.Time `json:"time"`
}

// ModelConfig is a transformer's shape.
type ModelConfig struct {
	Dim       int `json:"dim"`
	HiddenDim int `json:"hidden_dim"`
	Layers    int `json:"n_layers"`
	Heads     int `json:"n_heads"`
	KVHeads   int `json:"n_kv_heads"`
	Vocab     int `json:"vocab_size"`
	SeqLen    int `json:"seq_len"`
	// SharedClassifier means the head reuses the token embedding.
	SharedClassifier bool `json:"shared_classifier"`
	// Experts and TopK describe MoE feed-forward layers (0 for dense).
	Experts int `json:"n_experts,omitempty"`
	TopK    int `json:"top_k,omitempty"`
	// FFNGroups splits each dense FFN into groups for selective activation
	// (0 or 1 = not split).
	FFNGroups int `json:"ffn_groups,omitempty"`
}

// FragmentRef names one fragment of a model and where its blob lives.
type FragmentRef struct {
	// ID is "embed", "head", "layer.<i>", "layer.<i>.expert.<e>".
	ID   string `json:"id"`
	Kind string `json:"kind"`
	// Layer is the layer index for layer and expert fragments, else -1.
	Layer  int `json:"layer"`
	Expert int `json:"expert"`
	// Object is the object store name of the blob ("sha256/<hex>").
	Object string `json:"object"`
	SHA256 string `json:"sha256"`
	Bytes  int64  `json:"bytes"`
}

// ModelManifest is the value of a model's key in KV models.
type ModelManifest struct {
	ID     string      `json:"id"`
	Family string      `json:"family"`
	Config ModelConfig `json:"config"`
	// DType is the storage type of matrix weights: f32, f16 or q8_0.
	DType string `json:"dtype"`
	// Tokenizer is the object name of the tokenizer blob and its digest.
	TokenizerObject string        `json:"tokenizer_object"`
	TokenizerSHA256 string        `json:"tokenizer_sha256"`
	Fragments       []FragmentRef `json:"fragments"`
	// LayerWeightBytes is the weight bytes of one layer (all its experts).
	LayerWeightBytes int64 `json:"layer_weight_bytes"`
	// KVBytesPerToken is the KV-cache bytes one token needs in one layer.
	KVBytesPerToken int64 `json:"kv_bytes_per_token_per_layer"`
	// KVBytesPerTokenModel is the KV-cache bytes one token needs in all layers.
	KVBytesPerTokenModel int64 `json:"kv_bytes_per_token,omitempty"`
	// LayerBytes is each layer's weight bytes (its fragment, all experts).
	LayerBytes []int64 `json:"layer_bytes,omitempty"`
	// ExpertLayout describes how each layer's feed-forward network is
	// split into groups that tokens activate selectively.
	ExpertLayout *ExpertLayout `json:"expert_layout,omitempty"`
	// FLOPsPerToken is the forward FLOPs per token for the whole model
	// (dense, or with top_k experts active).
	FLOPsPerToken int64     `json:"flops_per_token"`
	TotalBytes    int64     `json:"total_bytes"`
	Created       time.Time `json:"created"`
}

// ExpertLayout is how a model's feed-forward layers divide into expert
// groups: native mixture-of-experts experts, or groups of a dense FFN's
// neurons. A dense, unsplit model has one group with TopK 1.
type ExpertLayout struct {
	// Groups is the number of expert groups per layer.
	Groups int `json:"groups"`
	// TopK is how many groups each token activates per layer.
	TopK int `json:"top_k"`
	// Native says the groups are a mixture of experts' trained experts.
	Native bool `json:"native"`
	// GroupBytes is the weight bytes of one group in one layer.
	GroupBytes int64 `json:"group_bytes"`
	// SharedBytes is a layer's weight bytes outside the groups (attention,
	// norms, gate), which every token uses.
	SharedBytes int64 `json:"shared_bytes"`
}

// TensorInfo describes one tensor inside a fragment blob.
type TensorInfo struct {
	Name   string `json:"name"`
	Shape  []int  `json:"shape"`
	DType  string `json:"dtype"`
	Offset int64  `json:"offset"`
	Bytes  int64  `json:"bytes"`
}

// FragmentManifest describes a fragment blob's contents; it is stored as the
// object's metadata and at the start of the blob.
type FragmentManifest struct {
	Model    string       `json:"model"`
	Fragment string       `json:"fragment"`
	Kind     string       `json:"kind"`
	Layer    int          `json:"layer"`
	Expert   int          `json:"expert"`
	DType    string       `json:"dtype"`
	Tensors  []TensorInfo `json:"tensors"`
	SHA256   string       `json:"sha256"`
	Bytes    int64        `json:"bytes"`
}

// Assignment is what one node holds under a plan: layers [First, End) and,
// for split feed-forward layers, the listed experts (all when empty).
type Assignment struct {
	Node    string `json:"node"`
	First   int    `json:"first"`
	End     int    `json:"end"`
	Experts []int  `json:"experts,omitempty"`
	// Embed and Head say the node also holds the embedding and the head.
	Embed bool `json:"embed"`
	Head  bool `json:"head"`
}

// Stage is a contiguous layer range and the nodes that can run it.
type Stage struct {
	First    int      `json:"first"`
	End      int      `json:"end"`
	Replicas []string `json:"replicas"`
}

// Plan is the value of a model's key in KV plans.
type Plan struct {
	Model    string `json:"model"`
	Version  uint64 `json:"version"`
	Strategy string `json:"strategy"`
	Layers   int    `json:"layers"`
	// Assignments lists every used node.
	Assignments []Assignment `json:"assignments"`
	// Stages covers [0, Layers) in order; each stage's replicas hold it.
	Stages []Stage `json:"stages"`
	// ThroughputTokS is the plan's expected max-flow throughput.
	ThroughputTokS float64   `json:"throughput_tok_s"`
	Created        time.Time `json:"created"`
	Reason         string    `json:"reason,omitempty"`
}

// PlanEvent is published once per new plan.
type PlanEvent struct {
	Model          string    `json:"model"`
	Version        uint64    `json:"version"`
	Reason         string    `json:"reason"`
	Nodes          int       `json:"nodes"`
	MovedBytes     int64     `json:"moved_bytes"`
	ThroughputTokS float64   `json:"throughput_tok_s"`
	Time           time.Time `json:"time"`
}

// DeadLetter wraps a message that a service could not process.
type DeadLetter struct {
	Service string              `json:"service"`
	Subject string              `json:"subject"`
	Reason  string              `json:"reason"`
	Error   string              `json:"error"`
	Time    time.Time           `json:"time"`
	Headers map[string][]string `json:"headers,omitempty"`
	// Data is the original payload (base64 in JSON).
	Data []byte `json:"data"`
	// StreamSeq is the source stream sequence, when the message came from one.
	StreamSeq uint64 `json:"stream_seq,omitempty"`
}

// Control is a message on a node's control subject.
type Control struct {
	// Op is "release" (free a request's KV caches), "drain", or "ping"
	// (a liveness check answered at once).
	Op      string `json:"op"`
	Request string `json:"request,omitempty"`
}

// Decode unmarshals data into v, rejecting unknown fields and trailing data,
// and naming the type in the error.
func Decode(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode %T: %w", v, err)
	}
	if dec.More() {
		return fmt.Errorf("decode %T: trailing data after JSON value", v)
	}
	return nil
}
