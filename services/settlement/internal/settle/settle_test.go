package settle

import (
	stdjson "encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/schemas"
	"github.com/tessera-grid/tessera/services/settlement/internal/ledger"
)

// The customer payload built around the published bytes is valid
// customer_usage JSON and says what encoding the struct would say, also for
// events published with nulls or unusual spacing.
func TestCustomerUsagePayload(t *testing.T) {
	set, err := schemas.Compile()
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := nkeys.CreateUser()
	signer, err := usagesig.FromKeyPair(kp)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 11, 22, 10, 0, 0, 123456789, time.FixedZone("X", 3600))
	// A batch of one, so that the event has no proof (omitted in JSON).
	evs := []wire.UsageEvent{{ID: "e0", Request: "r", Customer: "acme", Supplier: "s", Node: "n", Model: "m",
		Fragment: "layers[0,1)", PromptTokens: 3, LayerTokens: 9, DeviceType: "gpu", Start: t0, End: t0}}
	if err := signer.SignBatch(evs); err != nil {
		t.Fatal(err)
	}
	compact, _ := stdjson.Marshal(evs[0])
	spaced, _ := stdjson.MarshalIndent(evs[0], "  ", "  ")
	withNull := strings.Replace(string(compact), `"generated_tokens":0`, `"generated_tokens":null`, 1)
	settledAt := time.Date(2026, 11, 22, 11, 0, 0, 0, time.UTC)
	for name, raw := range map[string][]byte{"compact": compact, "indented": append([]byte("\n "), spaced...), "null": []byte(withNull)} {
		var ev wire.UsageEvent
		if err := stdjson.Unmarshal(raw, &ev); err != nil {
			t.Fatal(err)
		}
		row := ledger.Row{Seq: 42, Event: &ev, PriceVersion: 3, ChargeMicros: 17}
		payload, err := customerUsage(nil, raw, row, settledAt)
		if err != nil {
			t.Fatal(err)
		}
		if err := set.Validate(wire.SchemaCustomerUsage, payload); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, payload)
		}
		var got wire.CustomerUsage
		if err := wire.Decode(payload, &got); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := wire.CustomerUsage{Event: ev, Seq: 42, PriceVersion: 3, ChargeMicros: 17, SettledAt: settledAt}
		if !got.SettledAt.Equal(want.SettledAt) || !got.Event.Start.Equal(ev.Start) {
			t.Fatalf("%s: times %v %v", name, got.SettledAt, got.Event.Start)
		}
		got.SettledAt, got.Event.Start, got.Event.End = want.SettledAt, ev.Start, ev.End
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: got %+v\nwant %+v", name, got, want)
		}
		if err := usagesig.NewVerifier(16).Verify(&got.Event); err != nil {
			t.Fatalf("%s: the customer cannot verify the event: %v", name, err)
		}
	}
}
