package node

import (
	"context"
	"fmt"
	"slices"
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
	// split lists the layers whose feed-forward networks the requester
	// computes on expert holders: the pass pauses at each (HdrSplit).
	split []int
	// resume is set on a request that continues a paused pass: the layer
	// it paused at, and sum its rows' expert outputs (rows×dim).
	resume   bool
	layer    int
	sum      []float32
	received time.Time
	ctx      context.Context
	span     trace.Span
	// origin is the requester's trace context, as the request carried it.
	origin trace.SpanContext
}

// runner owns one compute.Stage (a layer range of a model) and runs its
// queued jobs in batches on one goroutine.
type runner struct {
	stopper
	stage *compute.Stage
	queue chan *job
}

// stopper is a runner's stop signal: done closes once, on the first stop.
type stopper struct {
	done chan struct{}
}

func newStopper() stopper { return stopper{done: make(chan struct{})} }

func (s *stopper) stop() {
	select {
	case <-s.done:
	default:
		close(s.done)
	}
}

// parseStage reads a stage request's headers and frame.
func parseStage(msg *nats.Msg) (*job, error) {
	h := msg.Header
	j := &job{msg: msg, received: time.Now()}
	var err error
	if j.request, j.model, j.customer, j.phase, err = parseWork(h); err != nil {
		return nil, err
	}
	j.logits = h.Get(wire.HdrLogits)
	pos, err := strconv.Atoi(h.Get(wire.HdrPos))
	if err != nil || pos < 0 {
		return nil, fmt.Errorf("header %s=%q: want a position >= 0", wire.HdrPos, h.Get(wire.HdrPos))
	}
	j.pos = pos
	j.first, j.end, err = parseRange(h.Get(wire.HdrRange))
	if err != nil {
		return nil, err
	}
	if j.split, err = parseSplit(h.Get(wire.HdrSplit), j.first, j.end); err != nil {
		return nil, err
	}
	switch op := h.Get(wire.HdrOp); op {
	case "":
	case wire.OpResume:
		j.resume = true
		j.layer, err = strconv.Atoi(h.Get(wire.HdrLayer))
		if err != nil || !slices.Contains(j.split, j.layer) {
			return nil, fmt.Errorf("header %s=%q: a resumed pass names one of its split layers %v", wire.HdrLayer, h.Get(wire.HdrLayer), j.split)
		}
	default:
		return nil, fmt.Errorf("header %s=%q: want empty or %s", wire.HdrOp, op, wire.OpResume)
	}
	f, err := wire.DecodeFrame(msg.Data)
	if err != nil {
		return nil, err
	}
	if j.resume {
		if f.DType != wire.F32 || f.Rows == 0 {
			return nil, fmt.Errorf("%w: a resumed pass carries f32 expert outputs", wire.ErrFrame)
		}
		if j.sum, err = f.F32(nil); err != nil {
			return nil, err
		}
		j.rows = f.Rows
		return j, nil
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

// parseWork reads the headers every stage and expert request carries: its
// request, model, customer and phase.
func parseWork(h nats.Header) (request, model, customer, phase string, err error) {
	request, model, customer, phase = h.Get(wire.HdrRequest), h.Get(wire.HdrModel), h.Get(wire.HdrCustomer), h.Get(wire.HdrPhase)
	if err := subjects.Token(request); err != nil {
		return "", "", "", "", fmt.Errorf("header %s: %w", wire.HdrRequest, err)
	}
	if err := subjects.Token(model); err != nil {
		return "", "", "", "", fmt.Errorf("header %s: %w", wire.HdrModel, err)
	}
	switch phase {
	case wire.PhasePrefill, wire.PhaseDecode, wire.PhaseRecompute:
	default:
		return "", "", "", "", fmt.Errorf("header %s=%q: want %s, %s or %s", wire.HdrPhase, phase, wire.PhasePrefill, wire.PhaseDecode, wire.PhaseRecompute)
	}
	return request, model, customer, phase, nil
}

// parseSplit reads HdrSplit: ascending layers inside [first, end).
func parseSplit(s string, first, end int) ([]int, error) {
	if s == "" {
		return nil, nil
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		l, err := strconv.Atoi(f)
		if err != nil || l < first || l >= end || (len(out) > 0 && l <= out[len(out)-1]) {
			return nil, fmt.Errorf("header %s=%q: want ascending layers inside [%d,%d)", wire.HdrSplit, s, first, end)
		}
		out = append(out, l)
	}
	return out, nil
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
	enqueue(n, r.queue, r.done, j, j.span, msg.Reply, j.request, fmt.Sprintf("layers [%d,%d)", j.first, j.end))
}

// enqueue puts j on a runner's queue, counting it as queued and in flight,
// or answers "overloaded" when the node's queue is full and "not loaded"
// when the runner (which computes what was called what) has stopped.
func enqueue[J any](n *Node, queue chan<- J, done <-chan struct{}, j J, span trace.Span, reply, request, what string) {
	if n.queued.Load() >= int64(n.opts.QueueLimit) {
		span.End()
		n.respondError(reply, request, replyErr(wire.ErrCodeOverloaded, "queue full (%d requests)", n.opts.QueueLimit))
		return
	}
	n.queued.Add(1)
	n.inflight.Add(1)
	select {
	case queue <- j:
	case <-done:
		n.queued.Add(-1)
		n.inflight.Done()
		span.End()
		n.respondError(reply, request, replyErr(wire.ErrCodeNotLoaded, "%s were unloaded", what))
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
	if se := n.sessions[key]; j.resume && (se == nil || se.paused == nil) {
		// Nothing to resume (the node restarted, or the pass was replaced):
		// the requester re-runs the prefix.
		return nil, replyErr(wire.ErrCodeKVMiss, "no pass paused at layer %d for request %s", j.layer, j.request)
	}
	if err := m.holds(j.first, j.end); err != nil {
		return nil, replyErr(wire.ErrCodeNotLoaded, "%s: %v", n.opts.ID, err)
	}
	if !j.resume && (j.first == 0) != (j.tokens != nil) {
		return nil, replyErr(wire.ErrCodeBadRequest, "range [%d,%d) needs %s input", j.first, j.end, map[bool]string{true: "token", false: "hidden-state"}[j.first == 0])
	}
	if in := j.hidden; in != nil || j.sum != nil {
		if in == nil {
			in = j.sum
		}
		if len(in) != j.rows*m.manifest.Config.Dim {
			return nil, replyErr(wire.ErrCodeBadRequest, "frame has %d values, want rows×%d", len(in), m.manifest.Config.Dim)
		}
	}
	groups := m.manifest.ExpertGroups()
	if len(j.split) > 0 && groups == 0 {
		return nil, replyErr(wire.ErrCodeBadRequest, "model %s has no expert groups to split", j.model)
	}
	for l := j.first; l < j.end && groups > 0; l++ {
		if !slices.Contains(j.split, l) && !m.holdsExperts(l) {
			return nil, replyErr(wire.ErrCodeNotLoaded, "%s does not hold every expert of layer %d", n.opts.ID, l)
		}
	}
	rk := [2]int{j.first, j.end}
	if r := m.runners[rk]; r != nil {
		return r, nil
	}
	layers := make([]*compute.Layer, 0, j.end-j.first)
	for l := j.first; l < j.end; l++ {
		layer := m.layers[l]
		if groups > 0 {
			// The stage's copy of the layer carries the experts held here;
			// the others run on their holders.
			c := *layer
			c.Experts = make([]*compute.Expert, groups)
			for e := range c.Experts {
				c.Experts[e] = m.experts[[2]int{l, e}].w
			}
			layer = &c
		}
		layers = append(layers, layer)
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
	r := &runner{stopper: newStopper(), stage: st, queue: make(chan *job, n.opts.QueueLimit)}
	m.runners[rk] = r
	go n.runBatches(r, m.manifest)
	return r, nil
}

// stopRunners stops every runner after its queue is empty.
func (n *Node) stopRunners() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, m := range n.models {
		m.stopRunners()
	}
}

// runBatches takes jobs off r's queue and runs them in batches of up to
// MaxBatch, never two jobs of one request in the same batch, and only
// jobs that can share a pass (samePass).
func (n *Node) runBatches(r *runner, man wire.ModelManifest) {
	items := make([]*compute.Item, 0, n.opts.MaxBatch)
	runQueue(r.queue, r.done, n.opts.MaxBatch,
		func(batch []*job, j *job) bool { return !containsRequest(batch, j.request) && samePass(batch[0], j) },
		func(batch []*job) { n.runBatch(r, man, batch, items) })
}

// runQueue runs the jobs of queue in batches of up to max: a batch takes
// what is queued at once, and a job that does not fit the batch (fits
// says) waits for a later one, ahead of the queue. Once done is closed it
// runs what is still queued, one job at a time, and returns.
func runQueue[J any](queue <-chan J, done <-chan struct{}, max int, fits func(batch []J, j J) bool, run func(batch []J)) {
	batch := make([]J, 0, max)
	var deferred []J
	for {
		batch = batch[:0]
		if len(deferred) > 0 {
			batch = append(batch, deferred[0])
			deferred = deferred[1:]
		} else {
			select {
			case j := <-queue:
				batch = append(batch, j)
			case <-done:
				// Finish what is queued, then stop.
				for {
					select {
					case j := <-queue:
						run([]J{j})
					default:
						return
					}
				}
			}
		}
	fill:
		for len(batch) < max {
			select {
			case j := <-queue:
				if !fits(batch, j) {
					deferred = append(deferred, j)
					continue
				}
				batch = append(batch, j)
			default:
				break fill
			}
		}
		run(batch)
	}
}

// samePass reports whether two jobs can run in one pass: both whole, or
// both pausing at the same layers and starting at the same point.
func samePass(a, b *job) bool {
	return slices.Equal(a.split, b.split) && a.resume == b.resume && a.layer == b.layer
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
	if len(batch[0].split) > 0 {
		n.runSplit(r, man, batch, sessions, items)
		return
	}
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
			n.finish(j, sessions[i], items[i], time.Since(start), man, passWork{whole: j.end - j.first, final: true})
		}
		return
	}
	rows := 0
	for _, j := range batch {
		rows += j.rows
	}
	for i, j := range batch {
		// Share the batch's time by rows.
		n.finish(j, sessions[i], items[i], elapsed*time.Duration(j.rows)/time.Duration(rows), man, passWork{whole: j.end - j.first, final: true})
	}
}

// finish accounts a job's usage and answers the requester with the
// stage's output: logits when the stage holds the head, else the hidden
// state for the next stage (the requester, not this node, sends it on).
func (n *Node) finish(j *job, se *session, it *compute.Item, took time.Duration, man wire.ModelManifest, w passWork) {
	defer j.span.End()
	w.compFLOPs, it.CompFLOPs = it.CompFLOPs, 0
	se.account(j, took, man, w)
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
