package wire

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/tessera-grid/tessera/schemas"
)

// messageTypes makes a fresh value of every JSON message type that arrives
// from outside a service (NATS messages, KV entries, HTTP bodies).
var messageTypes = []func() any{
	func() any { return new(Heartbeat) },
	func() any { return new(NodeRecord) },
	func() any { return new(MembershipEvent) },
	func() any { return new(ModelManifest) },
	func() any { return new(FragmentManifest) },
	func() any { return new(Plan) },
	func() any { return new(PlanEvent) },
	func() any { return new(UsageEvent) },
	func() any { return new(UsageBatch) },
	func() any { return new(DeadLetter) },
	func() any { return new(Control) },
	func() any { return new(CompletionRequest) },
	func() any { return new(ChatCompletionRequest) },
	func() any { return new(CompletionResponse) },
	func() any { return new(ChatCompletionResponse) },
	func() any { return new(ErrorResponse) },
	func() any { return new(ModelList) },
	func() any { return new(ExpertLoad) },
}

// FuzzDecodeMessages: Decode of any bytes into any message type returns an
// error or a value that encodes and decodes back to the same encoding.
func FuzzDecodeMessages(f *testing.F) {
	hb, _ := json.Marshal(sampleHeartbeat())
	for i := range messageTypes {
		f.Add(uint8(i), []byte(`{}`))
	}
	f.Add(uint8(0), hb)
	f.Add(uint8(10), []byte(`{"op":"release","request":"r1"}`))
	f.Add(uint8(11), []byte(`{"model":"m","prompt":"p","stop":["a","b"],"max_tokens":3,"temperature":0.5}`))
	f.Add(uint8(11), []byte(`{"model":"m","prompt":"p","stop":"\n"}`))
	f.Add(uint8(12), []byte(`{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":null}`))
	f.Add(uint8(5), []byte(`{"model":"m","assignments":[{"node":"a","first":0,"end":2}],"stages":[{"first":0,"end":2,"replicas":["a"]}],"created":"2026-11-22T10:00:00+01:00"}`))
	f.Add(uint8(9), []byte(`{"service":"x","data":"e30=","headers":{"a":["b"]},"time":"2026-11-22T10:00:00.5Z"}`))
	f.Fuzz(func(t *testing.T, kind uint8, data []byte) {
		mk := messageTypes[int(kind)%len(messageTypes)]
		v := mk()
		if err := Decode(data, v); err != nil {
			return
		}
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("%T decoded from %q does not encode: %v", v, data, err)
		}
		w := mk()
		if err := Decode(b, w); err != nil {
			t.Fatalf("%T: its own encoding %s does not decode: %v", v, b, err)
		}
		b2, err := json.Marshal(w)
		if err != nil || !bytes.Equal(b, b2) {
			t.Fatalf("%T: encoding changed on a round trip:\n%s\n%s (%v)", v, b, b2, err)
		}
	})
}

// schemaTypes pairs each schema with the type a service decodes after
// validating against it (the registry: heartbeats, then json.Unmarshal).
var schemaTypes = []struct {
	schema string
	mk     func() any
}{
	{SchemaHeartbeat, func() any { return new(Heartbeat) }},
	{SchemaNodeRecord, func() any { return new(NodeRecord) }},
	{SchemaMembershipEvent, func() any { return new(MembershipEvent) }},
	{SchemaModelManifest, func() any { return new(ModelManifest) }},
	{SchemaPlan, func() any { return new(Plan) }},
	{SchemaUsageEvent, func() any { return new(UsageEvent) }},
	{SchemaControl, func() any { return new(Control) }},
	{SchemaCompletionRequest, func() any { return new(CompletionRequest) }},
	{SchemaChatRequest, func() any { return new(ChatCompletionRequest) }},
}

// FuzzValidateThenDecode: validation against a message's schema and the
// decoding that follows it take any bytes without a panic.
func FuzzValidateThenDecode(f *testing.F) {
	set, err := schemas.Compile()
	if err != nil {
		f.Fatal(err)
	}
	hb, _ := json.Marshal(sampleHeartbeat())
	f.Add(uint8(0), hb)
	f.Add(uint8(0), []byte(`{"node":"n1","seq":1.0,"interval_ms":1e3}`))
	f.Add(uint8(6), []byte(`{"op":"drain"}`))
	f.Add(uint8(7), []byte(`{"model":"m","prompt":"p","stop":[1]}`))
	f.Fuzz(func(t *testing.T, kind uint8, data []byte) {
		st := schemaTypes[int(kind)%len(schemaTypes)]
		if set.Validate(st.schema, data) != nil {
			return
		}
		_ = json.Unmarshal(data, st.mk())
	})
}
