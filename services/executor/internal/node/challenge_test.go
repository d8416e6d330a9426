package node

import (
	"context"
	"log/slog"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

func TestChallengeAnswers(t *testing.T) {
	s := bustest.Server(t)
	admin := bustest.Connect(t, s, "admin")
	ckPath, tokPath, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	st, err := fragstore.Open(ctx, admin.JS)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.ImportCheckpoint(ctx, testmodel.ID, ckPath, tokPath, nil); err != nil {
		t.Fatal(err)
	}
	ck, err := model.LoadCheckpoint(ckPath)
	if err != nil {
		t.Fatal(err)
	}
	n, err := New(Options{ID: "n1", Threads: 1}, bustest.Connect(t, s, "n1"), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	cfg := ck.Config
	rows := 3
	input := make([]float32, rows*cfg.Dim)
	for i := range input {
		input[i] = float32(math.Sin(float64(i)))
	}
	pool := compute.NewPool(1)
	defer pool.Close()
	want, err := compute.ForwardLayers(cfg, 2, []*compute.Layer{compute.LayerFromCheckpoint(ck, 2), compute.LayerFromCheckpoint(ck, 3)}, input, rows, pool)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(model, rng string, data []byte) *nats.Msg {
		t.Helper()
		m := nats.NewMsg(subjects.Challenge("n1"))
		m.Header.Set(wire.HdrRequest, "chal-1")
		m.Header.Set(wire.HdrModel, model)
		m.Header.Set(wire.HdrRange, rng)
		m.Data = data
		var reply *nats.Msg
		bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
			var err error
			reply, err = admin.NC.RequestMsg(m, 5*time.Second)
			return err
		})
		return reply
	}
	frame := wire.AppendF32(nil, rows, cfg.Dim, input)
	// The node holds nothing: it fetches layers 2 and 3 to answer.
	reply := ask(testmodel.ID, "2:4", frame)
	if e := reply.Header.Get(wire.HdrError); e != "" {
		t.Fatalf("challenge answered with an error: %s", e)
	}
	f, err := wire.DecodeFrame(reply.Data)
	if err != nil {
		t.Fatal(err)
	}
	got, err := f.F32(nil)
	if err != nil || f.Rows != rows || f.Cols != cfg.Dim {
		t.Fatalf("answer %d×%d (%v)", f.Rows, f.Cols, err)
	}
	for i := range want {
		if math.Abs(float64(got[i]-want[i])) > 1e-5 {
			t.Fatalf("answer[%d] = %g, want %g", i, got[i], want[i])
		}
	}
	if reply.Header.Get(wire.HdrComputeUS) == "" || reply.Header.Get(wire.HdrNode) != "n1" {
		t.Errorf("answer headers %v", reply.Header)
	}
	for _, tt := range []struct {
		name, model, rng string
		data             []byte
		code             string
	}{
		{"unknown model", "nope", "0:1", frame, wire.ErrCodeNotLoaded},
		{"range beyond the model", testmodel.ID, "4:9", frame, wire.ErrCodeBadRequest},
		{"malformed range", testmodel.ID, "3", frame, wire.ErrCodeBadRequest},
		{"wrong width", testmodel.ID, "0:1", wire.AppendF32(nil, 1, 3, []float32{1, 2, 3}), wire.ErrCodeBadRequest},
		{"not a frame", testmodel.ID, "0:1", []byte("hello"), wire.ErrCodeBadRequest},
	} {
		t.Run(tt.name, func(t *testing.T) {
			reply := ask(tt.model, tt.rng, tt.data)
			if e := reply.Header.Get(wire.HdrError); !strings.HasPrefix(e, tt.code+":") {
				t.Errorf("error %q, want code %s", e, tt.code)
			}
		})
	}
}

func TestWaitIdle(t *testing.T) {
	n := &Node{opts: Options{ID: "n"}, sessions: map[sessionKey]*session{}}
	n.sessions[sessionKey{request: "r"}] = &session{last: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := n.WaitIdle(ctx, time.Hour); err == nil {
		t.Fatalf("a node with a fresh session is idle")
	}
	// A session without traffic for longer than idle no longer counts.
	if err := n.WaitIdle(context.Background(), time.Nanosecond); err != nil {
		t.Fatalf("wait for an abandoned session: %v", err)
	}
	n.mu.Lock()
	delete(n.sessions, sessionKey{request: "r"})
	n.mu.Unlock()
	if err := n.WaitIdle(context.Background(), time.Hour); err != nil {
		t.Fatalf("idle node: %v", err)
	}
}
