package wire

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/schemas"
)

func ptr[T any](v T) *T { return &v }

var t0 = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)

const pub = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"

func sampleHeartbeat() Heartbeat {
	return Heartbeat{
		Node: "node-1", Supplier: "acme", Region: "eu-west", PublicKey: pub, Seq: 7, Time: t0, IntervalMS: 2000,
		State: NodeReady,
		Devices: []Device{
			{Index: 0, Kind: "gpu", Name: "NVIDIA A100-SXM4-40GB", UUID: "GPU-1", MemoryTotal: 40 << 30, MemoryFree: 30 << 30, ComputeCapability: "8.0", Utilization: 12, TemperatureC: 40, PowerW: 90},
			{Index: 1, Kind: "cpu", Name: "x86", UUID: "cpu-node-1-0", MemoryTotal: 8 << 30, MemoryFree: 4 << 30},
		},
		MemoryBudget: 16 << 30, MemoryFree: 8 << 30, Models: []string{"stories260k"},
		Fragments: []string{"stories260k/layer.0"}, Fetch: FetchProgress{BytesDone: 10, BytesTotal: 20},
		KVTokensFree: 4096, QueueDepth: 1,
		Speed:     []SpeedSample{{Model: "stories260k", DType: "f32", Device: "cpu-node-1-0", DecodeTokS: 1000, PrefillTokS: 5000}},
		Signature: "c2ln",
	}
}

const sha = "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"

func sampleUsage() UsageEvent {
	return UsageEvent{
		ID: "req-1-node-1-0", Request: "req-1", Customer: "acme", Supplier: "gpu-co", Node: "node-1", Model: "stories260k",
		Fragment: "layers[0,5)+embed+head", PromptTokens: 12, GeneratedTokens: 30, LayerTokens: 210, Messages: 31, FLOPs: 123456,
		DeviceType: "cpu", ComputeUS: 4200, Start: t0, End: t0.Add(time.Second), PublicKey: pub,
		Batch: UsageBatch{Root: "K11KTQu6jD4PHi8LLhwfbi5uDAoNO4ycnWoeX4pLfA0=", Size: 2, Index: 1,
			Proof: []string{"K11KTQu6jD4PHi8LLhwfbi5uDAoNO4ycnWoeX4pLfA0="}, Signature: "c2lnbmF0dXJl"},
	}
}

// Every JSON message type, encoded, validates against its schema.
func TestEveryTypeValidatesAgainstItsSchema(t *testing.T) {
	set, err := schemas.Compile()
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]any{
		SchemaHeartbeat:       sampleHeartbeat(),
		SchemaNodeRecord:      NodeRecord{Heartbeat: sampleHeartbeat(), State: NodeReady, JoinedAt: t0, LastSeen: t0},
		SchemaMembershipEvent: MembershipEvent{ID: "e1", Node: "node-1", Kind: MemberJoined, Time: t0},
		SchemaModelManifest: ModelManifest{
			ID: "stories260k", Family: "llama", DType: "f32",
			Config:          ModelConfig{Dim: 64, HiddenDim: 172, Layers: 5, Heads: 8, KVHeads: 4, Vocab: 512, SeqLen: 512, SharedClassifier: true},
			TokenizerObject: "sha256/" + sha, TokenizerSHA256: sha,
			Fragments:        []FragmentRef{{ID: "layer.0", Kind: "layer", Layer: 0, Expert: -1, Object: "sha256/" + sha, SHA256: sha, Bytes: 100}},
			LayerWeightBytes: 100, KVBytesPerToken: 256, KVBytesPerTokenModel: 1280, LayerBytes: []int64{100, 100, 100, 100, 100},
			ExpertLayout:  &ExpertLayout{Groups: 1, TopK: 1, GroupBytes: 60, SharedBytes: 40},
			FLOPsPerToken: 1000, TotalBytes: 1000, Created: t0,
		},
		SchemaFragmentManifest: FragmentManifest{Model: "stories260k", Fragment: "layer.0.expert.1", Kind: "expert", Layer: 0, Expert: 1, DType: "q8_0",
			Tensors: []TensorInfo{{Name: "w1", Shape: []int{172, 64}, DType: "q8_0", Offset: 0, Bytes: 11696}}, SHA256: sha, Bytes: 11696},
		SchemaPlan: Plan{Model: "stories260k", Version: 3, Strategy: "tessera", Layers: 5,
			Assignments:    []Assignment{{Node: "a", First: 0, End: 2, Embed: true}, {Node: "b", First: 2, End: 5, Head: true}},
			Stages:         []Stage{{First: 0, End: 2, Replicas: []string{"a"}}, {First: 2, End: 5, Replicas: []string{"b"}}},
			ThroughputTokS: 100, Created: t0},
		SchemaPlanEvent:     PlanEvent{Model: "stories260k", Version: 3, Reason: "node left", Nodes: 2, Time: t0},
		SchemaDeadLetter:    DeadLetter{Service: "settlement", Subject: "tessera.usage.node.a", Reason: "bad_signature", Error: "x", Time: t0, Data: []byte("{}"), Headers: map[string][]string{"Nats-Msg-Id": {"1"}}},
		SchemaControl:       Control{Op: "release", Request: "r1"},
		SchemaUsageEvent:    sampleUsage(),
		SchemaCustomerUsage: CustomerUsage{Event: sampleUsage(), Seq: 7, PriceVersion: 3, ChargeMicros: 1234, SettledAt: t0},
		SchemaNodeQuery:     NodeQuery{Model: "stories260k", Region: "eu-west", State: NodeQuarantined},
		SchemaNodeList:      NodeList{Nodes: []NodeRecord{{Heartbeat: sampleHeartbeat(), State: NodeQuarantined, JoinedAt: t0, LastSeen: t0, QuarantineReason: "wrong output"}}},
		SchemaRegistryStats: RegistryStats{Nodes: 1, ByState: map[string]int{NodeReady: 1}, HeartbeatsReceived: 10, HeartbeatsAccepted: 8,
			Rejected: map[string]uint64{"bad_signature": 2}, RecordWrites: 3, ChallengesPassed: 1},
		SchemaCompletionRequest: CompletionRequest{Model: "stories260k", Prompt: "Once upon a time", MaxTokens: ptr(60),
			Temperature: ptr(0.0), TopP: ptr(0.9), Seed: ptr(int64(42)), Stop: Stop{"\n"}, N: ptr(1)},
		SchemaChatRequest: ChatCompletionRequest{Model: "stories260k", Messages: []ChatMessage{{Role: "user", Content: "hi"}}, MaxTokens: ptr(10)},
		SchemaCompletionResponse: CompletionResponse{ID: "cmpl-1", Object: "text_completion", Created: 1, Model: "stories260k",
			Choices: []CompletionChoice{{Index: 0, Text: "x", FinishReason: ptr("length")}}, Usage: &Usage{PromptTokens: 5, CompletionTokens: 1, TotalTokens: 6}, Tokens: []int{1}},
		SchemaErrorResponse: ErrorResponse{Error: ErrorBody{Message: "unknown model", Type: "invalid_request_error", Code: ptr("model_not_found")}},
	}
	seen := map[string]bool{}
	for name, v := range cases {
		seen[name] = true
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if err := set.Validate(name, b); err != nil {
			t.Errorf("%T does not match schema %s: %v\n%s", v, name, err, b)
		}
	}
	for _, n := range schemas.Names() {
		if !seen[n] {
			t.Errorf("schema %s has no Go type in this test", n)
		}
	}
}

// Documents that break a schema are rejected, with an error naming the field.
func TestInvalidDocumentsAreRejected(t *testing.T) {
	set, err := schemas.Compile()
	if err != nil {
		t.Fatal(err)
	}
	hb, _ := json.Marshal(sampleHeartbeat())
	ub, _ := json.Marshal(sampleUsage())
	usage := string(ub)
	cases := []struct {
		schema, doc, want string
	}{
		{SchemaHeartbeat, strings.Replace(string(hb), `"node":"node-1"`, `"node":"a.b"`, 1), "node"},
		{SchemaHeartbeat, strings.Replace(string(hb), `"state":"ready"`, `"state":"sleepy"`, 1), "state"},
		{SchemaHeartbeat, strings.Replace(string(hb), `"seq":7,`, ``, 1), "seq"},
		{SchemaHeartbeat, strings.Replace(string(hb), `"seq":7`, `"seq":7,"extra":1`, 1), "extra"},
		{SchemaHeartbeat, strings.Replace(string(hb), `"time":"2026-11-22T10:00:00Z"`, `"time":"yesterday"`, 1), "time"},
		{SchemaCompletionRequest, `{"model":"m","prompt":""}`, "prompt"},
		{SchemaCompletionRequest, `{"model":"m","prompt":"x","max_tokens":0}`, "max_tokens"},
		{SchemaCompletionRequest, `{"model":"m","prompt":"x","n":2}`, "n"},
		{SchemaCompletionRequest, `{"prompt":"x"}`, "model"},
		{SchemaPlan, `{"model":"m","version":1,"strategy":"s","layers":0,"assignments":[],"stages":[],"throughput_tok_s":0,"created":"2026-11-22T10:00:00Z"}`, "layers"},
		{SchemaDeadLetter, `{"service":"s","subject":"x","reason":"a b","error":"e","time":"2026-11-22T10:00:00Z","data":null}`, "reason"},
		{SchemaControl, `{"op":"explode"}`, "op"},
		{SchemaUsageEvent, strings.Replace(usage, `"customer":"acme"`, `"customer":"a.b"`, 1), "customer"},
		{SchemaUsageEvent, strings.Replace(usage, `"prompt_tokens":12`, `"prompt_tokens":-1`, 1), "prompt_tokens"},
		{SchemaUsageEvent, strings.Replace(usage, `"size":2`, `"size":0`, 1), "size"},
		{SchemaUsageEvent, strings.Replace(usage, `"device_type":"cpu"`, `"device_type":"gpu\n"`, 1), "device_type"},
		{SchemaUsageEvent, strings.Replace(usage, `"signature":"c2lnbmF0dXJl"`, `"signature":""`, 1), "signature"},
		{SchemaErrorResponse, `{"error":{"message":"","type":"x","param":null,"code":null}}`, "message"},
	}
	for _, tc := range cases {
		err := set.Validate(tc.schema, []byte(tc.doc))
		if err == nil {
			t.Errorf("%s accepted %s", tc.schema, tc.doc)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %q does not name %q", tc.schema, err, tc.want)
		}
	}
}

func TestDecodeRejectsUnknownAndTrailing(t *testing.T) {
	var c Control
	if err := Decode([]byte(`{"op":"release","x":1}`), &c); err == nil {
		t.Fatal("unknown field accepted")
	}
	if err := Decode([]byte(`{"op":"release"} {}`), &c); err == nil {
		t.Fatal("trailing data accepted")
	}
	if err := Decode([]byte(`{"op":"release","request":"r"}`), &c); err != nil || c.Request != "r" {
		t.Fatalf("%v %+v", err, c)
	}
}

func TestFrameRoundTripAndErrors(t *testing.T) {
	v := []float32{1, 2, 3, 4, 5, 6}
	b := AppendF32(nil, 2, 3, v)
	f, err := DecodeFrame(b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := f.F32(nil)
	if err != nil || f.Rows != 2 || f.Cols != 3 || len(got) != 6 || got[5] != 6 {
		t.Fatalf("%v %+v %v", err, f, got)
	}
	ti := AppendI32(nil, []int32{1, 403})
	f, err = DecodeFrame(ti)
	if err != nil {
		t.Fatal(err)
	}
	toks, err := f.I32(nil)
	if err != nil || len(toks) != 2 || toks[1] != 403 {
		t.Fatalf("%v %v", err, toks)
	}
	if _, err := f.F32(nil); err == nil {
		t.Fatal("i32 frame read as f32")
	}
	bad := [][]byte{nil, []byte("TSF0" + strings.Repeat("\x00", 12)), b[:len(b)-1], append(append([]byte{}, b...), 0)}
	for i, x := range bad {
		if _, err := DecodeFrame(x); err == nil {
			t.Errorf("bad frame %d accepted", i)
		}
	}
	nan := AppendF32(nil, 1, 1, []float32{float32(nanValue())})
	f, _ = DecodeFrame(nan)
	if _, err := f.F32(nil); err == nil {
		t.Fatal("NaN accepted")
	}
}

func nanValue() float64 { var z float64; return z / z }

func FuzzDecodeFrame(f *testing.F) {
	f.Add(AppendF32(nil, 2, 2, []float32{1, 2, 3, 4}))
	f.Add(AppendI32(nil, []int32{1, 2, 3}))
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := DecodeFrame(b)
		if err != nil {
			return
		}
		if fr.DType == F32 {
			_, _ = fr.F32(nil)
		} else {
			_, _ = fr.I32(nil)
		}
	})
}
