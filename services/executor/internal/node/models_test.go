package node_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/node"
	"github.com/tessera-grid/tessera/services/executor/internal/nodetest"
)

// refusals counts the node's "fragment refused" warnings and calls onFirst
// (synchronously, before the node retries) on the first one.
type refusals struct {
	mu      sync.Mutex
	n       int
	onFirst func()
}

func (r *refusals) Enabled(context.Context, slog.Level) bool { return true }
func (r *refusals) Handle(_ context.Context, rec slog.Record) error {
	if !strings.HasPrefix(rec.Message, "fragment refused") {
		return nil
	}
	r.mu.Lock()
	r.n++
	first := r.n == 1
	r.mu.Unlock()
	if first && r.onFirst != nil {
		r.onFirst()
	}
	return nil
}
func (r *refusals) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *refusals) WithGroup(string) slog.Handler      { return r }
func (r *refusals) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// corruptDemo imports the demo model, flips a byte of layer 2's blob, and
// returns the server, the model manifest, and a function restoring the blob.
func corruptDemo(t *testing.T) (*server.Server, wire.ModelManifest, func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := bustest.Server(t)
	c := bustest.Connect(t, s, "admin")
	st, err := fragstore.Open(ctx, c.JS)
	if err != nil {
		t.Fatal(err)
	}
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.ImportCheckpoint(ctx, testmodel.ID, cp, tp, nil)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := c.JS.ObjectStore(ctx, subjects.ObjectFragments)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(m.Fragments, func(r wire.FragmentRef) bool { return r.ID == "layer.2" })
	name := m.Fragments[i].Object
	good, err := obj.GetBytes(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(good)
	bad[len(bad)-7] ^= 0x40
	if _, err := obj.PutBytes(ctx, name, bad); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := obj.PutBytes(ctx, name, good); err != nil {
			t.Error(err)
		}
	}
	return s, m, restore
}

func whole(m wire.ModelManifest) []nodetest.Hop {
	return []nodetest.Hop{{Node: "n1", First: 0, End: m.Config.Layers}}
}

// startPlanned starts node n1 logging to h, plans the whole model onto it,
// and returns the node and a client connection.
func startPlanned(t *testing.T, s *server.Server, m wire.ModelManifest, h slog.Handler) (*node.Node, *bus.Conn) {
	t.Helper()
	n := nodetest.Start(t, s, node.Options{ID: "n1"}, slog.New(h))
	c := bustest.Connect(t, s, "router")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := nodetest.PutPlan(ctx, c, nodetest.Plan(m.ID, m.Config.Layers, whole(m))); err != nil {
		t.Fatal(err)
	}
	return n, c
}

// A corrupted fragment is refused, fetched again, and only the good copy
// is loaded and run: the node then generates the reference tokens, and its
// heartbeat's fetch progress ends complete.
func TestCorruptFragmentIsFetchedAgain(t *testing.T) {
	s, m, restore := corruptDemo(t)
	ref := &refusals{onFirst: restore}
	n, c := startPlanned(t, s, m, ref)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bustest.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		st := n.Status()
		if len(st.Fragments) != len(m.Fragments) {
			return fmt.Errorf("%d of %d fragments loaded", len(st.Fragments), len(m.Fragments))
		}
		if st.Fetch.BytesDone != st.Fetch.BytesTotal || st.Fetch.BytesTotal != m.TotalBytes {
			return fmt.Errorf("fetch progress %d/%d, want %d", st.Fetch.BytesDone, st.Fetch.BytesTotal, m.TotalBytes)
		}
		return nil
	})
	if got := ref.count(); got != 1 {
		t.Fatalf("%d refusals, want exactly 1", got)
	}
	req := &nodetest.Request{ID: "r1", Model: m.ID, Route: whole(m)}
	toks := make([]int32, len(testmodel.PromptIDs))
	for i, v := range testmodel.PromptIDs {
		toks[i] = int32(v)
	}
	pos := 0
	for i, want := range testmodel.GreedyIDs[:10] {
		logits, err := req.Step(ctx, c.NC, pos, toks)
		if err != nil {
			t.Fatal(err)
		}
		pos += len(toks)
		if got := compute.Argmax(logits); got != want {
			t.Fatalf("token %d: %d, want %d", i, got, want)
		}
		toks = []int32{int32(want)}
	}
}

// A fragment that stays corrupt is never loaded or run: after its retries
// the node holds none of the plan's layer and refuses stage requests for it.
func TestCorruptFragmentIsNeverRun(t *testing.T) {
	s, m, _ := corruptDemo(t)
	ref := &refusals{}
	n, c := startPlanned(t, s, m, ref)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bustest.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if got := ref.count(); got < 3 {
			return fmt.Errorf("%d refusals so far", got)
		}
		return nil
	})
	if st := n.Status(); slices.Contains(st.Fragments, m.ID+"/layer.2") {
		t.Fatalf("corrupt layer loaded: %v", st.Fragments)
	}
	req := &nodetest.Request{ID: "r1", Model: m.ID, Route: whole(m)}
	_, err := req.Step(ctx, c.NC, 0, []int32{1})
	if !errors.Is(err, nodetest.ErrStage) || !strings.Contains(err.Error(), wire.ErrCodeNotLoaded) {
		t.Fatalf("stage request on a corrupt model: %v, want a %s error", err, wire.ErrCodeNotLoaded)
	}
}
