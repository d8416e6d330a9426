package node

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// expertJob is one expert request: rows of one layer, each with the
// experts of this node it chose and their weights (wire.Routed).
type expertJob struct {
	msg      *nats.Msg
	request  string
	model    string
	customer string
	phase    string
	layer    int
	routed   wire.Routed
	received time.Time
	ctx      context.Context
	span     trace.Span
	origin   trace.SpanContext
}

// expertRunner computes the queued expert requests of one layer of a
// model in batches, on one goroutine with its own workspace.
type expertRunner struct {
	stopper
	layer   int
	experts []*compute.Expert
	ws      *compute.Workspace
	queue   chan *expertJob
}

// parseExpertHeaders reads an expert request's headers; the payload is
// decoded once the model's shape is known.
func parseExpertHeaders(msg *nats.Msg) (*expertJob, error) {
	h := msg.Header
	j := &expertJob{msg: msg, received: time.Now()}
	var err error
	if j.request, j.model, j.customer, j.phase, err = parseWork(h); err != nil {
		return nil, err
	}
	l, err := strconv.Atoi(h.Get(wire.HdrLayer))
	if err != nil || l < 0 {
		return nil, fmt.Errorf("header %s=%q: want a layer index >= 0", wire.HdrLayer, h.Get(wire.HdrLayer))
	}
	j.layer = l
	return j, nil
}

// onExpert takes an expert request: malformed ones are dead-lettered and
// answered with an error; good ones are queued on their layer's runner.
func (n *Node) onExpert(msg *nats.Msg) {
	j, err := parseExpertHeaders(msg)
	if err == nil {
		err = n.decodeExpert(j)
	}
	if err != nil {
		var er *errReply
		if !errors.As(err, &er) {
			er = &errReply{code: wire.ErrCodeBadRequest, err: err}
		}
		if er.code == wire.ErrCodeBadRequest {
			n.deadLetter(msg, "bad_expert_request", er.err)
		}
		n.respondError(msg.Reply, msg.Header.Get(wire.HdrRequest), er)
		return
	}
	ctx := telemetry.Extract(context.Background(), msg)
	j.origin = trace.SpanContextFromContext(ctx)
	j.ctx, j.span = otel.Tracer("tessera/executor").Start(ctx, "executor.expert",
		trace.WithAttributes(attribute.String("node", n.opts.ID), attribute.String("request", j.request),
			attribute.Int("layer", j.layer), attribute.Int("rows", j.routed.Rows)))
	r, err := n.expertRunnerFor(j)
	if err != nil {
		j.span.End()
		n.respondError(msg.Reply, j.request, err)
		return
	}
	enqueue(n, r.queue, r.done, j, j.span, msg.Reply, j.request, fmt.Sprintf("experts of layer %d", j.layer))
}

// decodeExpert decodes j's payload against its model's shape.
func (n *Node) decodeExpert(j *expertJob) error {
	n.mu.Lock()
	m := n.models[j.model]
	n.mu.Unlock()
	if m == nil {
		return replyErr(wire.ErrCodeNotLoaded, "model %q not loaded on %s", j.model, n.opts.ID)
	}
	groups := m.manifest.ExpertGroups()
	if groups == 0 || j.layer >= m.manifest.Config.Layers {
		return replyErr(wire.ErrCodeBadRequest, "model %s has no layer %d with expert groups", j.model, j.layer)
	}
	r, err := wire.DecodeRouted(j.msg.Data, m.manifest.Config.Dim, groups)
	if err != nil {
		return err
	}
	j.routed = r
	return nil
}

// expertRunnerFor returns the runner of j's layer, starting one, after
// checking that this node holds every expert j names.
func (n *Node) expertRunnerFor(j *expertJob) (*expertRunner, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.models[j.model]
	if m == nil {
		return nil, replyErr(wire.ErrCodeNotLoaded, "model %q not loaded on %s", j.model, n.opts.ID)
	}
	if _, done := n.released[j.request]; done {
		return nil, replyErr(wire.ErrCodeBadRequest, "request %s has ended", j.request)
	}
	if n.draining && n.sessions[expertSessionKey(j.request, j.model)] == nil {
		return nil, replyErr(wire.ErrCodeDraining, "node %s is draining", n.opts.ID)
	}
	for _, e := range j.routed.Experts {
		if e >= 0 && m.experts[[2]int{j.layer, int(e)}].w == nil {
			return nil, replyErr(wire.ErrCodeNotLoaded, "%s does not hold expert %d of layer %d", n.opts.ID, e, j.layer)
		}
	}
	if r := m.expertRunners[j.layer]; r != nil {
		// The runner's experts are those held when it started; a plan that
		// added experts since starts a new one.
		ok := true
		for _, e := range j.routed.Experts {
			ok = ok && (e < 0 || r.experts[e] != nil)
		}
		if ok {
			return r, nil
		}
		r.stop()
	}
	r := &expertRunner{stopper: newStopper(), layer: j.layer, experts: make([]*compute.Expert, m.manifest.ExpertGroups()), ws: compute.NewWorkspace(n.pool),
		queue: make(chan *expertJob, n.opts.QueueLimit)}
	for e := range r.experts {
		r.experts[e] = m.experts[[2]int{j.layer, e}].w
	}
	m.expertRunners[j.layer] = r
	go n.runExpertBatches(r, m.manifest)
	return r, nil
}

// runExpertBatches takes jobs off r's queue and computes them in batches
// of up to MaxBatch: each expert runs once per batch on every row of every
// job that chose it.
func (n *Node) runExpertBatches(r *expertRunner, man wire.ModelManifest) {
	// Expert requests hold no state: any two can share a batch.
	runQueue(r.queue, r.done, n.opts.MaxBatch,
		func([]*expertJob, *expertJob) bool { return true },
		func(batch []*expertJob) { n.runExpertBatch(r, man, batch) })
}

// expertScratch is one batch's rows, gathered across its jobs.
type expertScratch struct {
	rows    []int32
	weights []float32
	in, out []float32
}

func (n *Node) runExpertBatch(r *expertRunner, man wire.ModelManifest, batch []*expertJob) {
	defer func() {
		n.queued.Add(-int64(len(batch)))
		for range batch {
			n.inflight.Done()
		}
	}()
	dim := man.Config.Dim
	total := 0
	for _, j := range batch {
		total += j.routed.Rows
	}
	x := make([]float32, 0, total*dim)
	for _, j := range batch {
		x = append(x, j.routed.X...)
	}
	out := make([]float32, total*dim)
	flops := make([]int64, len(batch)) // arithmetic done per job
	per := make([]int64, len(batch))
	start := time.Now()
	var sc expertScratch
	var err error
	for e, ex := range r.experts {
		sc.rows, sc.weights = sc.rows[:0], sc.weights[:0]
		base := 0
		for bi, j := range batch {
			rt := &j.routed
			per[bi] = 0
			for i, id := range rt.Experts {
				if int(id) == e {
					sc.rows = append(sc.rows, int32(base+i/rt.K))
					sc.weights = append(sc.weights, rt.Weights[i])
					per[bi]++
				}
			}
			base += rt.Rows
		}
		if len(sc.rows) == 0 {
			continue
		}
		if ex == nil {
			err = fmt.Errorf("expert %d of layer %d not held", e, r.layer)
			break
		}
		// SwiGLU: three products of dim × hidden, two FLOPs per multiply-add.
		for bi := range batch {
			flops[bi] += per[bi] * 6 * int64(dim) * int64(ex.Hidden())
		}
		k := len(sc.rows)
		if cap(sc.in) < k*dim {
			sc.in, sc.out = make([]float32, k*dim), make([]float32, k*dim)
		}
		sc.in, sc.out = sc.in[:k*dim], sc.out[:k*dim]
		for i, row := range sc.rows {
			copy(sc.in[i*dim:(i+1)*dim], x[int(row)*dim:(int(row)+1)*dim])
		}
		if err = ex.Apply(r.ws, sc.in, k, sc.weights, sc.out); err != nil {
			break
		}
		for i, row := range sc.rows {
			dst := out[int(row)*dim : (int(row)+1)*dim]
			for c, v := range sc.out[i*dim : (i+1)*dim] {
				dst[c] += v
			}
		}
	}
	elapsed := time.Since(start)
	n.metrics.batchDone(len(batch))
	base := 0
	for bi, j := range batch {
		rows := j.routed.Rows
		if err != nil {
			j.span.RecordError(err)
			j.span.End()
			n.respondError(j.msg.Reply, j.request, replyErr(wire.ErrCodeInternal, "%v", err))
			base += rows
			continue
		}
		took := elapsed * time.Duration(rows) / time.Duration(total)
		n.expertSession(j.request, j.model, j.customer, j.origin, j.layer).accountExperts(j.layer, flops[bi], took, true)
		if j.msg.Reply != "" {
			m := nats.NewMsg(j.msg.Reply)
			m.Header.Set(wire.HdrNode, n.opts.ID)
			m.Header.Set(wire.HdrComputeUS, strconv.FormatInt(took.Microseconds(), 10))
			m.Data = wire.AppendF32(make([]byte, 0, wire.FrameHeaderSize+4*rows*dim), rows, dim, out[base*dim:(base+rows)*dim])
			telemetry.Inject(j.ctx, m)
			if perr := n.bus.NC.PublishMsg(m); perr != nil {
				n.log.Warn("expert result not sent", "request", j.request, "err", perr)
			}
		}
		j.span.End()
		base += rows
	}
}
