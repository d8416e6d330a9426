package node

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// job is one stage request waiting for its forward pass.
type job struct {
	msg      *nats.Msg
	request  string
	model    string
	customer string
	phase    string
	pos      int
	first    int
	end      int
	logits   string
	tokens   []int32
	hidden   []float32
	rows     int
	received time.Time
	ctx      context.Context
	span     trace.Span
	// origin is the requester's trace context, as the request carried it.
	origin trace.SpanContext
}

// runner owns one compute.Stage (a layer range of a model) and runs its
// queued jobs in batches on one goroutine.
type runner struct {
	stage *compute.Stage
	queue chan *job
	done  chan struct{}
}

func (r *runner) stop() {
	select {
	case <-r.done:
	default:
		close(r.done)
	}
}

// parseStage reads a stage request's headers and frame.
func parseStage(msg *nats.Msg) (*job, error) {
	h := msg.Header
	j := &job{msg: msg, received: time.Now()}
	j.request = h.Get(wire.HdrRequest)
	j.model = h.Get(wire.HdrModel)
	j.customer = h.Get(wire.HdrCustomer)
	j.phase = h.Get(wire.HdrPhase)
	j.logits = h.Get(wire.HdrLogits)
	if err := subjects.Token(j.request); err != nil {
		return nil, fmt.Errorf("header %s: %w", wire.HdrRequest, err)
	}
	if err := subjects.Token(j.model); err != nil {
		return nil, fmt.Errorf("header %s: %w", wire.HdrModel, err)
	}
	switch j.phase {
	case wire.PhasePrefill, wire.PhaseDecode, wire.PhaseRecompute:
	default:
		return nil, fmt.Errorf("header %s=%q: want %s, %s or %s", wire.HdrPhase, j.phase, wire.PhasePrefill, wire.PhaseDecode, wire.PhaseRecompute)
	}
	pos, err := strconv.Atoi(h.Get(wire.HdrPos))
	if err != nil || pos < 0 {
		return nil, fmt.Errorf("header %s=%q: want a position >= 0", wire.HdrPos, h.Get(wire.HdrPos))
	}
	j.pos = pos
	j.first, j.end, err = parseRange(h.Get(wire.HdrRange))
	if err != nil {
		return nil, err
	}
	f, err := wire.DecodeFrame(msg.Data)
	if err != nil {
		return nil, err
	}
	switch f.DType {
	case wire.I32:
		if j.tokens, err = f.I32(nil); err != nil {
			return nil, err
		}
		j.rows = len(j.tokens)
	case wire.F32:
		if j.hidden, err = f.F32(nil); err != nil {
			return nil, err
		}
		j.rows = f.Rows
	}
	if j.rows == 0 {
		return nil, fmt.Errorf("%w: no rows", wire.ErrFrame)
	}
	return j, nil
}

func parseRange(s string) (int, int, error) {
	a, b, ok := strings.Cut(s, ":")
	first, err1 := strconv.Atoi(a)
	end, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || first < 0 || end <= first {
		return 0, 0, fmt.Errorf("header %s=%q: want first:end with first < end", wire.HdrRange, s)
	}
	return first, end, nil
}

// onStage takes a stage request: malformed ones are dead-lettered and
// answered with an error; good ones are queued on their range's runner.
func (n *Node) onStage(msg *nats.Msg) {
	j, err := parseStage(msg)
	if err != nil {
		n.deadLetter(msg, "bad_stage_request", err)
		n.respondError(msg.Reply, msg.Header.Get(wire.HdrRequest), replyErr(wire.ErrCodeBadRequest, "%v", err))
		return
	}
	ctx := telemetry.Extract(context.Background(), msg)
	j.origin = trace.SpanContextFromContext(ctx)
	j.ctx, j.span = otel.Tracer("tessera/executor").Start(ctx, "executor.stage",
		trace.WithAttributes(attribute.String("node", n.opts.ID), attribute.String("request", j.request),
			attribute.String("range", fmt.Sprintf("[%d,%d)", j.first, j.end)), attribute.Int("rows", j.rows)))
	r, err := n.runnerFor(j)
	if err != nil {
		j.span.End()
		n.respondError(msg.Reply, j.request, err)
		return
	}
	if n.queued.Load() >= int64(n.opts.QueueLimit) {
		j.span.End()
		n.respondError(msg.Reply, j.request, replyErr(wire.ErrCodeOverloaded, "queue full (%d requests)", n.opts.QueueLimit))
		return
	}
	n.queued.Add(1)
	n.inflight.Add(1)
	select {
	case r.queue <- j:
	case <-r.done:
		n.queued.Add(-1)
		n.inflight.Done()
		j.span.End()
		n.respondError(msg.Reply, j.request, replyErr(wire.ErrCodeNotLoaded, "layers [%d,%d) were unloaded", j.first, j.end))
	}
}

func (n *Node) deadLetter(msg *nats.Msg, reason string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if derr := bus.DeadLetter(ctx, n.bus.JS, "executor", reason, err, msg, 0); derr != nil {
		n.log.Error("dead letter failed", "err", derr)
	}
}

// runnerFor returns the runner of j's model and range, starting one.
func (n *Node) runnerFor(j *job) (*runner, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.models[j.model]
	if m == nil {
		return nil, replyErr(wire.ErrCodeNotLoaded, "model %q not loaded on %s", j.model, n.opts.ID)
	}
	if j.end > m.manifest.Config.Layers {
		return nil, replyErr(wire.ErrCodeBadRequest, "range [%d,%d) outside the model's %d layers", j.first, j.end, m.manifest.Config.Layers)
	}
	key := sessionKey{request: j.request, model: j.model, first: j.first, end: j.end}
	if _, done := n.released[j.request]; done {
		return nil, replyErr(wire.ErrCodeBadRequest, "request %s has ended", j.request)
	}
	if n.draining && n.sessions[key] == nil {
		return nil, replyErr(wire.ErrCodeDraining, "node %s is draining", n.opts.ID)
	}
	if err := m.holds(j.first, j.end); err != nil {
		return nil, replyErr(wire.ErrCodeNotLoaded, "%s: %v", n.opts.ID, err)
	}
	if (j.first == 0) != (j.tokens != nil) {
		return nil, replyErr(wire.ErrCodeBadRequest, "range [%d,%d) needs %s input", j.first, j.end, map[bool]string{true: "token", false: "hidden-state"}[j.first == 0])
	}
	if j.hidden != nil && len(j.hidden) != j.rows*m.manifest.Config.Dim {
		return nil, replyErr(wire.ErrCodeBadRequest, "hidden frame has %d values, want rows×%d", len(j.hidden), m.manifest.Config.Dim)
	}
	rk := [2]int{j.first, j.end}
	if r := m.runners[rk]; r != nil {
		return r, nil
	}
	layers := make([]*compute.Layer, 0, j.end-j.first)
	for l := j.first; l < j.end; l++ {
		layers = append(layers, m.layers[l])
	}
	var emb *compute.Embedding
	var head *compute.Head
	if j.first == 0 {
		emb = m.embed
	}
	if j.end == m.manifest.Config.Layers {
		head = m.head
	}
	st, err := compute.NewStage(m.manifest.Config, j.first, j.end, emb, layers, head, n.pool)
	if err != nil {
		return nil, replyErr(wire.ErrCodeInternal, "%v", err)
	}
	r := &runner{stage: st, queue: make(chan *job, n.opts.QueueLimit), done: make(chan struct{})}
	m.runners[rk] = r
	go n.runBatches(r, m.manifest)
	return r, nil
}

// stopRunners stops every runner after its queue is empty.
func (n *Node) stopRunners() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, m := range n.models {
		for _, r := range m.runners {
			r.stop()
		}
	}
}

// runBatches takes jobs off r's queue and runs them in batches of up to
// MaxBatch, never two jobs of one request in the same batch.
func (n *Node) runBatches(r *runner, man wire.ModelManifest) {
	batch := make([]*job, 0, n.opts.MaxBatch)
	var deferred []*job
	items := make([]*compute.Item, 0, n.opts.MaxBatch)
	for {
		batch = batch[:0]
		if len(deferred) > 0 {
			batch = append(batch, deferred[0])
			deferred = deferred[1:]
		} else {
			select {
			case j := <-r.queue:
				batch = append(batch, j)
			case <-r.done:
				// Finish what is queued, then stop.
				for {
					select {
					case j := <-r.queue:
						n.runBatch(r, man, []*job{j}, items)
					default:
						return
					}
				}
			}
		}
	fill:
		for len(batch) < n.opts.MaxBatch {
			select {
			case j := <-r.queue:
				if containsRequest(batch, j.request) {
					deferred = append(deferred, j)
					continue
				}
				batch = append(batch, j)
			default:
				break fill
			}
		}
		n.runBatch(r, man, batch, items)
	}
}

func containsRequest(b []*job, req string) bool {
	for _, j := range b {
		if j.request == req {
			return true
		}
	}
	return false
}

func (n *Node) runBatch(r *runner, man wire.ModelManifest, batch []*job, items []*compute.Item) {
	defer func() {
		n.queued.Add(-int64(len(batch)))
		for range batch {
			n.inflight.Done()
		}
	}()
	items = items[:0]
	sessions := make([]*session, len(batch))
	for i, j := range batch {
		se := n.session(j, man)
		sessions[i] = se
		items = append(items, &compute.Item{Cache: se.cache, Pos: j.pos, N: j.rows, Tokens: j.tokens, Hidden: j.hidden, AllLogits: j.logits == "all"})
	}
	n.metrics.batchDone(len(batch))
	start := time.Now()
	err := r.stage.Forward(items)
	elapsed := time.Since(start)
	for _, se := range sessions {
		se.cacheBytes.Store(se.cache.Bytes())
	}
	if err != nil {
		// Run one by one so that a bad item fails alone.
		for i, j := range batch {
			start := time.Now()
			if err := r.stage.Forward(items[i : i+1]); err != nil {
				j.span.RecordError(err)
				j.span.End()
				n.respondError(j.msg.Reply, j.request, err)
				continue
			}
			n.finish(j, sessions[i], items[i], time.Since(start), man)
		}
		return
	}
	rows := 0
	for _, j := range batch {
		rows += j.rows
	}
	for i, j := range batch {
		// Share the batch's time by rows.
		n.finish(j, sessions[i], items[i], elapsed*time.Duration(j.rows)/time.Duration(rows), man)
	}
}

// finish accounts a job's usage and answers the requester with the
// stage's output: logits when the stage holds the head, else the hidden
// state for the next stage (the requester, not this node, sends it on).
func (n *Node) finish(j *job, se *session, it *compute.Item, took time.Duration, man wire.ModelManifest) {
	defer j.span.End()
	se.account(j, took, man)
	n.metrics.stageDone(j, took)
	if j.msg.Reply == "" {
		return
	}
	out := nats.NewMsg(j.msg.Reply)
	out.Header.Set(wire.HdrNode, n.opts.ID)
	if j.end == man.Config.Layers {
		rows := 1
		if it.AllLogits {
			rows = j.rows
		}
		out.Data = wire.AppendF32(make([]byte, 0, wire.FrameHeaderSize+4*len(it.Logits)), rows, man.Config.Vocab, it.Logits)
	} else {
		out.Data = wire.AppendF32(make([]byte, 0, wire.FrameHeaderSize+4*len(it.Hidden)), j.rows, man.Config.Dim, it.Hidden)
	}
	out.Header.Set(wire.HdrComputeUS, strconv.FormatInt(took.Microseconds(), 10))
	telemetry.Inject(j.ctx, out)
	if err := n.bus.NC.PublishMsg(out); err != nil {
		n.log.Warn("stage result not sent", "request", j.request, "err", err)
	}
}
