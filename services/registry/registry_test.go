package registry_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/nodesig"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/registry"
)

// interval is the fake nodes' heartbeat interval: short, yet long enough
// that a loaded machine running the tests with -race does not miss beats.
const interval = 300 * time.Millisecond

// grid is a NATS server with a running registry.
type grid struct {
	srv    *server.Server
	client *bus.Conn
	reg    *registry.Registry
	http   string
	events *events
}

func startRegistry(t *testing.T, cfg registry.Config) *grid {
	t.Helper()
	s := bustest.Server(t)
	g := &grid{srv: s, client: bustest.Connect(t, s, "test")}
	g.events = watchEvents(t, g.client)
	g.reg, g.http, _ = runRegistry(t, s, cfg)
	return g
}

// runRegistry runs a registry on s until the test ends or stop is called.
func runRegistry(t *testing.T, s *server.Server, cfg registry.Config) (reg *registry.Registry, httpAddr string, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addr := make(chan string, 1)
	reg, err := registry.New(ctx, cfg, registry.Deps{Bus: bustest.Connect(t, s, "registry"), Listening: func(a string) { addr <- a }})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- reg.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("registry: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	if cfg.HTTPAddr != "" {
		httpAddr = <-addr
	}
	// The service answers once the registry runs.
	client := bustest.Connect(t, s, "probe")
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		_, err := client.NC.Request(subjects.RegistryStats, nil, time.Second)
		return err
	})
	return reg, httpAddr, stop
}

// events collects membership events as they are published.
type events struct {
	mu  sync.Mutex
	evs []wire.MembershipEvent
}

func watchEvents(t *testing.T, c *bus.Conn) *events {
	t.Helper()
	ev := &events{}
	sub, err := c.NC.Subscribe(subjects.MembershipAll, func(m *nats.Msg) {
		var e wire.MembershipEvent
		if err := json.Unmarshal(m.Data, &e); err != nil {
			t.Errorf("membership event: %v", err)
			return
		}
		ev.mu.Lock()
		ev.evs = append(ev.evs, e)
		ev.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return ev
}

// kinds lists the kinds of node's events in order.
func (ev *events) kinds(node string) []string {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	var out []string
	for _, e := range ev.evs {
		if e.Node == node {
			out = append(out, e.Kind)
		}
	}
	return out
}

func (ev *events) last(node, kind string) (wire.MembershipEvent, bool) {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	for i := len(ev.evs) - 1; i >= 0; i-- {
		if e := ev.evs[i]; e.Node == node && e.Kind == kind {
			return e, true
		}
	}
	return wire.MembershipEvent{}, false
}

func (ev *events) wait(t *testing.T, node string, want ...string) {
	t.Helper()
	bustest.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if got := ev.kinds(node); !slices.Equal(got, want) {
			return fmt.Errorf("events of %s: %v, want %v", node, got, want)
		}
		return nil
	})
}

// fakeNode publishes signed heartbeats the way an executor does.
type fakeNode struct {
	kp  nkeys.KeyPair
	pub string
	hb  wire.Heartbeat
}

func newFakeNode(t *testing.T, id string) *fakeNode {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	return &fakeNode{kp: kp, pub: pub, hb: wire.Heartbeat{
		Node: id, Supplier: "acme", Region: "eu-west", IntervalMS: interval.Milliseconds(), State: wire.NodeReady,
		Devices:      []wire.Device{{Index: 0, Kind: "cpu", Name: "cpu", UUID: "cpu-" + id + "-0", MemoryTotal: 1 << 30, MemoryFree: 1 << 30}},
		MemoryBudget: 1 << 30, MemoryFree: 1 << 30, Fragments: []string{},
	}}
}

// next returns the node's next heartbeat, signed, encoded.
func (n *fakeNode) next(t *testing.T) []byte {
	t.Helper()
	n.hb.Seq++
	n.hb.Time = time.Now().UTC()
	n.hb.Signature, n.hb.PublicKey = "", ""
	if err := nodesig.SignHeartbeat(&n.hb, n.pub, n.kp.Sign); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(n.hb)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (n *fakeNode) beat(t *testing.T, nc *nats.Conn) {
	t.Helper()
	if err := nc.Publish(subjects.Heartbeat(n.hb.Node), n.next(t)); err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
}

// beatUntil beats every interval until stop is closed.
func (n *fakeNode) beatUntil(t *testing.T, nc *nats.Conn, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	wg.Go(func() {
		tk := time.NewTicker(interval)
		defer tk.Stop()
		for {
			n.beat(t, nc)
			select {
			case <-stop:
				return
			case <-tk.C:
			}
		}
	})
	return &wg
}

func nodeRecord(ctx context.Context, kv jetstream.KeyValue, id string) (wire.NodeRecord, error) {
	var rec wire.NodeRecord
	e, err := kv.Get(ctx, id)
	if err != nil {
		return rec, err
	}
	return rec, json.Unmarshal(e.Value(), &rec)
}

func TestNodeJoinsAndLeavesWhenSilent(t *testing.T) {
	g := startRegistry(t, registry.Config{})
	ctx := context.Background()
	kv, err := g.client.JS.KeyValue(ctx, subjects.BucketNodes)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.Watch(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	n := newFakeNode(t, "n1")
	stop := make(chan struct{})
	wg := n.beatUntil(t, g.client.NC, stop)
	g.events.wait(t, "n1", wire.MemberJoined)
	rec, err := nodeRecord(ctx, kv, "n1")
	if err != nil {
		t.Fatalf("record of a joined node: %v", err)
	}
	if rec.State != wire.NodeReady || rec.Heartbeat.PublicKey != n.pub {
		t.Errorf("record: state %q key %q, want ready and %s", rec.State, rec.Heartbeat.PublicKey, n.pub)
	}
	// A few more beats, then silence.
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		if s := g.reg.Stats(); s.HeartbeatsAccepted < 5 {
			return fmt.Errorf("%d heartbeats accepted", s.HeartbeatsAccepted)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	lastBeat := time.Now()
	g.events.wait(t, "n1", wire.MemberJoined, wire.MemberLeft)
	left, _ := g.events.last("n1", wire.MemberLeft)
	if silent := left.Time.Sub(lastBeat); silent > 3*interval {
		t.Errorf("left %s after the last heartbeat, want within 3 intervals (%s)", silent, 3*interval)
	}
	if !strings.Contains(left.Reason, "no heartbeat") {
		t.Errorf("left reason %q", left.Reason)
	}
	// Watchers see the record go.
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		if _, err := kv.Get(ctx, "n1"); !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("record still there: %v", err)
		}
		return nil
	})
	sawDelete := false
	for {
		select {
		case e := <-w.Updates():
			if e != nil && e.Operation() != jetstream.KeyValuePut {
				sawDelete = true
			}
			continue
		default:
		}
		break
	}
	if !sawDelete {
		t.Errorf("watcher saw no delete of the record")
	}
}

func TestStoppedNodeLeavesAtOnce(t *testing.T) {
	g := startRegistry(t, registry.Config{MissedBeats: 1000})
	n := newFakeNode(t, "n2")
	n.beat(t, g.client.NC)
	g.events.wait(t, "n2", wire.MemberJoined)
	n.hb.State = wire.NodeDraining
	n.beat(t, g.client.NC)
	g.events.wait(t, "n2", wire.MemberJoined, wire.MemberDraining)
	n.hb.State = wire.NodeStopped
	n.beat(t, g.client.NC)
	// MissedBeats is huge: only the stopped heartbeat can make it leave.
	g.events.wait(t, "n2", wire.MemberJoined, wire.MemberDraining, wire.MemberLeft)
	if e, _ := g.events.last("n2", wire.MemberLeft); e.Reason != "stopped" {
		t.Errorf("left reason %q, want stopped", e.Reason)
	}
	// An old heartbeat of the node, replayed, does not bring it back.
	before := stats(t, g.client.NC).Rejected[registry.RejectReplayed]
	n.hb.Seq, n.hb.State = 1, wire.NodeReady
	old := n.hb.Time.Add(-time.Second)
	n.hb.Time, n.hb.PublicKey, n.hb.Signature = old, "", ""
	if err := nodesig.SignHeartbeat(&n.hb, n.pub, n.kp.Sign); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(n.hb)
	if err := g.client.NC.Publish(subjects.Heartbeat("n2"), b); err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		if got := stats(t, g.client.NC).Rejected[registry.RejectReplayed]; got != before+1 {
			return fmt.Errorf("rejected[replayed] = %d, want %d", got, before+1)
		}
		return nil
	})
	// A restart (new heartbeats, sequence from 1) joins again.
	n.beat(t, g.client.NC)
	g.events.wait(t, "n2", wire.MemberJoined, wire.MemberDraining, wire.MemberLeft, wire.MemberJoined)
}

func stats(t *testing.T, nc *nats.Conn) wire.RegistryStats {
	t.Helper()
	m, err := nc.Request(subjects.RegistryStats, nil, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var s wire.RegistryStats
	if err := wire.Decode(m.Data, &s); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestRejectedHeartbeats(t *testing.T) {
	g := startRegistry(t, registry.Config{MissedBeats: 1000})
	owner := newFakeNode(t, "owned")
	owner.beat(t, g.client.NC)
	g.events.wait(t, "owned", wire.MemberJoined)

	tests := []struct {
		name   string
		reason string
		// msg returns the subject and payload to publish.
		msg func(t *testing.T) (string, []byte)
	}{
		{name: "tampered after signing", reason: registry.RejectSignature, msg: func(t *testing.T) (string, []byte) {
			b := owner.next(t)
			return subjects.Heartbeat("owned"), []byte(strings.Replace(string(b), `"memory_budget_bytes":1073741824`, `"memory_budget_bytes":1099511627776`, 1))
		}},
		{name: "unsigned", reason: registry.RejectSignature, msg: func(t *testing.T) (string, []byte) {
			hb := owner.hb
			hb.Seq += 100
			hb.Signature = ""
			b, _ := json.Marshal(hb)
			return subjects.Heartbeat("owned"), b
		}},
		{name: "node id of another signer", reason: registry.RejectKey, msg: func(t *testing.T) (string, []byte) {
			// Validly signed, by a key the node id is not bound to.
			return subjects.Heartbeat("owned"), newFakeNode(t, "owned").next(t)
		}},
		{name: "published on another node's subject", reason: registry.RejectSubject, msg: func(t *testing.T) (string, []byte) {
			return subjects.Heartbeat("someone-else"), owner.next(t)
		}},
		{name: "unknown state", reason: registry.RejectInvalid, msg: func(t *testing.T) (string, []byte) {
			n := newFakeNode(t, "odd")
			n.hb.State = "sleeping"
			return subjects.Heartbeat("odd"), n.next(t)
		}},
		{name: "not JSON", reason: registry.RejectInvalid, msg: func(t *testing.T) (string, []byte) {
			return subjects.Heartbeat("owned"), []byte("beat")
		}},
		{name: "replayed", reason: registry.RejectReplayed, msg: func(t *testing.T) (string, []byte) {
			b := owner.next(t)
			if err := g.client.NC.Publish(subjects.Heartbeat("owned"), b); err != nil {
				t.Fatal(err)
			}
			return subjects.Heartbeat("owned"), b
		}},
	}
	ctx := context.Background()
	dl, err := g.client.JS.Stream(ctx, subjects.StreamDeadLetter)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := stats(t, g.client.NC).Rejected[tt.reason]
			subject, data := tt.msg(t)
			if err := g.client.NC.Publish(subject, data); err != nil {
				t.Fatal(err)
			}
			bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
				if got := stats(t, g.client.NC).Rejected[tt.reason]; got != before+1 {
					return fmt.Errorf("rejected[%s] = %d, want %d", tt.reason, got, before+1)
				}
				return nil
			})
			m, err := dl.GetLastMsgForSubject(ctx, subjects.DeadLetter("registry", tt.reason))
			if err != nil {
				t.Fatalf("no dead letter for %s: %v", tt.reason, err)
			}
			var d wire.DeadLetter
			if err := json.Unmarshal(m.Data, &d); err != nil || d.Subject != subject || d.Error == "" {
				t.Errorf("dead letter %+v (%v), want the message's subject and an error", d, err)
			}
		})
	}
	// The owner's record still carries its own key and budget.
	rec, err := g.reg.Node("owned")
	if err != nil || rec.Heartbeat.PublicKey != owner.pub || rec.Heartbeat.MemoryBudget != 1<<30 {
		t.Errorf("owner's record changed: %+v, %v", rec.Heartbeat, err)
	}
	if _, ok := g.events.last("odd", wire.MemberJoined); ok {
		t.Errorf("a rejected node joined")
	}
}

func TestQueries(t *testing.T) {
	g := startRegistry(t, registry.Config{MissedBeats: 1000, HTTPAddr: "127.0.0.1:0"})
	a, b := newFakeNode(t, "a"), newFakeNode(t, "b")
	a.hb.Models, a.hb.Fragments = []string{"m1"}, []string{"m1/layer.0"}
	b.hb.Region = "us-east"
	a.beat(t, g.client.NC)
	b.beat(t, g.client.NC)
	g.events.wait(t, "a", wire.MemberJoined)
	g.events.wait(t, "b", wire.MemberJoined)

	list := func(q wire.NodeQuery) []string {
		body, _ := json.Marshal(q)
		m, err := g.client.NC.Request(subjects.RegistryNodesList, body, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var l wire.NodeList
		if err := wire.Decode(m.Data, &l); err != nil {
			t.Fatalf("%s: %v", m.Data, err)
		}
		var ids []string
		for _, r := range l.Nodes {
			ids = append(ids, r.Heartbeat.Node)
		}
		return ids
	}
	for _, tt := range []struct {
		q    wire.NodeQuery
		want []string
	}{
		{wire.NodeQuery{}, []string{"a", "b"}},
		{wire.NodeQuery{Model: "m1"}, []string{"a"}},
		{wire.NodeQuery{Region: "us-east"}, []string{"b"}},
		{wire.NodeQuery{State: wire.NodeQuarantined}, nil},
		{wire.NodeQuery{State: wire.NodeReady, Region: "eu-west"}, []string{"a"}},
	} {
		if got := list(tt.q); !slices.Equal(got, tt.want) {
			t.Errorf("list %+v = %v, want %v", tt.q, got, tt.want)
		}
	}
	m, err := g.client.NC.Request(subjects.RegistryNodesGet, []byte(`{"node":"b"}`), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var rec wire.NodeRecord
	if err := json.Unmarshal(m.Data, &rec); err != nil || rec.Heartbeat.Region != "us-east" {
		t.Errorf("get b: %s (%v)", m.Data, err)
	}
	for body, code := range map[string]string{`{"node":"zzz"}`: "404", `{"colour":"red"}`: "400"} {
		m, err = g.client.NC.Request(subjects.RegistryNodesGet, []byte(body), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got := m.Header.Get("Nats-Service-Error-Code"); got != code {
			t.Errorf("get %s: error code %q, want %s", body, got, code)
		}
	}

	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + g.http + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/nodes?region=us-east"); code != 200 || !strings.Contains(body, `"node":"b"`) || strings.Contains(body, `"node":"a"`) {
		t.Errorf("GET /nodes?region=us-east: %d %s", code, body)
	}
	if code, body := get("/nodes/a"); code != 200 || !strings.Contains(body, `"node":"a"`) {
		t.Errorf("GET /nodes/a: %d %s", code, body)
	}
	if code, _ := get("/nodes/zzz"); code != 404 {
		t.Errorf("GET /nodes/zzz: %d, want 404", code)
	}
	if code, body := get("/stats"); code != 200 || !strings.Contains(body, `"nodes":2`) {
		t.Errorf("GET /stats: %d %s", code, body)
	}
}

func TestRestartedRegistryTakesOverItsRecords(t *testing.T) {
	s := bustest.Server(t)
	g := &grid{srv: s, client: bustest.Connect(t, s, "test")}
	g.events = watchEvents(t, g.client)
	var stopFirst func()
	// Liveness is not under test here: generous MissedBeats keep a loaded
	// machine from flapping the node that stays.
	g.reg, _, stopFirst = runRegistry(t, s, registry.Config{MissedBeats: 5})
	stay, gone := newFakeNode(t, "stays"), newFakeNode(t, "goes")
	stop := make(chan struct{})
	wg := stay.beatUntil(t, g.client.NC, stop)
	defer func() {
		close(stop)
		wg.Wait()
	}()
	gone.beat(t, g.client.NC)
	g.events.wait(t, "stays", wire.MemberJoined)
	g.events.wait(t, "goes", wire.MemberJoined)

	// The registry restarts.
	stopFirst()
	g.reg, _, _ = runRegistry(t, g.srv, registry.Config{MissedBeats: 5})
	// The silent node is found gone; the live one is not announced again.
	g.events.wait(t, "goes", wire.MemberJoined, wire.MemberLeft)
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		rec, err := g.reg.Node("stays")
		if err != nil {
			return err
		}
		if rec.Heartbeat.Seq < 3 {
			return fmt.Errorf("the new registry has not seen a heartbeat of stays yet")
		}
		return nil
	})
	if got := g.events.kinds("stays"); !slices.Equal(got, []string{wire.MemberJoined}) {
		t.Errorf("events of the node that stayed: %v, want one joined", got)
	}
	// The new registry still holds the node id to its key.
	intruder := newFakeNode(t, "stays")
	before := stats(t, g.client.NC).Rejected[registry.RejectKey]
	intruder.beat(t, g.client.NC)
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		if got := stats(t, g.client.NC).Rejected[registry.RejectKey]; got != before+1 {
			return fmt.Errorf("rejected[%s] = %d, want %d", registry.RejectKey, got, before+1)
		}
		return nil
	})
}
