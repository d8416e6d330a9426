// Package planner decides which node holds which layers of each model: it
// watches the live nodes and the model manifests, and publishes a versioned
// plan per model in KV plans (compare-and-set on the revision) whenever the
// set of usable nodes changes.
package planner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// EnvPrefix is the prefix of the planner's environment variables.
const EnvPrefix = "TESSERA_PLANNER_"

// Config is the planner's configuration, read from TESSERA_PLANNER_*.
type Config struct {
	// Settle is how long the node set must stay unchanged before a re-plan,
	// so that a burst of joins yields one plan.
	Settle time.Duration `env:"SETTLE, default=1s"`
}

// Deps are what Run needs from its host process.
type Deps struct {
	Bus *bus.Conn
	Log *slog.Logger
}

// Planner is the running service.
type Planner struct {
	cfg    Config
	bus    *bus.Conn
	log    *slog.Logger
	nodes  jetstream.KeyValue
	models jetstream.KeyValue
	plans  jetstream.KeyValue
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	log := deps.Log
	if log == nil {
		log = slog.Default()
	}
	p := &Planner{cfg: cfg, bus: deps.Bus, log: log}
	var err error
	if p.nodes, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketNodes); err != nil {
		return err
	}
	if p.models, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketModels); err != nil {
		return err
	}
	if p.plans, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketPlans); err != nil {
		return err
	}
	return p.run(ctx)
}

// run watches nodes and models; each change (after Settle) re-plans every model.
func (p *Planner) run(ctx context.Context) error {
	nw, err := p.nodes.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer nw.Stop()
	mw, err := p.models.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer mw.Stop()
	nodes := map[string]wire.NodeRecord{}
	models := map[string]wire.ModelManifest{}
	dirty := false
	var timer <-chan time.Time
	// Membership signature: re-plan only when what placement depends on changes.
	last := ""
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-nw.Updates():
			if !ok {
				return errors.New("node watcher closed")
			}
			if e == nil {
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				delete(nodes, e.Key())
			} else {
				var r wire.NodeRecord
				if err := json.Unmarshal(e.Value(), &r); err != nil {
					p.log.Warn("ignoring undecodable node record", "key", e.Key(), "err", err)
					continue
				}
				nodes[e.Key()] = r
			}
			if sig := signature(nodes); sig != last {
				last = sig
				dirty = true
				timer = time.After(p.cfg.Settle)
			}
		case e, ok := <-mw.Updates():
			if !ok {
				return errors.New("model watcher closed")
			}
			if e == nil {
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				delete(models, e.Key())
				continue
			}
			var m wire.ModelManifest
			if err := json.Unmarshal(e.Value(), &m); err != nil {
				p.log.Warn("ignoring undecodable manifest", "key", e.Key(), "err", err)
				continue
			}
			models[e.Key()] = m
			dirty = true
			timer = time.After(p.cfg.Settle)
		case <-timer:
			if !dirty {
				continue
			}
			dirty = false
			live := usable(nodes)
			if len(live) == 0 {
				p.log.Info("no usable nodes; keeping the current plans")
				continue
			}
			for _, m := range models {
				if err := p.replan(ctx, m, live); err != nil {
					p.log.Error("plan not published", "model", m.ID, "err", err)
				}
			}
		}
	}
}

// usable returns the nodes a plan may use, sorted by id.
func usable(nodes map[string]wire.NodeRecord) []wire.NodeRecord {
	var out []wire.NodeRecord
	for _, r := range nodes {
		if r.State == wire.NodeReady {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Heartbeat.Node < out[j].Heartbeat.Node })
	return out
}

func signature(nodes map[string]wire.NodeRecord) string {
	var ids []string
	for _, r := range usable(nodes) {
		ids = append(ids, fmt.Sprintf("%s/%d", r.Heartbeat.Node, r.Heartbeat.MemoryBudget))
	}
	return fmt.Sprint(ids)
}

// replan computes m's plan over nodes and publishes it when it differs from
// the current one.
func (p *Planner) replan(ctx context.Context, m wire.ModelManifest, nodes []wire.NodeRecord) error {
	plan, err := SplitByMemory(m, nodes)
	if err != nil {
		return err
	}
	cur, err := p.plans.Get(ctx, m.ID)
	var rev uint64
	if err == nil {
		rev = cur.Revision()
		var old wire.Plan
		if json.Unmarshal(cur.Value(), &old) == nil && slices.EqualFunc(old.Assignments, plan.Assignments, sameAssignment) {
			return nil
		}
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return err
	}
	b, err := json.Marshal(plan)
	if err != nil {
		return err
	}
	// Compare-and-set: a concurrent planner's newer plan wins.
	if rev == 0 {
		rev, err = p.plans.Create(ctx, m.ID, b)
	} else {
		rev, err = p.plans.Update(ctx, m.ID, b, rev)
	}
	if err != nil {
		return fmt.Errorf("publish plan: %w", err)
	}
	ev := wire.PlanEvent{Model: m.ID, Version: rev, Reason: plan.Reason, Nodes: len(plan.Assignments), ThroughputTokS: plan.ThroughputTokS, Time: time.Now().UTC()}
	eb, _ := json.Marshal(ev)
	msg := nats.NewMsg(subjects.PlanEvent(m.ID))
	msg.Data = eb
	if _, err := p.bus.JS.PublishMsg(ctx, msg); err != nil {
		p.log.Warn("plan event not stored", "err", err)
	}
	p.log.Info("plan published", "model", m.ID, "version", rev, "nodes", len(plan.Assignments))
	return nil
}

func sameAssignment(a, b wire.Assignment) bool {
	return a.Node == b.Node && a.First == b.First && a.End == b.End && a.Embed == b.Embed && a.Head == b.Head && slices.Equal(a.Experts, b.Experts)
}

// SplitByMemory splits m's layers into as many contiguous stages as there
// are nodes (at most one per layer), sized in proportion to each node's
// memory, every node holding at least one layer.
func SplitByMemory(m wire.ModelManifest, nodes []wire.NodeRecord) (wire.Plan, error) {
	L := m.Config.Layers
	if len(nodes) == 0 {
		return wire.Plan{}, fmt.Errorf("model %s: no usable nodes", m.ID)
	}
	if len(nodes) > L {
		nodes = nodes[:L]
	}
	var total float64
	for _, n := range nodes {
		total += float64(max(n.Heartbeat.MemoryBudget, 1))
	}
	plan := wire.Plan{Model: m.ID, Strategy: "memory-proportional", Layers: L, Created: time.Now().UTC(), Reason: fmt.Sprintf("%d usable nodes", len(nodes))}
	first := 0
	var acc float64
	for i, n := range nodes {
		acc += float64(max(n.Heartbeat.MemoryBudget, 1))
		end := int(acc/total*float64(L) + 0.5)
		// Leave at least one layer for each node after this one.
		end = min(max(end, first+1), L-(len(nodes)-1-i))
		if i == len(nodes)-1 {
			end = L
		}
		id := n.Heartbeat.Node
		plan.Assignments = append(plan.Assignments, wire.Assignment{Node: id, First: first, End: end, Embed: first == 0, Head: end == L})
		plan.Stages = append(plan.Stages, wire.Stage{First: first, End: end, Replicas: []string{id}})
		first = end
	}
	return plan, nil
}
