package registry_test

// These tests run the registry with real executors (and the real planner)
// over one embedded NATS server, on the demo model.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor"
	"github.com/tessera-grid/tessera/services/planner"
	"github.com/tessera-grid/tessera/services/registry"
)

const execInterval = 400 * time.Millisecond

// importModel imports the demo model into the grid.
func importModel(t *testing.T, c *bus.Conn) wire.ModelManifest {
	t.Helper()
	ck, tok, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	st, err := fragstore.Open(ctx, c.JS)
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.ImportCheckpoint(ctx, testmodel.ID, ck, tok, nil)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// runningExecutor is an executor started by a test.
type runningExecutor struct {
	id     string
	conn   *bus.Conn
	cancel context.CancelFunc
	done   chan error
	// lastBeat is when the test last saw one of its heartbeats.
	mu       sync.Mutex
	lastBeat time.Time
}

func startExecutor(t *testing.T, g *grid, id string, cfg executor.Config, deps executor.Deps) *runningExecutor {
	t.Helper()
	cfg.NodeID = id
	cfg.StateDir = t.TempDir()
	cfg.HeartbeatInterval = execInterval
	cfg.CPUDevices = 2
	cfg.Threads = 1
	cfg.SpeedTest = 20 * time.Millisecond
	e := &runningExecutor{id: id, conn: bustest.Connect(t, g.srv, id), done: make(chan error, 1)}
	sub, err := g.client.NC.Subscribe(subjects.Heartbeat(id), func(*nats.Msg) {
		e.mu.Lock()
		e.lastBeat = time.Now()
		e.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	deps.Bus = e.conn
	go func() { e.done <- executor.Run(ctx, cfg, deps) }()
	t.Cleanup(func() {
		cancel()
		<-e.done
	})
	return e
}

func (e *runningExecutor) lastSeen() time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.lastBeat
}

// waitRecord polls the registry until id's record satisfies ok.
func waitRecord(t *testing.T, g *grid, id string, what string, ok func(wire.NodeRecord) bool) wire.NodeRecord {
	t.Helper()
	var rec wire.NodeRecord
	bustest.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		var err error
		if rec, err = g.reg.Node(id); err != nil {
			return err
		}
		if !ok(rec) {
			return fmt.Errorf("node %s: want %s, have state %s, fragments %v", id, what, rec.State, rec.Heartbeat.Fragments)
		}
		return nil
	})
	return rec
}

func TestExecutorJoinsWithCPUDevicesAndLeavesWhenKilled(t *testing.T) {
	g := startRegistry(t, registry.Config{})
	importModel(t, g.client)
	e := startExecutor(t, g, "exec-k", executor.Config{}, executor.Deps{})
	rec := waitRecord(t, g, "exec-k", "ready with speeds", func(r wire.NodeRecord) bool {
		return r.State == wire.NodeReady && len(r.Heartbeat.Speed) == 2
	})
	if len(rec.Heartbeat.Devices) != 2 || rec.Heartbeat.Devices[0].Kind != "cpu" || rec.Heartbeat.MemoryBudget == 0 {
		t.Errorf("devices %+v, budget %d: want two CPU devices with memory", rec.Heartbeat.Devices, rec.Heartbeat.MemoryBudget)
	}
	for _, s := range rec.Heartbeat.Speed {
		if s.Model != testmodel.ID || s.DType != "f32" || s.DecodeTokS <= 0 || s.PrefillTokS <= 0 {
			t.Errorf("speed sample %+v", s)
		}
	}
	// Kill it: the connection closes at once, as if the process died.
	e.conn.NC.Close()
	died := time.Now()
	e.cancel()
	g.events.wait(t, "exec-k", wire.MemberJoined, wire.MemberLeft)
	left, _ := g.events.last("exec-k", wire.MemberLeft)
	last := e.lastSeen()
	if last.After(died) {
		t.Fatalf("heartbeat seen after the kill")
	}
	if silent := left.Time.Sub(last); silent > 3*execInterval {
		t.Errorf("left %s after the last heartbeat, want within three intervals (%s)", silent, 3*execInterval)
	}
}

// stageCall sends tokens at pos through all layers of the demo model on
// node, as the router does, and returns the logits' argmax or the error.
func stageCall(nc *nats.Conn, node, request string, pos int, tokens []int, layers int) (int, error) {
	msg := nats.NewMsg(subjects.Stage(node))
	msg.Header.Set(wire.HdrRequest, request)
	msg.Header.Set(wire.HdrModel, testmodel.ID)
	msg.Header.Set(wire.HdrCustomer, "cust")
	msg.Header.Set(wire.HdrPos, strconv.Itoa(pos))
	msg.Header.Set(wire.HdrRange, fmt.Sprintf("0:%d", layers))
	msg.Header.Set(wire.HdrPhase, map[bool]string{true: "prefill", false: "decode"}[pos == 0])
	in := make([]int32, len(tokens))
	for i, tk := range tokens {
		in[i] = int32(tk)
	}
	msg.Data = wire.AppendI32(nil, in)
	reply, err := nc.RequestMsg(msg, 10*time.Second)
	if err != nil {
		return 0, err
	}
	if e := reply.Header.Get(wire.HdrError); e != "" {
		return 0, errors.New(e)
	}
	f, err := wire.DecodeFrame(reply.Data)
	if err != nil {
		return 0, err
	}
	logits, err := f.F32(nil)
	if err != nil {
		return 0, err
	}
	best := 0
	for i, v := range logits {
		if v > logits[best] {
			best = i
		}
	}
	return best, nil
}

// assignAll publishes a plan that puts every layer of m on node.
func assignAll(t *testing.T, c *bus.Conn, m wire.ModelManifest, node string) {
	t.Helper()
	L := m.Config.Layers
	p := wire.Plan{Model: m.ID, Strategy: "test", Layers: L, Created: time.Now().UTC(),
		Assignments: []wire.Assignment{{Node: node, First: 0, End: L, Embed: true, Head: true}},
		Stages:      []wire.Stage{{First: 0, End: L, Replicas: []string{node}}}}
	b, _ := json.Marshal(p)
	kv, err := c.JS.KeyValue(context.Background(), subjects.BucketPlans)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), m.ID, b); err != nil {
		t.Fatal(err)
	}
}

func holdsAll(m wire.ModelManifest) func(wire.NodeRecord) bool {
	return func(r wire.NodeRecord) bool {
		return r.State == wire.NodeReady && len(r.Heartbeat.Fragments) == m.Config.Layers+2
	}
}

func TestDrainFinishesInFlightRequest(t *testing.T) {
	// Liveness is not under test here (MissedBeats is generous): the only
	// way to leave is the drain's last heartbeat.
	g := startRegistry(t, registry.Config{MissedBeats: 8})
	m := importModel(t, g.client)
	e := startExecutor(t, g, "exec-d", executor.Config{DrainIdle: time.Minute, DrainTimeout: time.Minute}, executor.Deps{})
	assignAll(t, g.client, m, "exec-d")
	waitRecord(t, g, "exec-d", "all fragments", holdsAll(m))

	// A generation is under way when the node is told to stop.
	const req = "req-drain"
	seq := append([]int(nil), testmodel.PromptIDs...)
	next, err := stageCall(g.client.NC, "exec-d", req, 0, seq, m.Config.Layers)
	if err != nil {
		t.Fatal(err)
	}
	seq = append(seq, next)
	e.cancel() // SIGTERM
	waitRecord(t, g, "exec-d", "draining", func(r wire.NodeRecord) bool { return r.State == wire.NodeDraining })
	g.events.wait(t, "exec-d", wire.MemberJoined, wire.MemberDraining)

	// New requests are refused; the one in flight goes on to its end.
	if _, err := stageCall(g.client.NC, "exec-d", "req-new", 0, testmodel.PromptIDs, m.Config.Layers); err == nil || !strings.HasPrefix(err.Error(), wire.ErrCodeDraining) {
		t.Errorf("new request on a draining node: %v, want %s", err, wire.ErrCodeDraining)
	}
	for len(seq) < len(testmodel.PromptIDs)+20 {
		next, err := stageCall(g.client.NC, "exec-d", req, len(seq)-1, seq[len(seq)-1:], m.Config.Layers)
		if err != nil {
			t.Fatalf("step %d of the request in flight: %v", len(seq), err)
		}
		seq = append(seq, next)
	}
	if got, want := seq[len(testmodel.PromptIDs):], testmodel.GreedyIDs[:20]; !slices.Equal(got, want) {
		t.Errorf("generation across the drain: %v, want %v", got, want)
	}
	select {
	case err := <-e.done:
		t.Fatalf("executor stopped before its request finished: %v", err)
	default:
	}
	// The router ends the request: the node stops and leaves at once.
	if err := g.client.NC.Publish(subjects.SessionRelease, []byte(`{"op":"release","request":"`+req+`"}`)); err != nil {
		t.Fatal(err)
	}
	g.events.wait(t, "exec-d", wire.MemberJoined, wire.MemberDraining, wire.MemberLeft)
	if ev, _ := g.events.last("exec-d", wire.MemberLeft); ev.Reason != "stopped" {
		t.Errorf("left reason %q, want stopped", ev.Reason)
	}
	// Its usage was published on the way out.
	us, err := g.client.JS.Stream(context.Background(), subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	um, err := us.GetLastMsgForSubject(context.Background(), subjects.UsageNode("exec-d"))
	if err != nil {
		t.Fatalf("no usage of the drained request: %v", err)
	}
	var u wire.UsageEvent
	// The prompt's pass yields the first token, 19 decode steps the rest:
	// 20 generated tokens billed.
	if err := json.Unmarshal(um.Data, &u); err != nil || u.Request != req || u.PromptTokens != 5 || u.GeneratedTokens != 20 {
		t.Errorf("usage %+v (%v), want request %s with 5 prompt and 20 generated tokens", u, err, req)
	}
}

func TestWrongChallengeAnswerQuarantinesUntilItPasses(t *testing.T) {
	g := startRegistry(t, registry.Config{MissedBeats: 8, ChallengeEvery: time.Hour, ChallengeRetry: time.Second, ChallengeSlack: 5 * time.Second})
	m := importModel(t, g.client)
	pctx, stopPlanner := context.WithCancel(context.Background())
	pdone := make(chan error, 1)
	go func() {
		pdone <- planner.Run(pctx, planner.Config{Settle: 300 * time.Millisecond}, planner.Deps{Bus: bustest.Connect(t, g.srv, "planner")})
	}()
	t.Cleanup(func() {
		stopPlanner()
		<-pdone
	})
	startExecutor(t, g, "exec-good", executor.Config{}, executor.Deps{})
	var honest atomic.Bool
	startExecutor(t, g, "exec-bad", executor.Config{}, executor.Deps{TamperChallenge: func(out []float32) {
		if !honest.Load() {
			out[0] += 1
		}
	}})

	g.events.wait(t, "exec-bad", wire.MemberJoined, wire.MemberQuarantined)
	rec := waitRecord(t, g, "exec-bad", "quarantined", func(r wire.NodeRecord) bool { return r.State == wire.NodeQuarantined })
	if !strings.Contains(rec.QuarantineReason, "wrong output") {
		t.Errorf("quarantine reason %q, want wrong output", rec.QuarantineReason)
	}
	// The next plan leaves it out; the honest node carries the model.
	plans, err := g.client.JS.KeyValue(context.Background(), subjects.BucketPlans)
	if err != nil {
		t.Fatal(err)
	}
	planNodes := func(want ...string) func() error {
		return func() error {
			e, err := plans.Get(context.Background(), m.ID)
			if err != nil {
				return err
			}
			var p wire.Plan
			if err := json.Unmarshal(e.Value(), &p); err != nil {
				return err
			}
			var got []string
			for _, a := range p.Assignments {
				got = append(got, a.Node)
			}
			slices.Sort(got)
			if !slices.Equal(got, want) {
				return fmt.Errorf("plan %d assigns %+v, want the layers on %v", e.Revision(), p.Assignments, want)
			}
			return nil
		}
	}
	bustest.CheckFor(t, 20*time.Second, 50*time.Millisecond, planNodes("exec-good"))
	// The honest node passes its challenge and stays in.
	bustest.CheckFor(t, 20*time.Second, 50*time.Millisecond, func() error {
		if s := g.reg.Stats(); s.ChallengesPassed == 0 {
			return fmt.Errorf("no challenge passed: %+v", s)
		}
		return nil
	})
	if kinds := g.events.kinds("exec-good"); slices.Contains(kinds, wire.MemberQuarantined) {
		t.Errorf("the honest node was quarantined: %v", kinds)
	}
	// The quarantine is in KV nodes too, where the planner and router read it.
	defer func() {
		// Once it answers correctly it is restored and planned again.
		honest.Store(true)
		g.events.wait(t, "exec-bad", wire.MemberJoined, wire.MemberQuarantined, wire.MemberRestored)
		bustest.CheckFor(t, 20*time.Second, 50*time.Millisecond, planNodes("exec-bad", "exec-good"))
	}()
	kv, _ := g.client.JS.KeyValue(context.Background(), subjects.BucketNodes)
	bustest.CheckFor(t, 5*time.Second, 50*time.Millisecond, func() error {
		r, err := nodeRecord(context.Background(), kv, "exec-bad")
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return err
		}
		if r.State != wire.NodeQuarantined {
			return fmt.Errorf("KV record state %q", r.State)
		}
		return nil
	})
}
