// Package registry keeps the grid's live inventory of nodes: it consumes
// heartbeats, validates them, keeps KV nodes current (each key with a TTL so
// a silent node disappears), and records membership events.
package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/schemas"
)

// EnvPrefix is the prefix of the registry's environment variables.
const EnvPrefix = "TESSERA_REGISTRY_"

// Config is the registry's configuration, read from TESSERA_REGISTRY_*.
type Config struct {
	// MissedBeats is how many heartbeat intervals of silence mark a node gone.
	MissedBeats int `env:"MISSED_BEATS, default=3"`
	// SweepInterval is how often silent nodes are looked for.
	SweepInterval time.Duration `env:"SWEEP_INTERVAL, default=500ms"`
}

// Deps are what Run needs from its host process.
type Deps struct {
	Bus *bus.Conn
	Log *slog.Logger
}

// Registry is the running service.
type Registry struct {
	cfg    Config
	bus    *bus.Conn
	log    *slog.Logger
	kv     jetstream.KeyValue
	schema *schemas.Set

	mu    sync.Mutex
	nodes map[string]*entry
}

type entry struct {
	rec      wire.NodeRecord
	interval time.Duration
	lastSeen time.Time
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	r, err := New(ctx, cfg, deps)
	if err != nil {
		return err
	}
	return r.Run(ctx)
}

// New prepares a registry.
func New(ctx context.Context, cfg Config, deps Deps) (*Registry, error) {
	if cfg.MissedBeats <= 0 {
		cfg.MissedBeats = 3
	}
	if cfg.SweepInterval <= 0 {
		cfg.SweepInterval = 500 * time.Millisecond
	}
	log := deps.Log
	if log == nil {
		log = slog.Default()
	}
	kv, err := deps.Bus.JS.KeyValue(ctx, subjects.BucketNodes)
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketNodes, err)
	}
	set, err := schemas.Compile()
	if err != nil {
		return nil, err
	}
	return &Registry{cfg: cfg, bus: deps.Bus, log: log, kv: kv, schema: set, nodes: map[string]*entry{}}, nil
}

// Run consumes heartbeats and sweeps silent nodes until ctx ends.
func (r *Registry) Run(ctx context.Context) error {
	// A queue group lets several registries share the heartbeat load.
	sub, err := r.bus.NC.QueueSubscribe(subjects.HeartbeatAll, "registry", func(m *nats.Msg) { r.onHeartbeat(ctx, m) })
	if err != nil {
		return fmt.Errorf("subscribe heartbeats: %w", err)
	}
	defer sub.Unsubscribe()
	sub.SetPendingLimits(-1, -1)
	t := time.NewTicker(r.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			r.sweep(ctx, now)
		}
	}
}

// onHeartbeat validates a heartbeat and updates the node's record.
func (r *Registry) onHeartbeat(ctx context.Context, m *nats.Msg) {
	if err := r.schema.Validate(wire.SchemaHeartbeat, m.Data); err != nil {
		r.reject(ctx, m, "invalid_heartbeat", err)
		return
	}
	var hb wire.Heartbeat
	if err := json.Unmarshal(m.Data, &hb); err != nil {
		r.reject(ctx, m, "invalid_heartbeat", err)
		return
	}
	if m.Subject != subjects.Heartbeat(hb.Node) {
		r.reject(ctx, m, "wrong_subject", fmt.Errorf("heartbeat of node %q published on %s", hb.Node, m.Subject))
		return
	}
	now := time.Now().UTC()
	r.mu.Lock()
	e := r.nodes[hb.Node]
	joined := e == nil
	if joined {
		e = &entry{rec: wire.NodeRecord{JoinedAt: now}}
		r.nodes[hb.Node] = e
	} else if hb.PublicKey != e.rec.Heartbeat.PublicKey {
		r.mu.Unlock()
		r.reject(ctx, m, "key_changed", fmt.Errorf("node %s announced key %s, registered with %s", hb.Node, hb.PublicKey, e.rec.Heartbeat.PublicKey))
		return
	}
	prevState := e.rec.State
	e.rec.Heartbeat = hb
	e.rec.LastSeen = now
	e.rec.State = hb.State
	e.interval = time.Duration(hb.IntervalMS) * time.Millisecond
	e.lastSeen = now
	rec := e.rec
	r.mu.Unlock()

	if err := r.put(ctx, rec, e.interval); err != nil {
		r.log.Warn("node record not stored", "node", hb.Node, "err", err)
	}
	switch {
	case joined:
		r.event(ctx, hb.Node, wire.MemberJoined, "")
	case prevState != hb.State && hb.State == wire.NodeDraining:
		r.event(ctx, hb.Node, wire.MemberDraining, "")
	}
}

// put stores rec with a TTL of MissedBeats intervals, so that the record
// disappears even if no registry is left to remove it.
func (r *Registry) put(ctx context.Context, rec wire.NodeRecord, interval time.Duration) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	// JetStream takes per-message TTLs in whole seconds, at least one.
	ttl := max((time.Duration(r.cfg.MissedBeats)*interval+time.Second-1)/time.Second, 1)
	msg := nats.NewMsg("$KV." + subjects.BucketNodes + "." + rec.Heartbeat.Node)
	msg.Header.Set(jetstream.MsgTTLHeader, fmt.Sprintf("%ds", ttl))
	msg.Data = b
	_, err = r.bus.JS.PublishMsg(ctx, msg)
	return err
}

// sweep removes nodes silent for MissedBeats intervals and announces "left".
func (r *Registry) sweep(ctx context.Context, now time.Time) {
	var gone []string
	r.mu.Lock()
	for id, e := range r.nodes {
		if now.Sub(e.lastSeen) > time.Duration(r.cfg.MissedBeats)*e.interval {
			gone = append(gone, id)
			delete(r.nodes, id)
		}
	}
	r.mu.Unlock()
	for _, id := range gone {
		if err := r.kv.Delete(ctx, id); err != nil {
			r.log.Warn("node record not deleted", "node", id, "err", err)
		}
		r.event(ctx, id, wire.MemberLeft, "no heartbeat")
	}
}

func (r *Registry) event(ctx context.Context, node, kind, reason string) {
	ev := wire.MembershipEvent{ID: nuid.Next(), Node: node, Kind: kind, Reason: reason, Time: time.Now().UTC()}
	b, _ := json.Marshal(ev)
	msg := nats.NewMsg(subjects.Membership(node, kind))
	msg.Header.Set(wire.HdrMsgID, ev.ID)
	msg.Data = b
	if _, err := r.bus.JS.PublishMsg(ctx, msg); err != nil {
		r.log.Warn("membership event not stored", "node", node, "kind", kind, "err", err)
		return
	}
	r.log.Info("membership", "node", node, "event", kind, "reason", reason)
}

func (r *Registry) reject(ctx context.Context, m *nats.Msg, reason string, err error) {
	if derr := bus.DeadLetter(ctx, r.bus.JS, "registry", reason, err, m, 0); derr != nil {
		r.log.Error("dead letter failed", "err", derr)
	}
}
