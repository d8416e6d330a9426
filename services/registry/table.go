package registry

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// entry is the registry's in-memory state of one live node.
type entry struct {
	rec      wire.NodeRecord
	interval time.Duration
	lastSeen time.Time
	// seen counts accepted heartbeats; sinceWrite those since the record
	// was last written; material fingerprints what a write must not miss.
	seen       int
	sinceWrite int
	material   uint64
	stored     bool
	// quarantine is the reason the node failed its last challenge ("" when
	// it passed or was never challenged).
	quarantine string
	challenge  challengeState
}

// apply updates the node's entry with an accepted heartbeat and writes its
// record and membership events as needed. It fails for a heartbeat that is
// not newer than the last one accepted (a replay).
func (r *Registry) apply(hb *wire.Heartbeat, now time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.nodes[hb.Node]
	if e != nil && !hb.Time.After(e.rec.Heartbeat.Time) && hb.Seq <= e.rec.Heartbeat.Seq {
		return fmt.Errorf("%w: node %s heartbeat seq %d at %s, last accepted seq %d at %s", ErrReplayed,
			hb.Node, hb.Seq, hb.Time.Format(time.RFC3339Nano), e.rec.Heartbeat.Seq, e.rec.Heartbeat.Time.Format(time.RFC3339Nano))
	}
	// A node that left may only come back with a heartbeat made after its
	// last one: an old heartbeat replayed cannot bring it back.
	if last, ok := r.lastBeat[hb.Node]; e == nil && ok && !hb.Time.After(last) {
		return fmt.Errorf("%w: node %s heartbeat of %s, it has sent one of %s already", ErrReplayed,
			hb.Node, hb.Time.Format(time.RFC3339Nano), last.Format(time.RFC3339Nano))
	}
	r.lastBeat[hb.Node] = hb.Time
	if hb.State == wire.NodeStopped {
		if e != nil {
			r.remove(hb.Node, "stopped")
		}
		return nil
	}
	joined := e == nil
	if joined {
		e = &entry{rec: wire.NodeRecord{JoinedAt: now}}
		r.nodes[hb.Node] = e
	}
	prevState := e.rec.Heartbeat.State
	e.rec.Heartbeat = *hb
	e.rec.LastSeen = now
	e.interval = time.Duration(hb.IntervalMS) * time.Millisecond
	e.lastSeen = now
	e.seen++
	e.sinceWrite++
	r.setState(e)
	mat := materialOf(&e.rec)
	if joined || mat != e.material || !e.stored || e.sinceWrite >= r.cfg.RefreshBeats {
		e.material = mat
		r.store(e)
	}
	switch {
	case joined:
		r.event(hb.Node, wire.MemberJoined, "")
		if hb.State == wire.NodeDraining || hb.State == wire.NodeDegraded {
			r.event(hb.Node, hb.State, "")
		}
	case prevState != hb.State && hb.State == wire.NodeDraining:
		r.event(hb.Node, wire.MemberDraining, "")
	case prevState != hb.State && hb.State == wire.NodeDegraded:
		r.event(hb.Node, wire.MemberDegraded, "")
	}
	r.challenges.noticeLocked(e, now)
	return nil
}

// setState derives the record's state: a failed challenge overrides what
// the node says about itself.
func (r *Registry) setState(e *entry) {
	e.rec.State = e.rec.Heartbeat.State
	e.rec.QuarantineReason = e.quarantine
	if e.quarantine != "" {
		e.rec.State = wire.NodeQuarantined
	}
}

// materialOf fingerprints what consumers of KV nodes act on: everything but
// the sequence, the time, the signature and the telemetry that changes with
// every beat.
func materialOf(rec *wire.NodeRecord) uint64 {
	h := fnv.New64a()
	hb := &rec.Heartbeat
	str := func(ss ...string) {
		for _, s := range ss {
			_, _ = h.Write([]byte(s))
			_, _ = h.Write([]byte{0})
		}
	}
	num := func(v uint64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		_, _ = h.Write(b[:])
	}
	str(rec.State, rec.QuarantineReason, hb.Supplier, hb.Region, hb.PublicKey, hb.State)
	num(uint64(hb.IntervalMS))
	num(hb.MemoryBudget)
	// Busy or idle (not the count, which moves with every request).
	num(uint64(min(hb.Sessions, 1)))
	str(hb.Models...)
	str("|")
	str(hb.Fragments...)
	str("|")
	if hb.Fetch.BytesDone == hb.Fetch.BytesTotal {
		str("fetched")
	}
	for _, d := range hb.Devices {
		str(d.Kind, d.Name, d.UUID, d.Error)
		num(d.MemoryTotal)
	}
	for _, s := range hb.Speed {
		str(s.Model, s.DType, s.Device)
		num(math.Float64bits(s.DecodeTokS))
		num(math.Float64bits(s.PrefillTokS))
	}
	return h.Sum64()
}

// recordTTL is how long a record stays in KV nodes without being rewritten:
// long enough to cover RefreshBeats and MissedBeats, so that only a registry
// that stopped lets records expire (JetStream counts TTLs in whole seconds).
func (r *Registry) recordTTL(interval time.Duration) time.Duration {
	ttl := time.Duration((float64(r.cfg.RefreshBeats) + r.cfg.MissedBeats + 1) * float64(interval))
	return max(time.Second, ttl.Round(time.Second)+time.Second)
}

// store writes e's record into KV nodes asynchronously. Called with r.mu
// held, so that a node's writes and deletes reach the stream in order.
func (r *Registry) store(e *entry) {
	b, err := json.Marshal(&e.rec)
	if err != nil {
		r.log.Error("node record not encoded", "node", e.rec.Heartbeat.Node, "err", err)
		return
	}
	msg := nats.NewMsg(kvSubject(e.rec.Heartbeat.Node))
	msg.Data = b
	if _, err := r.js.PublishMsgAsync(msg, jetstream.WithMsgTTL(r.recordTTL(e.interval))); err != nil {
		r.log.Warn("node record not stored", "node", e.rec.Heartbeat.Node, "err", err)
		e.stored = false
		return
	}
	r.metrics.writes.Add(1)
	e.sinceWrite = 0
	e.stored = true
}

// kvSubject is the subject a KV nodes key is written on.
func kvSubject(node string) string { return "$KV." + subjects.BucketNodes + "." + node }

// publishFailed is told of every asynchronous publish that failed: a node
// record is written again with the node's next heartbeat.
func (r *Registry) publishFailed(m *nats.Msg, err error) {
	node, ok := strings.CutPrefix(m.Subject, kvSubject(""))
	if !ok {
		r.log.Warn("membership event not stored", "subject", m.Subject, "err", err)
		return
	}
	r.log.Warn("node record not stored", "node", node, "err", err)
	r.mu.Lock()
	if e := r.nodes[node]; e != nil {
		e.stored = false
	}
	r.mu.Unlock()
}

// remove forgets a node, deletes its record and announces that it left.
// Called with r.mu held.
func (r *Registry) remove(node, reason string) {
	delete(r.nodes, node)
	msg := nats.NewMsg(kvSubject(node))
	msg.Header.Set("KV-Operation", "DEL")
	if _, err := r.js.PublishMsgAsync(msg); err != nil {
		r.log.Warn("node record not deleted", "node", node, "err", err)
	}
	r.event(node, wire.MemberLeft, reason)
}

// sweep marks nodes silent for MissedBeats intervals as left, and returns
// how long to wait for the next sweep: SweepInterval, or a twentieth of the
// shortest interval among the nodes when that is less, so that no node's
// departure is noticed more than a twentieth of an interval late.
//
// A registry far behind on its heartbeats cannot tell a silent node from
// one whose heartbeats wait in its queue: it declares nobody left until it
// has caught up, rather than evicting live nodes en masse (whose rejoining
// would put it further behind).
func (r *Registry) sweep(now time.Time) time.Duration {
	pending := r.metrics.pending()
	r.mu.Lock()
	defer r.mu.Unlock()
	behind := pending > 1024+len(r.nodes)/2
	if behind != r.behind {
		r.behind = behind
		if behind {
			r.log.Warn("heartbeats queued; no node declared left until they are checked", "pending", pending)
		} else {
			r.log.Info("heartbeats caught up", "pending", pending)
		}
	}
	next := r.cfg.SweepInterval
	for id, e := range r.nodes {
		if silent := now.Sub(e.lastSeen); !behind && silent > time.Duration(r.cfg.MissedBeats*float64(e.interval)) {
			r.remove(id, fmt.Sprintf("no heartbeat for %s (%.1f intervals)", silent.Round(time.Millisecond), float64(silent)/float64(e.interval)))
			continue
		}
		next = min(next, e.interval/20)
	}
	return max(next, 5*time.Millisecond)
}

// event publishes a membership event. Called with r.mu held, so that a
// node's events are stored in the order they happened.
func (r *Registry) event(node, kind, reason string) {
	ev := wire.MembershipEvent{ID: nuid.Next(), Node: node, Kind: kind, Reason: reason, Time: time.Now().UTC()}
	b, err := json.Marshal(ev)
	if err != nil {
		r.log.Error("membership event not encoded", "err", err)
		return
	}
	msg := nats.NewMsg(subjects.Membership(node, kind))
	msg.Header.Set(wire.HdrMsgID, ev.ID)
	msg.Data = b
	if _, err := r.js.PublishMsgAsync(msg); err != nil {
		r.log.Warn("membership event not stored", "node", node, "kind", kind, "err", err)
		return
	}
	r.log.Info("membership", "node", node, "event", kind, "reason", reason)
}

// loadRecords takes over the records a previous registry left in KV nodes,
// so that a restart neither announces every node as joined again nor leaves
// records of nodes that went away meanwhile (the sweep removes them).
func (r *Registry) loadRecords(ctx context.Context) error {
	w, err := r.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("watch %s: %w", subjects.BucketNodes, err)
	}
	defer func() { _ = w.Stop() }()
	now := time.Now().UTC()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case kve, ok := <-w.Updates():
			if !ok {
				return errors.New("node watcher closed")
			}
			if kve == nil {
				return nil
			}
			var rec wire.NodeRecord
			if err := json.Unmarshal(kve.Value(), &rec); err != nil || rec.Heartbeat.IntervalMS <= 0 {
				r.log.Warn("ignoring undecodable node record", "key", kve.Key(), "err", err)
				continue
			}
			r.mu.Lock()
			e := &entry{rec: rec, interval: time.Duration(rec.Heartbeat.IntervalMS) * time.Millisecond, lastSeen: now, stored: true, quarantine: rec.QuarantineReason}
			e.material = materialOf(&e.rec)
			r.nodes[kve.Key()] = e
			r.mu.Unlock()
		}
	}
}
