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
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/planner/placement"
)

// EnvPrefix is the prefix of the planner's environment variables.
const EnvPrefix = "TESSERA_PLANNER_"

// Config is the planner's configuration, read from TESSERA_PLANNER_*.
type Config struct {
	// Settle is how long the node set must stay unchanged before a re-plan,
	// so that a burst of joins yields one plan.
	Settle time.Duration `env:"SETTLE, default=1s"`
	// Strategy places fragments: tessera (throughput-maximising pipelines
	// with replicas, incremental on churn), petals, or exo (one pipeline
	// split in proportion to memory).
	Strategy string `env:"STRATEGY, default=tessera"`
	// RegionBandwidth is the assumed bandwidth between two regions, bytes/s.
	RegionBandwidth float64 `env:"REGION_BANDWIDTH, default=125000000"`
	// RegionLatency is the assumed one-way latency between two regions.
	RegionLatency time.Duration `env:"REGION_LATENCY, default=20ms"`
	// KVReserveTokens is the KV cache (in tokens, in every layer it holds)
	// each node must keep room for beside its weights.
	KVReserveTokens int64 `env:"KV_RESERVE_TOKENS, default=2048"`
	// DefaultLayerTime is assumed per token and layer for a node that has
	// not reported a speed for the model.
	DefaultLayerTime time.Duration `env:"DEFAULT_LAYER_TIME, default=1ms"`
	// ExpertSpread spreads the experts of a model whose feed-forward layers
	// are stored as expert groups (a mixture of experts, or a dense FFN
	// split into groups) over up to this many of the nodes that hold the
	// same layers, balanced by the routers' counts in KV expertload; 0 or 1
	// keeps every expert of a layer on every node holding it.
	ExpertSpread int `env:"EXPERT_SPREAD, default=0"`
}

// Deps are what Run needs from its host process.
type Deps struct {
	Bus *bus.Conn
	Log *slog.Logger
}

// Planner is the running service.
type Planner struct {
	cfg      Config
	bus      *bus.Conn
	log      *slog.Logger
	strategy placement.Strategy
	nodes    jetstream.KeyValue
	models   jetstream.KeyValue
	plans    jetstream.KeyValue
	// load holds the routers' expert-use counts (KV expertload).
	load jetstream.KeyValue
	// last is each model's latest placement, the base of incremental re-plans.
	last map[string]*placement.Placement
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	log := deps.Log
	if log == nil {
		log = slog.Default()
	}
	st, err := placement.StrategyByName(cfg.Strategy)
	if err != nil {
		return fmt.Errorf("%sSTRATEGY: %w", EnvPrefix, err)
	}
	p := &Planner{cfg: cfg, bus: deps.Bus, log: log, strategy: st, last: map[string]*placement.Placement{}}
	if p.nodes, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketNodes); err != nil {
		return err
	}
	if p.models, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketModels); err != nil {
		return err
	}
	if p.plans, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketPlans); err != nil {
		return err
	}
	if p.load, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketExpertLoad); err != nil {
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
	signatureChange := "startup"
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
				signatureChange = describeChange(last, sig)
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
			delete(p.last, m.ID)
			signatureChange = "model " + m.ID + " imported"
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
				if err := p.replan(ctx, m, live, signatureChange); err != nil {
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

// signature sums up what placement depends on: the usable nodes, their
// memory and whether they have measured their speed.
func signature(nodes map[string]wire.NodeRecord) string {
	var ids []string
	for _, r := range usable(nodes) {
		ids = append(ids, fmt.Sprintf("%s/%d/%d", r.Heartbeat.Node, r.Heartbeat.MemoryBudget, len(r.Heartbeat.Speed)))
	}
	return strings.Join(ids, " ")
}

// describeChange says which nodes joined and left between two signatures.
func describeChange(before, after string) string {
	ids := func(sig string) map[string]bool {
		out := map[string]bool{}
		for _, f := range strings.Fields(sig) {
			id, _, _ := strings.Cut(f, "/")
			out[id] = true
		}
		return out
	}
	b, a := ids(before), ids(after)
	var parts []string
	for id := range a {
		if !b[id] {
			parts = append(parts, id+" joined")
		}
	}
	for id := range b {
		if !a[id] {
			parts = append(parts, id+" left")
		}
	}
	sort.Strings(parts)
	if len(parts) == 0 {
		return "node capacity changed"
	}
	return strings.Join(parts, ", ")
}

// replan computes m's plan over nodes (incrementally from the last one)
// and publishes it when the assignments differ from the current plan.
func (p *Planner) replan(ctx context.Context, m wire.ModelManifest, nodes []wire.NodeRecord, reason string) error {
	prob := p.Problem(m, nodes)
	start := time.Now()
	var load [][]int64
	if groups := m.ExpertGroups(); groups > 1 && p.cfg.ExpertSpread > 1 {
		load = p.expertLoad(ctx, m, groups)
	}
	pl, err := placement.PlaceSpread(ctx, p.strategy, prob, p.last[m.ID], load)
	if err != nil {
		return err
	}
	moved := placement.MovedBytes(prob.Model, p.last[m.ID], pl)
	plan := pl.Wire(time.Now().UTC(), reason)
	cur, err := p.plans.Get(ctx, m.ID)
	var rev uint64
	if err == nil {
		rev = cur.Revision()
		var old wire.Plan
		if json.Unmarshal(cur.Value(), &old) == nil && slices.EqualFunc(old.Assignments, plan.Assignments, sameAssignment) {
			p.last[m.ID] = pl
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
	pl.Version = rev
	p.last[m.ID] = pl
	ev := wire.PlanEvent{Model: m.ID, Version: rev, Reason: reason, Nodes: len(plan.Assignments), MovedBytes: moved, ThroughputTokS: plan.ThroughputTokS, Time: time.Now().UTC()}
	eb, _ := json.Marshal(ev)
	msg := nats.NewMsg(subjects.PlanEvent(m.ID))
	msg.Data = eb
	if _, err := p.bus.JS.PublishMsg(ctx, msg); err != nil {
		p.log.Warn("plan event not stored", "err", err)
	}
	p.log.Info("plan published", "model", m.ID, "version", rev, "strategy", p.strategy.Name(), "nodes", len(plan.Assignments),
		"stages", len(plan.Stages), "throughput_tok_s", int(plan.ThroughputTokS), "moved_bytes", moved, "plan_ms", time.Since(start).Milliseconds(), "reason", reason)
	return nil
}

// Problem describes placing m on nodes: the sizes of its layers' stored
// fragments, each node's memory budget, its measured per-layer speed for
// the model (or the configured default), and links between regions. A
// model whose experts are stored apart has them spread over up to
// ExpertSpread nodes, each sized for its share.
func (p *Planner) Problem(m wire.ModelManifest, nodes []wire.NodeRecord) *placement.Problem {
	c := m.Config
	groups := m.ExpertGroups()
	prob := &placement.Problem{
		Model: placement.Model{
			Name: m.ID, Layers: c.Layers, LayerBytes: m.LayerWeightBytes,
			KVBytesPerTokenLayer: m.KVBytesPerToken, KVReserveTokens: min(p.cfg.KVReserveTokens, int64(c.SeqLen)),
			ActivationBytesPerToken: 4 * int64(c.Dim), TokenBytes: 4, Experts: groups,
			LayerFragments: layerFragments(m, groups),
		},
	}
	if groups > 1 {
		prob.Model.ExpertSpread = p.cfg.ExpertSpread
	}
	regions := map[string]bool{}
	def := p.cfg.DefaultLayerTime.Seconds()
	for _, r := range nodes {
		hb := r.Heartbeat
		timing := placement.LayerTiming{PrefillSecondsPerToken: def, DecodeSecondsPerToken: def, PromptShare: 0.5}
		for _, sp := range hb.Speed {
			if sp.Model == m.ID && sp.DType == m.DType && sp.DecodeTokS > 0 && sp.PrefillTokS > 0 {
				timing.PrefillSecondsPerToken, timing.DecodeSecondsPerToken = 1/sp.PrefillTokS, 1/sp.DecodeTokS
			}
		}
		state := placement.StateActive
		switch r.State {
		case wire.NodeDraining:
			state = placement.StateDraining
		case wire.NodeQuarantined:
			state = placement.StateQuarantined
		}
		device := "cpu"
		for _, d := range hb.Devices {
			if d.Error == "" {
				device = d.Name
				break
			}
		}
		prob.Nodes = append(prob.Nodes, placement.Node{
			ID: hb.Node, Device: device, Region: hb.Region, MemoryBytes: int64(hb.MemoryBudget),
			Throughput: timing, State: state,
		})
		regions[hb.Region] = true
	}
	var rs []string
	for r := range regions {
		rs = append(rs, r)
	}
	sort.Strings(rs)
	for i, a := range rs {
		for _, b := range rs[i+1:] {
			prob.Network.RegionLinks = append(prob.Network.RegionLinks, placement.Link{From: a, To: b, BandwidthBytesPerS: p.cfg.RegionBandwidth, Latency: p.cfg.RegionLatency})
		}
	}
	return prob
}

// layerFragments returns the stored size of each layer's fragment and of
// its groups' fragments (groups per layer), or nil when m does not list
// them all; the planner then sizes every layer as m.LayerWeightBytes.
func layerFragments(m wire.ModelManifest, groups int) []placement.LayerFragments {
	layers := m.Config.Layers
	out := make([]placement.LayerFragments, layers)
	seen := make([]int, layers)
	for _, f := range m.Fragments {
		switch {
		case f.Layer < 0 || f.Layer >= layers || f.Bytes < 0:
			continue
		case f.Expert < 0:
			out[f.Layer].Trunk = f.Bytes
		case f.Expert < groups:
			if out[f.Layer].Experts == nil {
				out[f.Layer].Experts = make([]int64, groups)
			}
			out[f.Layer].Experts[f.Expert] = f.Bytes
		default:
			return nil
		}
		seen[f.Layer]++
	}
	for _, n := range seen {
		if n != 1+groups {
			return nil
		}
	}
	return out
}

func sameAssignment(a, b wire.Assignment) bool {
	return a.Node == b.Node && a.First == b.First && a.End == b.End && a.Embed == b.Embed && a.Head == b.Head && slices.Equal(a.Experts, b.Experts)
}

// expertLoad returns the routers' expert-use counts of m (layer × expert),
// or nil when there are none yet or they do not fit the model's shape.
func (p *Planner) expertLoad(ctx context.Context, m wire.ModelManifest, groups int) [][]int64 {
	e, err := p.load.Get(ctx, m.ID)
	if err != nil {
		if !errors.Is(err, jetstream.ErrKeyNotFound) {
			p.log.Warn("expert load not read; spreading experts evenly", "model", m.ID, "err", err)
		}
		return nil
	}
	var l wire.ExpertLoad
	if err := wire.Decode(e.Value(), &l); err != nil || l.Validate() != nil || l.Layers != m.Config.Layers || l.Experts != groups {
		p.log.Warn("expert load does not fit the model; spreading experts evenly", "model", m.ID, "err", err)
		return nil
	}
	return l.Counts
}
