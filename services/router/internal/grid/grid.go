// Package grid is the router's live view of the grid: the current plan and
// manifest (with tokenizer) of every model, and the live nodes, kept up to
// date from KV watches.
package grid

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// Model is a servable model: its manifest, tokenizer and current plan.
type Model struct {
	Manifest  wire.ModelManifest
	Tokenizer *model.Tokenizer
	Plan      *wire.Plan
}

// View is the router's view of the grid. It is safe for concurrent use.
type View struct {
	bus   *bus.Conn
	log   *slog.Logger
	store *fragstore.Store

	mu     sync.RWMutex
	models map[string]*Model
	plans  map[string]*wire.Plan
	nodes  map[string]wire.NodeRecord
	// frags is each live node's loaded fragments ("model/fragment"), as a set.
	frags map[string]map[string]bool
	ready chan struct{}
}

// New returns a view; Run keeps it current.
func New(b *bus.Conn, log *slog.Logger) *View {
	return &View{bus: b, log: log, models: map[string]*Model{}, plans: map[string]*wire.Plan{}, nodes: map[string]wire.NodeRecord{}, frags: map[string]map[string]bool{}, ready: make(chan struct{})}
}

// Run watches models, plans and nodes until ctx ends.
func (v *View) Run(ctx context.Context) error {
	st, err := fragstore.Open(ctx, v.bus.JS)
	if err != nil {
		return err
	}
	v.store = st
	var wg sync.WaitGroup
	for _, b := range []string{subjects.BucketModels, subjects.BucketPlans, subjects.BucketNodes} {
		wg.Add(1)
		go func(bucket string) {
			defer wg.Done()
			for ctx.Err() == nil {
				if err := v.watch(ctx, bucket); err != nil && ctx.Err() == nil {
					v.log.Warn("watch failed; retrying", "bucket", bucket, "err", err)
					select {
					case <-ctx.Done():
					case <-time.After(time.Second):
					}
				}
			}
		}(b)
	}
	wg.Wait()
	return nil
}

func (v *View) watch(ctx context.Context, bucket string) error {
	kv, err := v.bus.JS.KeyValue(ctx, bucket)
	if err != nil {
		return err
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("watcher closed")
			}
			if e == nil {
				continue
			}
			v.apply(ctx, bucket, e)
		}
	}
}

func (v *View) apply(ctx context.Context, bucket string, e jetstream.KeyValueEntry) {
	del := e.Operation() != jetstream.KeyValuePut
	switch bucket {
	case subjects.BucketModels:
		if del {
			v.mu.Lock()
			delete(v.models, e.Key())
			v.mu.Unlock()
			return
		}
		var m wire.ModelManifest
		if err := json.Unmarshal(e.Value(), &m); err != nil {
			v.log.Warn("undecodable manifest", "model", e.Key(), "err", err)
			return
		}
		tok, err := v.store.Tokenizer(ctx, m)
		if err != nil {
			v.log.Error("tokenizer not loaded", "model", m.ID, "err", err)
			return
		}
		v.mu.Lock()
		v.models[m.ID] = &Model{Manifest: m, Tokenizer: tok}
		v.mu.Unlock()
	case subjects.BucketPlans:
		v.mu.Lock()
		defer v.mu.Unlock()
		if del {
			delete(v.plans, e.Key())
			return
		}
		var p wire.Plan
		if err := json.Unmarshal(e.Value(), &p); err != nil {
			v.log.Warn("undecodable plan", "model", e.Key(), "err", err)
			return
		}
		p.Version = e.Revision()
		v.plans[e.Key()] = &p
	case subjects.BucketNodes:
		v.mu.Lock()
		defer v.mu.Unlock()
		if del {
			delete(v.nodes, e.Key())
			delete(v.frags, e.Key())
			return
		}
		var r wire.NodeRecord
		if err := json.Unmarshal(e.Value(), &r); err != nil {
			v.log.Warn("undecodable node record", "node", e.Key(), "err", err)
			return
		}
		v.nodes[e.Key()] = r
		set := make(map[string]bool, len(r.Heartbeat.Fragments))
		for _, f := range r.Heartbeat.Fragments {
			set[f] = true
		}
		v.frags[e.Key()] = set
	}
}

// ErrUnknownModel means no manifest exists for the model.
var ErrUnknownModel = errors.New("model not found")

// ErrNoPlan means the model has no plan or no live route yet.
var ErrNoPlan = errors.New("model not available")

// Model returns the model called id with its current plan.
func (v *View) Model(id string) (*Model, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	m := v.models[id]
	if m == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownModel, id)
	}
	out := *m
	out.Plan = v.plans[id]
	return &out, nil
}

// Models lists the models that have a plan.
func (v *View) Models() []*Model {
	v.mu.RLock()
	defer v.mu.RUnlock()
	var out []*Model
	for id, m := range v.models {
		if p := v.plans[id]; p != nil {
			mm := *m
			mm.Plan = p
			out = append(out, &mm)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Manifest.ID < out[j].Manifest.ID })
	return out
}

// Node returns the live record of a node.
func (v *View) Node(id string) (wire.NodeRecord, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	r, ok := v.nodes[id]
	return r, ok
}

// Nodes returns every live node record.
func (v *View) Nodes() []wire.NodeRecord {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]wire.NodeRecord, 0, len(v.nodes))
	for _, r := range v.nodes {
		out = append(out, r)
	}
	return out
}

// Holds reports whether the live node reports fragment ("model/fragment")
// loaded.
func (v *View) Holds(node, fragment string) bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.frags[node][fragment]
}
