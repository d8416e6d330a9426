package wire

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/schemas"
)

func TestUsageEventValidate(t *testing.T) {
	if ev := sampleUsage(); ev.Validate() != nil {
		t.Fatalf("sample rejected: %v", ev.Validate())
	}
	gpu := sampleUsage()
	gpu.DeviceType = "NVIDIA A100-SXM4-40GB"
	if err := gpu.Validate(); err != nil {
		t.Fatalf("GPU product name as device type: %v", err)
	}
	set, err := schemas.Compile()
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := json.Marshal(gpu); set.Validate(SchemaUsageEvent, b) != nil {
		t.Fatalf("schema rejects a GPU product name: %v", set.Validate(SchemaUsageEvent, b))
	}
	cases := []struct {
		want  string
		alter func(e *UsageEvent)
	}{
		{"id", func(e *UsageEvent) { e.ID = "" }},
		{"customer", func(e *UsageEvent) { e.Customer = "acme.*" }},
		{"model", func(e *UsageEvent) { e.Model = "m>" }},
		{"node", func(e *UsageEvent) { e.Node = strings.Repeat("n", 129) }},
		{"device_type", func(e *UsageEvent) { e.DeviceType = "" }},
		{"device_type", func(e *UsageEvent) { e.DeviceType = "gpu\n" }},
		{"fragment", func(e *UsageEvent) { e.Fragment = "" }},
		{"generated_tokens", func(e *UsageEvent) { e.GeneratedTokens = -5 }},
		{"compute_us", func(e *UsageEvent) { e.ComputeUS = -1 }},
		{"start", func(e *UsageEvent) { e.Start = time.Time{} }},
		{"end", func(e *UsageEvent) { e.End = e.Start.Add(-time.Second) }},
		{"end", func(e *UsageEvent) { e.End = time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC) }},
		{"public_key", func(e *UsageEvent) { e.PublicKey = "" }},
		{"batch.size", func(e *UsageEvent) { e.Batch.Size = 0 }},
		{"batch.index", func(e *UsageEvent) { e.Batch.Index = 2 }},
		{"batch.root", func(e *UsageEvent) { e.Batch.Root = "" }},
		{"batch.signature", func(e *UsageEvent) { e.Batch.Signature = "" }},
		{"batch.proof", func(e *UsageEvent) { e.Batch.Proof = make([]string, 65) }},
	}
	for _, tc := range cases {
		ev := sampleUsage()
		tc.alter(&ev)
		err := ev.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v", tc.want, err)
		}
	}
}
