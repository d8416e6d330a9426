package node

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/spool"
)

// sessionKey identifies one request's state on one layer range.
type sessionKey struct {
	request    string
	model      string
	first, end int
	// experts marks the session of the request's expert requests, which
	// has no range (first and end are -1) and no KV cache.
	experts bool
}

// expertSessionKey is the key of request's expert session for model.
func expertSessionKey(request, model string) sessionKey {
	return sessionKey{request: request, model: model, first: -1, end: -1, experts: true}
}

// session is one request's KV cache and usage on this node.
type session struct {
	key      sessionKey
	cache    *compute.Cache
	customer string
	last     time.Time
	// mu guards usage and trace: a release may publish a session's usage
	// while its last job is still being accounted.
	mu    sync.Mutex
	usage wire.UsageEvent
	// trace is the trace context of the request's first stage request on
	// this node; its usage event carries it to settlement.
	trace trace.SpanContext
	// cacheBytes is the cache's size, stored by the runner after each
	// forward pass so that Status can read it while the cache grows.
	cacheBytes atomic.Int64
	// paused is a pass stopped at a split layer, waiting for its experts'
	// outputs (guarded by the node's mu).
	paused *pause
	// expertLayers is the lowest and highest layer an expert session
	// computed (guarded by mu).
	expertLayers [2]int
}

// pause is a pass stopped after the trunk of layer, holding the residual
// of its rows until the experts' outputs resume it.
type pause struct {
	layer    int
	pos      int
	rows     int
	residual []float32
}

// expertSession returns the expert session of request for model,
// creating it on first use (for an expert of layer).
func (n *Node) expertSession(request, model, customer string, origin trace.SpanContext, layer int) *session {
	return n.openSession(expertSessionKey(request, model), customer, origin, func(se *session) {
		se.expertLayers = [2]int{layer, layer}
	})
}

// accountExperts adds experts of layer applied for the request to the
// session's usage: their arithmetic and time, and a message when they were
// asked for by one (a stage node's own experts come with its stage
// message). Its tokens are billed by the stage with the head, like every
// other stage's.
func (se *session) accountExperts(layer int, flops int64, took time.Duration, message bool) {
	se.mu.Lock()
	defer se.mu.Unlock()
	u := &se.usage
	if message {
		u.Messages++
	}
	u.FLOPs += flops
	u.ComputeUS += took.Microseconds()
	u.End = time.Now().UTC()
	se.expertLayers[0] = min(se.expertLayers[0], layer)
	se.expertLayers[1] = max(se.expertLayers[1], layer)
}

// session returns j's session, creating it on first use.
func (n *Node) session(j *job, man wire.ModelManifest) *session {
	key := sessionKey{request: j.request, model: j.model, first: j.first, end: j.end}
	return n.openSession(key, j.customer, j.origin, func(se *session) {
		se.cache = compute.NewCache(man.Config, j.end-j.first)
	})
}

// openSession returns the session of key, creating it (set up by init) on
// first use, and notes its trace context and its last use.
func (n *Node) openSession(key sessionKey, customer string, origin trace.SpanContext, init func(*session)) *session {
	n.mu.Lock()
	defer n.mu.Unlock()
	se := n.sessions[key]
	if se == nil {
		se = &session{key: key, customer: customer}
		init(se)
		se.usage.Start = time.Now().UTC()
		// A job queued before its request's release runs on a session
		// that is not kept.
		if _, done := n.released[key.request]; !done {
			n.sessions[key] = se
		}
	}
	se.mu.Lock()
	if !se.trace.IsValid() {
		se.trace = origin
	}
	se.mu.Unlock()
	se.last = time.Now()
	return se
}

// account adds one served stage message to the session's usage: w says
// which layers it computed whole, which only up to the feed-forward
// network (run on expert holders, who bill it), and whether the pass ended.
func (se *session) account(j *job, took time.Duration, man wire.ModelManifest, w passWork) {
	se.mu.Lock()
	defer se.mu.Unlock()
	u := &se.usage
	rows := int64(j.rows)
	cfg := man.Config
	// Tokens are the customer's bill: only the stage with the head counts
	// them, so that a request crossing several stages is billed once. Every
	// stage counts its layer-tokens, the supplier's pay.
	// A pass through the head yields one new token; a prompt's rows are
	// prompt tokens, while rows re-run after a failover (phase "recompute")
	// are not billed again.
	head := w.final && j.end == cfg.Layers
	if head {
		if j.phase == wire.PhasePrefill {
			u.PromptTokens += rows
		}
		u.GeneratedTokens++
	}
	u.LayerTokens += rows * int64(w.whole+w.trunks)
	u.Messages++
	perLayer := (model.FLOPsPerToken(cfg) - 2*int64(cfg.Vocab)*int64(cfg.Dim)) / int64(cfg.Layers)
	if groups := man.ExpertGroups(); groups > 0 && cfg.Experts == 0 {
		// A dense FFN cut into groups computes only its active groups.
		perLayer = trunkFLOPs(cfg, groups) + int64(compute.ActiveExperts(cfg))*6*int64(cfg.Dim)*int64(cfg.HiddenDim/groups)
	}
	u.FLOPs += rows * (int64(w.whole)*perLayer + int64(w.trunks)*trunkFLOPs(cfg, man.ExpertGroups()))
	u.FLOPs += w.compFLOPs
	if head {
		logitRows := int64(1)
		if j.logits == "all" {
			logitRows = rows
		}
		u.FLOPs += logitRows * 2 * int64(cfg.Vocab) * int64(cfg.Dim)
	}
	u.ComputeUS += took.Microseconds()
	u.End = time.Now().UTC()
}

// trunkFLOPs is one row's arithmetic in the trunk of a split layer: the
// attention projections and the scores of the layer's expert groups.
func trunkFLOPs(cfg wire.ModelConfig, groups int) int64 {
	d, kv := int64(cfg.Dim), int64(compute.KVDim(cfg))
	return 2 * (2*d*d + 2*kv*d + int64(groups)*d)
}

// onRelease frees every cache of a finished request and publishes its usage.
func (n *Node) onRelease(msg *nats.Msg) {
	var c wire.Control
	if err := wire.Decode(msg.Data, &c); err != nil || c.Op != "release" || subjects.Token(c.Request) != nil {
		if err == nil {
			err = fmt.Errorf("want op release with a request id, got %+v", c)
		}
		n.deadLetter(msg, "bad_release", err)
		return
	}
	n.mu.Lock()
	n.released[c.Request] = time.Now()
	n.mu.Unlock()
	n.release(func(k sessionKey) bool { return k.request == c.Request }, "request finished")
}

// onControl handles control messages addressed to this node.
func (n *Node) onControl(msg *nats.Msg) {
	var c wire.Control
	if err := wire.Decode(msg.Data, &c); err != nil {
		n.deadLetter(msg, "bad_control", err)
		return
	}
	switch c.Op {
	case "release":
		n.release(func(k sessionKey) bool { return k.request == c.Request }, "request finished")
	case "drain":
		n.SetDraining()
	case "ping":
		// Liveness: the router asks while it waits on a slow answer.
		if msg.Reply != "" {
			_ = msg.Respond([]byte(fmt.Sprintf(`{"ok":true,"sessions":%d}`, n.Sessions())))
		}
		return
	default:
		n.deadLetter(msg, "bad_control", fmt.Errorf("unknown op %q", c.Op))
		return
	}
	if msg.Reply != "" {
		_ = msg.Respond([]byte(`{"ok":true}`))
	}
}

// release removes the sessions match selects and publishes their usage.
func (n *Node) release(match func(sessionKey) bool, why string) {
	n.mu.Lock()
	var done []*session
	for k, se := range n.sessions {
		if match(k) {
			done = append(done, se)
			delete(n.sessions, k)
		}
	}
	n.trimUnused()
	n.mu.Unlock()
	if len(done) > 0 {
		n.publishUsage(done, why)
	}
}

// releaseAll releases every session (at shutdown).
func (n *Node) releaseAll(why string) {
	n.release(func(sessionKey) bool { return true }, why)
}

// reapIdle releases sessions that saw no traffic for SessionIdle (their
// requester vanished), so caches never leak.
func (n *Node) reapIdle(ctx context.Context) {
	t := time.NewTicker(n.opts.SessionIdle / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			cut := time.Now().Add(-n.opts.SessionIdle)
			n.mu.Lock()
			for req, at := range n.released {
				if at.Before(cut) {
					delete(n.released, req)
				}
			}
			var idle []sessionKey
			for k, se := range n.sessions {
				if se.last.Before(cut) {
					idle = append(idle, k)
				}
			}
			n.mu.Unlock()
			if len(idle) > 0 {
				set := map[sessionKey]bool{}
				for _, k := range idle {
					set[k] = true
				}
				n.release(func(k sessionKey) bool { return set[k] }, "idle")
			} else {
				n.mu.Lock()
				n.trimUnused()
				n.mu.Unlock()
			}
		}
	}
}

// Sessions is the number of open request sessions (KV caches held).
func (n *Node) Sessions() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.sessions)
}

// usageID is the event id of a session's usage: stable, so that a
// re-publish is de-duplicated by the stream.
func usageID(node string, k sessionKey) string {
	h := sha256.Sum256([]byte(fmt.Sprintf("%s|%s|%s|%d|%d", k.request, node, k.model, k.first, k.end)))
	return hex.EncodeToString(h[:16])
}

// publishUsage spools one usage event per session, signed as a batch, and
// publishes them in the background (Run waits for them before it returns).
func (n *Node) publishUsage(done []*session, why string) {
	events := make([]*wire.UsageEvent, 0, len(done))
	traces := make([]trace.SpanContext, 0, len(done))
	for _, se := range done {
		se.mu.Lock()
		u, tc := se.usage, se.trace
		se.mu.Unlock()
		traces = append(traces, tc)
		u.ID = usageID(n.opts.ID, se.key)
		u.Request = se.key.request
		u.Customer = se.customer
		if u.Customer == "" {
			u.Customer = "anonymous"
		}
		u.Supplier = n.opts.Supplier
		u.Node = n.opts.ID
		u.Model = se.key.model
		u.Fragment = fmt.Sprintf("layers[%d,%d)", se.key.first, se.key.end)
		if se.key.experts {
			se.mu.Lock()
			u.Fragment = fmt.Sprintf("experts of layers[%d,%d]", se.expertLayers[0], se.expertLayers[1])
			se.mu.Unlock()
		}
		u.DeviceType = n.opts.DeviceType
		if u.End.IsZero() {
			u.End = u.Start
		}
		if n.opts.Signer != nil {
			u.PublicKey = n.opts.Signer.PublicKey()
		}
		events = append(events, &u)
	}
	if n.opts.Signer != nil {
		if err := n.opts.Signer.SignUsage(events); err != nil {
			n.log.Error("usage not signed", "err", err)
		}
	}
	entries := make([]spool.Entry, 0, len(events))
	for i, u := range events {
		b, err := json.Marshal(u)
		if err != nil {
			n.log.Error("usage event not encoded", "id", u.ID, "err", err)
			continue
		}
		entries = append(entries, spool.Entry{ID: u.ID, Data: b, Header: traceHeaders(traces[i])})
	}
	// On disk before it leaves: a crash from here on loses nothing. The
	// release returns once the events are on disk; they are published in
	// the background, so that releases queued behind this one (each
	// holding usage only in memory) are not held up while the stream is
	// slow to acknowledge, as it is while a NATS server fails over.
	if n.opts.Spool != nil {
		if err := n.opts.Spool.Append(entries...); err != nil {
			n.log.Error("usage not spooled; publishing it without a copy on disk", "events", len(entries), "err", err)
		}
	}
	n.publishing.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), n.opts.PublishTimeout)
		defer cancel()
		for _, e := range entries {
			if err := n.publishEntry(ctx, e); err != nil {
				n.log.Error("usage event not published yet; it stays spooled", "id", e.ID, "err", err)
			}
		}
		n.log.Debug("usage published", "events", len(entries), "why", why)
	})
}
