package wire

import (
	"fmt"
	"strings"
	"time"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

// SchemaCustomerUsage names the schema of CustomerUsage.
const SchemaCustomerUsage = "customer_usage"

// UsageEvent is one executor's signed account of the work it did for one
// request. Executors publish it on subjects.UsageNode(node) with the event id
// as Nats-Msg-Id; settlement verifies, prices and stores it exactly once.
// pkg/usagesig defines its canonical encoding and signature.
type UsageEvent struct {
	// ID is unique per (request, node, stage) and used as Nats-Msg-Id.
	ID       string `json:"id"`
	Request  string `json:"request"`
	Customer string `json:"customer"`
	Supplier string `json:"supplier"`
	Node     string `json:"node"`
	Model    string `json:"model"`
	// Fragment is what was computed, e.g. "layers[0,2)+embed".
	Fragment string `json:"fragment"`
	// PromptTokens and GeneratedTokens are what the customer is billed for:
	// only the node that runs the model's head reports them (the tokens it
	// prefilled and produced), every other event of the request carries 0,
	// so that a request's tokens are counted once however many stages it
	// crossed.
	PromptTokens    int64 `json:"prompt_tokens"`
	GeneratedTokens int64 `json:"generated_tokens"`
	// LayerTokens is tokens × layers this node computed; suppliers are paid
	// for it.
	LayerTokens int64 `json:"layer_tokens"`
	// Messages counts stage and expert requests served; FLOPs is the
	// arithmetic done (selective activation lowers both).
	Messages int64 `json:"messages"`
	FLOPs    int64 `json:"flops"`
	// DeviceType is the device class that did the work: "cpu" or the GPU's
	// product name ("NVIDIA A100-SXM4-40GB"); the price book pays suppliers
	// per class. Printable ASCII, at most 128 bytes.
	DeviceType string `json:"device_type"`
	// ComputeUS is the summed compute time in microseconds.
	ComputeUS int64     `json:"compute_us"`
	Start     time.Time `json:"start"`
	End       time.Time `json:"end"`
	// PublicKey is the signing node's ed25519 public nkey ("U..."); it must
	// be the key the registry holds for Node.
	PublicKey string `json:"public_key"`
	// Batch proves that PublicKey signed this event.
	Batch UsageBatch `json:"batch"`
}

// UsageBatch is the signature of a batch of usage events: the node builds a
// Merkle tree (RFC 9162) over the events' canonical encodings and signs its
// root once; each event carries the root, the signature and its own
// inclusion proof, so that it can be verified alone while one ed25519
// operation covers the whole batch.
type UsageBatch struct {
	// Root is the base64 Merkle tree head over the batch's events.
	Root string `json:"root"`
	// Size is the number of events in the batch; Index this event's
	// position in it.
	Size  int `json:"size"`
	Index int `json:"index"`
	// Proof lists the base64 sibling hashes from this event's leaf up to the
	// root (empty for a batch of one).
	Proof []string `json:"proof,omitempty"`
	// Signature is the base64 ed25519 signature by PublicKey over the root.
	Signature string `json:"signature"`
}

// CustomerUsage is a verified, priced usage event as its customer sees it on
// subjects.CustomerUsage(customer, model). Customers may check Event's
// signature themselves; they de-duplicate redeliveries by Event.ID.
type CustomerUsage struct {
	Event UsageEvent `json:"event"`
	// Seq is the event's sequence in stream USAGE: its position in the ledger.
	Seq uint64 `json:"seq"`
	// PriceVersion is the price book version ChargeMicros was computed with.
	PriceVersion uint64 `json:"price_version"`
	// ChargeMicros is what the customer pays for the event, in millionths of
	// the price book's currency.
	ChargeMicros int64     `json:"charge_micros"`
	SettledAt    time.Time `json:"settled_at"`
}

// Bounds of a usage event's fields.
const (
	// MaxFragmentLen caps UsageEvent.Fragment in bytes.
	MaxFragmentLen = 256
	// MaxUsageBatch caps UsageBatch.Size.
	MaxUsageBatch = 1 << 20
)

// usageTimeMin and usageTimeMax bound the timestamps of a usage event, so
// that every valid time has a Unix-nanosecond encoding.
var (
	usageTimeMin = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	usageTimeMax = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC)
)

// Validate checks every field of e except the signature itself (see
// pkg/usagesig), naming the first field that is wrong.
func (e *UsageEvent) Validate() error {
	for _, f := range []struct{ name, v string }{
		{"id", e.ID}, {"request", e.Request}, {"customer", e.Customer}, {"supplier", e.Supplier},
		{"node", e.Node}, {"model", e.Model},
	} {
		if err := subjects.Token(f.v); err != nil {
			return fmt.Errorf("usage event %.64q: %s: %w", e.ID, f.name, err)
		}
	}
	if e.DeviceType == "" || len(e.DeviceType) > 128 || strings.IndexFunc(e.DeviceType, func(r rune) bool { return r < 0x20 || r > 0x7e }) >= 0 {
		return fmt.Errorf("usage event %q: device_type %.64q: want 1 to 128 printable ASCII characters", e.ID, e.DeviceType)
	}
	if e.Fragment == "" || len(e.Fragment) > MaxFragmentLen {
		return fmt.Errorf("usage event %q: fragment: want 1 to %d bytes, have %d", e.ID, MaxFragmentLen, len(e.Fragment))
	}
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"prompt_tokens", e.PromptTokens}, {"generated_tokens", e.GeneratedTokens}, {"layer_tokens", e.LayerTokens},
		{"messages", e.Messages}, {"flops", e.FLOPs}, {"compute_us", e.ComputeUS},
	} {
		if f.v < 0 {
			return fmt.Errorf("usage event %q: %s: negative (%d)", e.ID, f.name, f.v)
		}
	}
	for _, f := range []struct {
		name string
		v    time.Time
	}{{"start", e.Start}, {"end", e.End}} {
		if f.v.Before(usageTimeMin) || !f.v.Before(usageTimeMax) {
			return fmt.Errorf("usage event %q: %s: %v outside [%v, %v)", e.ID, f.name, f.v, usageTimeMin, usageTimeMax)
		}
	}
	if e.End.Before(e.Start) {
		return fmt.Errorf("usage event %q: end %v before start %v", e.ID, e.End, e.Start)
	}
	if e.PublicKey == "" {
		return fmt.Errorf("usage event %q: public_key: empty", e.ID)
	}
	b := &e.Batch
	switch {
	case b.Size < 1 || b.Size > MaxUsageBatch:
		return fmt.Errorf("usage event %q: batch.size: %d outside [1, %d]", e.ID, b.Size, MaxUsageBatch)
	case b.Index < 0 || b.Index >= b.Size:
		return fmt.Errorf("usage event %q: batch.index: %d outside [0, %d)", e.ID, b.Index, b.Size)
	case len(b.Proof) > 64:
		return fmt.Errorf("usage event %q: batch.proof: %d hashes, at most 64", e.ID, len(b.Proof))
	case b.Root == "":
		return fmt.Errorf("usage event %q: batch.root: empty", e.ID)
	case b.Signature == "":
		return fmt.Errorf("usage event %q: batch.signature: empty", e.ID)
	}
	return nil
}
