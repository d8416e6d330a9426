package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/node"
	"github.com/tessera-grid/tessera/services/executor/internal/nodetest"
)

// A node assigned two of a mixture's four experts loads only those,
// computes expert requests for them (the weighted sum of each row's
// experts), refuses the others and malformed requests, and bills the
// experts it applied when the request ends.
func TestExpertRequests(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := wire.ModelConfig{Dim: 32, HiddenDim: 64, Layers: 2, Heads: 4, KVHeads: 2, Vocab: 300, SeqLen: 32, SharedClassifier: true, Experts: 4, TopK: 2}
	ck, err := model.Synthesize(cfg, 3)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := model.SynthesizeTokenizer(cfg.Vocab, 3)
	if err != nil {
		t.Fatal(err)
	}
	s := bustest.Server(t)
	c := bustest.Connect(t, s, "admin")
	st, err := fragstore.Open(ctx, c.JS)
	if err != nil {
		t.Fatal(err)
	}
	blobs, man, err := model.Fragments("moe", ck, tok, model.FragmentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Import(ctx, blobs, tok, man, nil); err != nil {
		t.Fatal(err)
	}
	plan := nodetest.Plan("moe", cfg.Layers, []nodetest.Hop{{Node: "x", First: 0, End: cfg.Layers}})
	plan.Assignments[0].Experts = []int{0, 1}
	if err := nodetest.PutPlan(ctx, c, plan); err != nil {
		t.Fatal(err)
	}
	n := nodetest.Start(t, s, node.Options{ID: "x", Supplier: "acme", Threads: 1}, nil)
	bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		st := n.Status()
		for l := 0; l < cfg.Layers; l++ {
			for e := 0; e < cfg.Experts; e++ {
				f := "moe/" + model.ExpertFragment(l, e)
				if slices.Contains(st.Fragments, f) != (e < 2) {
					return fmt.Errorf("node holds %v: want experts 0 and 1 of every layer", st.Fragments)
				}
			}
		}
		return nil
	})
	ask := func(op func(*nats.Msg)) *nats.Msg {
		t.Helper()
		m := nats.NewMsg(subjects.Expert("x"))
		for k, v := range map[string]string{wire.HdrRequest: "r1", wire.HdrModel: "moe", wire.HdrCustomer: "c", wire.HdrPhase: wire.PhaseDecode, wire.HdrLayer: "1"} {
			m.Header.Set(k, v)
		}
		op(m)
		reply, err := c.NC.RequestMsgWithContext(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return reply
	}
	// Two rows: the first uses experts 0 and 1, the second expert 1 only.
	x := make([]float32, 2*cfg.Dim)
	for i := range x {
		x[i] = float32(i%7) / 7
	}
	rt := wire.Routed{Rows: 2, Dim: cfg.Dim, K: 2, X: x, Experts: []int32{0, 1, 1, -1}, Weights: []float32{0.75, 0.25, 1, 0}}
	reply := ask(func(m *nats.Msg) { m.Data = wire.AppendRouted(nil, rt) })
	if e := reply.Header.Get(wire.HdrError); e != "" {
		t.Fatal(e)
	}
	f, err := wire.DecodeFrame(reply.Data)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := f.F32(nil)
	layer := compute.LayerFromCheckpoint(ck, 1)
	ws := compute.NewWorkspace(nil)
	want := make([]float32, 2*cfg.Dim)
	out := make([]float32, cfg.Dim)
	for i, e := range rt.Experts {
		if e < 0 {
			continue
		}
		row := i / rt.K
		if err := layer.Experts[e].Apply(ws, x[row*cfg.Dim:(row+1)*cfg.Dim], 1, rt.Weights[i:i+1], out); err != nil {
			t.Fatal(err)
		}
		for c, v := range out {
			want[row*cfg.Dim+c] += v
		}
	}
	for i := range want {
		if d := got[i] - want[i]; d > 1e-5 || d < -1e-5 {
			t.Fatalf("value %d: %g, want %g", i, got[i], want[i])
		}
	}
	for _, tc := range []struct {
		name, code string
		op         func(*nats.Msg)
	}{
		{"expert held elsewhere", wire.ErrCodeNotLoaded, func(m *nats.Msg) {
			m.Data = wire.AppendRouted(nil, wire.Routed{Rows: 1, Dim: cfg.Dim, K: 1, X: x[:cfg.Dim], Experts: []int32{3}, Weights: []float32{1}})
		}},
		{"malformed payload", wire.ErrCodeBadRequest, func(m *nats.Msg) { m.Data = wire.AppendF32(nil, 1, cfg.Dim, x[:cfg.Dim]) }},
		{"layer outside the model", wire.ErrCodeBadRequest, func(m *nats.Msg) {
			m.Header.Set(wire.HdrLayer, strconv.Itoa(cfg.Layers))
			m.Data = wire.AppendRouted(nil, rt)
		}},
		{"whole layer without its experts", wire.ErrCodeNotLoaded, func(m *nats.Msg) {
			m.Subject = subjects.Stage("x")
			m.Header.Set(wire.HdrPos, "0")
			m.Header.Set(wire.HdrRange, "0:2")
			m.Data = wire.AppendI32(nil, []int32{1, 2})
		}},
		{"resume of no paused pass", wire.ErrCodeKVMiss, func(m *nats.Msg) {
			m.Subject = subjects.Stage("x")
			m.Header.Set(wire.HdrPos, "0")
			m.Header.Set(wire.HdrRange, "0:2")
			m.Header.Set(wire.HdrSplit, "0,1")
			m.Header.Set(wire.HdrOp, wire.OpResume)
			m.Header.Set(wire.HdrLayer, "0")
			m.Data = wire.AppendF32(nil, 1, cfg.Dim, x[:cfg.Dim])
		}},
	} {
		if e := ask(tc.op).Header.Get(wire.HdrError); !strings.HasPrefix(e, tc.code+":") {
			t.Errorf("%s: error %q, want code %s", tc.name, e, tc.code)
		}
	}
	// The request ends: its expert usage is one message and three experts
	// applied to one row each.
	if err := c.NC.Publish(subjects.SessionRelease, []byte(`{"op":"release","request":"r1"}`)); err != nil {
		t.Fatal(err)
	}
	usage, err := c.JS.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	var u wire.UsageEvent
	bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		info, err := usage.Info(ctx)
		if err != nil {
			return err
		}
		for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
			m, err := usage.GetMsg(ctx, seq)
			if err != nil {
				return err
			}
			if err := json.Unmarshal(m.Data, &u); err == nil && u.Request == "r1" && strings.HasPrefix(u.Fragment, "experts") {
				return nil
			}
		}
		return fmt.Errorf("no expert usage of r1 among %d events", info.State.Msgs)
	})
	if info, _ := usage.Info(ctx); info.State.Msgs != 1 {
		t.Errorf("%d usage events: a request refused at every stage message opens no stage session", info.State.Msgs)
	}
	if flops := int64(3 * 6 * cfg.Dim * cfg.HiddenDim); !strings.HasPrefix(u.Fragment, "experts") || u.Messages != 1 || u.FLOPs != flops || u.GeneratedTokens != 0 {
		t.Fatalf("usage %+v: want experts, 1 message, %d FLOPs, no tokens", u, flops)
	}
}
