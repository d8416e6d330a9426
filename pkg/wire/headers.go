package wire

// NATS header keys of stage, expert and challenge requests. Trace context
// travels beside them under the W3C keys "traceparent" and "tracestate".
const (
	// HdrRequest is the request (session) id; executors key KV caches by it.
	HdrRequest = "Tessera-Request"
	// HdrModel is the model id.
	HdrModel = "Tessera-Model"
	// HdrPlan is the plan version the route was taken from.
	HdrPlan = "Tessera-Plan"
	// HdrCustomer is the customer the work is for (usage attribution).
	HdrCustomer = "Tessera-Customer"
	// HdrPos is the position of the frame's first row in the sequence.
	HdrPos = "Tessera-Pos"
	// HdrRange is this hop's layer range "first:end".
	HdrRange = "Tessera-Range"
	// HdrPhase is PhasePrefill, PhaseDecode or PhaseRecompute (usage counts
	// prompt and generated tokens apart, and bills no recomputation).
	HdrPhase = "Tessera-Phase"
	// HdrLogits is "last" (logits of the last row only, the default) or
	// "all" (every row, for evaluation).
	HdrLogits = "Tessera-Logits"
	// HdrOp is absent on a stage request that starts a pass at the range's
	// first layer, and OpResume on one that continues a paused pass. On a
	// challenge it is absent (run the layers whole), OpTrunk or OpExpert.
	HdrOp = "Tessera-Op"
	// HdrSplit lists, comma-separated, the layers of a stage request's range
	// whose feed-forward network the requester computes on expert holders:
	// the stage node pauses at each of them (see expert.go).
	HdrSplit = "Tessera-Split"
	// HdrTrunk is set on the reply of a stage node that paused: the layer
	// whose experts the requester must now compute.
	HdrTrunk = "Tessera-Trunk"
	// HdrHeld is set on the reply of a stage node that paused: the
	// experts of the layer, comma-separated, that it holds itself and
	// already computed and added for the rows that chose them; the
	// requester sends only the rows' other choices to holders.
	HdrHeld = "Tessera-Held"
	// HdrLayer is the layer of an expert request.
	HdrLayer = "Tessera-Layer"
	// HdrExpert is the expert an OpExpert challenge names.
	HdrExpert = "Tessera-Expert"
	// HdrError is set on error replies: "<code>: <message>".
	HdrError = "Tessera-Error"
	// HdrNode is set on replies: the node that produced it.
	HdrNode = "Tessera-Node"
	// HdrComputeUS is set on replies: compute time spent in microseconds.
	HdrComputeUS = "Tessera-Compute-Us"
	// HdrEventID mirrors the JetStream de-duplication header on usage events.
	HdrMsgID = "Nats-Msg-Id"
)

// Phases of a stage request.
const (
	// PhasePrefill: the prompt's tokens.
	PhasePrefill = "prefill"
	// PhaseDecode: the one token generated last.
	PhaseDecode = "decode"
	// PhaseRecompute: a prefix re-run to rebuild KV caches after a failover.
	PhaseRecompute = "recompute"
)

// OpResume is HdrOp on a stage request that carries, for a paused pass,
// the summed expert outputs of the layer it paused at.
const OpResume = "resume"

// Challenges of nodes holding some of a layer's experts: OpTrunk runs the
// layer's trunk (compute.TrunkLayer: residual and normalized rows), OpExpert
// applies one expert (HdrExpert) of the layer to the rows, weight 1.
const (
	OpTrunk  = "trunk"
	OpExpert = "expert"
)

// Error codes carried in HdrError.
const (
	// ErrCodeKVMiss: the node lacks the KV cache for the request's earlier
	// positions (it is a new replica); the requester re-sends the prefix.
	ErrCodeKVMiss = "kv_miss"
	// ErrCodeBadRequest: the request was malformed; it was dead-lettered.
	ErrCodeBadRequest = "bad_request"
	// ErrCodeNotLoaded: the node does not hold the requested layers.
	ErrCodeNotLoaded = "not_loaded"
	// ErrCodeOverloaded: the node's queue is full.
	ErrCodeOverloaded = "overloaded"
	// ErrCodeDraining: the node is draining and takes no new requests.
	ErrCodeDraining = "draining"
	// ErrCodeInternal: the node failed.
	ErrCodeInternal = "internal"
)
