package registry

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/nodesig"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// intake receives heartbeats and spreads them over the workers by node, so
// that one node's heartbeats are checked in order while different nodes'
// are checked in parallel.
type intake struct {
	sub    *nats.Subscription
	shards []chan arrival
	done   chan struct{}
	wg     sync.WaitGroup
	queued atomic.Int64
}

func (r *Registry) startIntake(ctx context.Context) (*intake, error) {
	in := &intake{shards: make([]chan arrival, r.cfg.Workers), done: make(chan struct{})}
	for i := range in.shards {
		ch := make(chan arrival, 1024)
		in.shards[i] = ch
		in.wg.Go(func() {
			for {
				select {
				case a := <-ch:
					r.onHeartbeat(ctx, a.msg, a.at)
					in.queued.Add(-1)
				case <-in.done:
					return
				}
			}
		})
	}
	// A queue group lets a standby registry take over the heartbeats when
	// this one stops.
	sub, err := r.bus.NC.QueueSubscribe(subjects.HeartbeatAll, "registry", func(m *nats.Msg) {
		r.metrics.received.Add(1)
		in.queued.Add(1)
		select {
		case in.shards[shardOf(m.Subject, len(in.shards))] <- arrival{msg: m, at: time.Now().UTC()}:
		case <-in.done:
		}
	})
	if err != nil {
		in.stopWorkers()
		return nil, fmt.Errorf("subscribe heartbeats: %w", err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	in.sub = sub
	r.metrics.pending = func() int {
		n, _, _ := sub.Pending()
		return n + int(in.queued.Load())
	}
	return in, nil
}

// arrival is a heartbeat and when it arrived: a node's silence is counted
// from its last heartbeat's arrival, not from when a busy registry got to it.
type arrival struct {
	msg *nats.Msg
	at  time.Time
}

// stop ends the intake; heartbeats still queued are dropped (each node
// sends its state again with its next one).
func (in *intake) stop() {
	_ = in.sub.Unsubscribe()
	in.stopWorkers()
}

func (in *intake) stopWorkers() {
	close(in.done)
	in.wg.Wait()
}

// shardOf picks a worker by the heartbeat's subject (which names the node).
func shardOf(subject string, n int) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(subject))
	return int(h.Sum32() % uint32(n))
}

// Rejection reasons: each is a dead-letter reason, a metric attribute and a
// key of RegistryStats.Rejected.
const (
	// RejectInvalid: not a well-formed heartbeat.
	RejectInvalid = "invalid_heartbeat"
	// RejectSubject: published on another node's subject.
	RejectSubject = "wrong_subject"
	// RejectSignature: unsigned, or the signature does not verify.
	RejectSignature = "bad_signature"
	// RejectKey: signed by a key other than the one the node id is bound to.
	RejectKey = "key_not_bound"
	// RejectReplayed: not newer than the node's last accepted heartbeat.
	RejectReplayed = "replayed"
)

// onHeartbeat checks one heartbeat, which arrived at, and applies it.
func (r *Registry) onHeartbeat(ctx context.Context, m *nats.Msg, at time.Time) {
	var hb wire.Heartbeat
	if err := wire.Decode(m.Data, &hb); err != nil {
		r.reject(ctx, m, RejectInvalid, err)
		return
	}
	if m.Subject != subjects.Heartbeat(hb.Node) {
		r.reject(ctx, m, RejectSubject, fmt.Errorf("%w: heartbeat of node %q published on %s", ErrWrongSubject, hb.Node, m.Subject))
		return
	}
	if err := checkHeartbeat(&hb); err != nil {
		r.reject(ctx, m, RejectInvalid, err)
		return
	}
	r.mu.Lock()
	e := r.nodes[hb.Node]
	// Each node is fully validated every SchemaEvery heartbeats, at an
	// offset of its own, so that a burst of joins does not validate all at once.
	seen := 0
	if e != nil {
		seen = e.seen
	}
	fullCheck := (seen+shardOf(hb.Node, r.cfg.SchemaEvery))%r.cfg.SchemaEvery == 0
	key, known := r.bound[hb.Node]
	r.mu.Unlock()
	if fullCheck {
		if err := r.schema.Validate(wire.SchemaHeartbeat, m.Data); err != nil {
			r.reject(ctx, m, RejectInvalid, err)
			return
		}
	}
	// The signature is checked before the key is bound, so that nobody can
	// claim a node id with a key they do not hold.
	signer := key
	if !known || key.nkey != hb.PublicKey {
		pk, err := nodesig.ParsePublicKey(hb.PublicKey)
		if err != nil {
			r.reject(ctx, m, RejectSignature, err)
			return
		}
		signer = boundKey{nkey: hb.PublicKey, key: pk}
	}
	if err := signer.key.VerifyHeartbeat(m.Data, &hb); err != nil {
		r.reject(ctx, m, RejectSignature, err)
		return
	}
	if !known {
		bound, err := r.bindKey(ctx, hb.Node, signer)
		if err != nil {
			// The bucket is unreachable: the heartbeat is not at fault and
			// the node's next one will try again.
			r.log.Warn("node key not bound", "node", hb.Node, "err", err)
			return
		}
		key = bound
	}
	if key.nkey != signer.nkey {
		r.reject(ctx, m, RejectKey, fmt.Errorf("%w: node %s is bound to %s, heartbeat signed by %s", ErrKeyNotBound, hb.Node, key.nkey, signer.nkey))
		return
	}
	if err := r.apply(&hb, at); err != nil {
		r.reject(ctx, m, RejectReplayed, err)
		return
	}
	r.metrics.accept(ctx)
}

// boundKey is the key a node id is bound to, parsed once.
type boundKey struct {
	nkey string
	key  nodesig.PublicKey
}

// bindKey binds node to key in KV nodekeys unless it is bound already, and
// returns the key the node is bound to.
func (r *Registry) bindKey(ctx context.Context, node string, key boundKey) (boundKey, error) {
	_, err := r.keys.Create(ctx, node, []byte(key.nkey))
	if errors.Is(err, jetstream.ErrKeyExists) {
		e, gerr := r.keys.Get(ctx, node)
		if gerr != nil {
			return boundKey{}, gerr
		}
		if string(e.Value()) != key.nkey {
			pk, perr := nodesig.ParsePublicKey(string(e.Value()))
			if perr != nil {
				return boundKey{}, fmt.Errorf("bound key of node %s: %w", node, perr)
			}
			key = boundKey{nkey: string(e.Value()), key: pk}
		}
	} else if err != nil {
		return boundKey{}, err
	} else {
		r.log.Info("node key bound", "node", node, "key", key.nkey)
	}
	r.mu.Lock()
	r.bound[node] = key
	r.mu.Unlock()
	return key, nil
}

// validStates are the states a heartbeat may report.
var validStates = map[string]bool{
	wire.NodeStarting: true, wire.NodeReady: true, wire.NodeDraining: true, wire.NodeDegraded: true,
	wire.NodeQuarantined: true, wire.NodeStopped: true,
}

// checkHeartbeat checks what the typed decoder cannot: required fields,
// tokens, enumerations and ranges (the schema's rules that the registry
// relies on), cheaply enough for every heartbeat.
func checkHeartbeat(hb *wire.Heartbeat) error {
	var errs []string
	if err := subjects.Token(hb.Node); err != nil {
		errs = append(errs, "node: "+err.Error())
	}
	if err := subjects.Token(hb.Supplier); err != nil {
		errs = append(errs, "supplier: "+err.Error())
	}
	if hb.PublicKey == "" {
		errs = append(errs, "public_key is missing")
	}
	if hb.Time.IsZero() {
		errs = append(errs, "time is missing")
	}
	if hb.IntervalMS < 1 {
		errs = append(errs, fmt.Sprintf("interval_ms %d is below 1", hb.IntervalMS))
	}
	if !validStates[hb.State] {
		errs = append(errs, fmt.Sprintf("state %q is not one of starting, ready, draining, degraded, quarantined, stopped", hb.State))
	}
	if hb.KVTokensFree < 0 || hb.QueueDepth < 0 || hb.Sessions < 0 || hb.Fetch.BytesDone < 0 || hb.Fetch.BytesTotal < 0 {
		errs = append(errs, "kv_tokens_free, queue_depth and fetch must not be negative")
	}
	for i, d := range hb.Devices {
		if d.Kind != "gpu" && d.Kind != "cpu" {
			errs = append(errs, fmt.Sprintf("devices[%d].kind %q is not gpu or cpu", i, d.Kind))
		}
		if d.Utilization < 0 || d.Utilization > 100 {
			errs = append(errs, fmt.Sprintf("devices[%d].utilization_pct %g is outside 0..100", i, d.Utilization))
		}
	}
	for i, s := range hb.Speed {
		if s.DecodeTokS < 0 || s.PrefillTokS < 0 {
			errs = append(errs, fmt.Sprintf("speed[%d] is negative", i))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %s", ErrInvalidHeartbeat, strings.Join(errs, "; "))
	}
	return nil
}

// reject logs, dead-letters and counts a refused heartbeat.
func (r *Registry) reject(ctx context.Context, m *nats.Msg, reason string, err error) {
	defer r.metrics.rejected(ctx, reason)
	r.log.Warn("heartbeat rejected", "subject", m.Subject, "reason", reason, "err", err)
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if derr := bus.DeadLetter(dctx, r.bus.JS, "registry", reason, err, m, 0); derr != nil {
		r.log.Error("dead letter failed", "err", derr)
	}
}
