package node

import (
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// passWork is what one stage message computed, for usage: whole layers,
// trunks of split layers (attention and expert choice, no feed-forward),
// and whether the pass ended (its output went back, logits included).
type passWork struct {
	whole, trunks int
	final         bool
	// compFLOPs is the compensation of skipped neuron groups computed for
	// the job's rows (compute.Item.CompFLOPs).
	compFLOPs int64
}

// runSplit runs a batch of passes that pause at split layers (see
// wire/expert.go): from the range's first layer, or for resumed passes
// from the layer after the one they paused at (its residual plus the
// experts' outputs), through whole layers until the next split layer,
// where each job is answered with its rows' normalized states and expert
// choices and its residual is kept in its session; after the last layer
// each job is answered as a plain stage request is.
func (n *Node) runSplit(r *runner, man wire.ModelManifest, batch []*job, sessions []*session, items []*compute.Item) {
	start := time.Now()
	j0 := batch[0]
	from := j0.first
	if j0.resume {
		from = j0.layer + 1
		keep := 0
		for i, j := range batch {
			n.mu.Lock()
			p := sessions[i].paused
			sessions[i].paused = nil
			n.mu.Unlock()
			if p == nil || p.layer != j.layer || p.pos != j.pos || p.rows != j.rows {
				// The pass is gone (the node restarted, or the requester
				// gave up on it): the requester re-runs the prefix.
				j.span.End()
				n.respondError(j.msg.Reply, j.request, fmt.Errorf("no pass of %d rows at position %d paused at layer %d: %w", j.rows, j.pos, j.layer, compute.ErrCacheMiss))
				continue
			}
			for c, v := range j.sum {
				p.residual[c] += v
			}
			items[i].Tokens, items[i].Hidden = nil, p.residual
			batch[keep], sessions[keep], items[keep] = j, sessions[i], items[i]
			keep++
		}
		batch, sessions, items = batch[:keep], sessions[:keep], items[:keep]
		if keep == 0 {
			return
		}
	} else {
		for _, se := range sessions {
			n.mu.Lock()
			se.paused = nil // a new pass replaces one abandoned
			n.mu.Unlock()
		}
	}
	fail := func(err error) {
		for _, j := range batch {
			j.span.RecordError(err)
			j.span.End()
			n.respondError(j.msg.Reply, j.request, err)
		}
	}
	pass, err := r.stage.BeginAt(items, from)
	if err != nil {
		fail(err)
		return
	}
	whole := 0
	for l := from; l < j0.end; l++ {
		if err := pass.Trunk(l); err != nil {
			fail(err)
			return
		}
		if slices.Contains(j0.split, l) {
			// The chosen experts held here are computed here: their rows
			// need no message.
			held, err := pass.FFNHeld()
			if err != nil {
				fail(err)
				return
			}
			n.pauseAt(l, pass, man, batch, sessions, items, time.Since(start), passWork{whole: whole, trunks: 1}, held)
			return
		}
		if err := pass.FFN(); err != nil {
			fail(err)
			return
		}
		whole++
	}
	if err := pass.Finish(); err != nil {
		fail(err)
		return
	}
	elapsed := time.Since(start)
	rows := 0
	for _, j := range batch {
		rows += j.rows
	}
	for i, j := range batch {
		sessions[i].cacheBytes.Store(sessions[i].cache.Bytes())
		n.finish(j, sessions[i], items[i], elapsed*time.Duration(j.rows)/time.Duration(rows), man, passWork{whole: whole, final: true})
	}
}

// pauseAt ends a pass after the trunk of layer: each job's residual stays
// in its session and its answer carries its rows' normalized states with
// their expert choices (wire.Routed), HdrTrunk naming the layer and
// HdrHeld the experts already computed here (held).
func (n *Node) pauseAt(layer int, pass *compute.Pass, man wire.ModelManifest, batch []*job, sessions []*session, items []*compute.Item, elapsed time.Duration, w passWork, held []bool) {
	dim := man.Config.Dim
	r0 := 0
	for i, j := range batch {
		rows := items[i].N
		res := append([]float32(nil), pass.Residual[r0*dim:(r0+rows)*dim]...)
		rt := wire.Routed{Rows: rows, Dim: dim, K: pass.K, X: pass.Normed[r0*dim : (r0+rows)*dim],
			Experts: make([]int32, rows*pass.K), Weights: make([]float32, rows*pass.K)}
		for c, ch := range pass.Choices[r0*pass.K : (r0+rows)*pass.K] {
			rt.Experts[c], rt.Weights[c] = ch.Expert, ch.Weight
		}
		n.mu.Lock()
		sessions[i].paused = &pause{layer: layer, pos: j.pos, rows: rows, residual: res}
		n.mu.Unlock()
		sessions[i].cacheBytes.Store(sessions[i].cache.Bytes())
		took := elapsed * time.Duration(rows) / time.Duration(pass.Rows)
		w.compFLOPs, items[i].CompFLOPs = items[i].CompFLOPs, 0
		sessions[i].account(j, took, man, w)
		if f := items[i].ExpertFLOPs; f > 0 {
			// The experts computed here are billed as an expert holder's.
			items[i].ExpertFLOPs = 0
			n.expertSession(j.request, j.model, j.customer, j.origin, layer).accountExperts(layer, f, 0, false)
		}
		if j.msg.Reply != "" {
			out := nats.NewMsg(j.msg.Reply)
			out.Header.Set(wire.HdrNode, n.opts.ID)
			out.Header.Set(wire.HdrRequest, j.request)
			out.Header.Set(wire.HdrTrunk, strconv.Itoa(layer))
			if h := wire.FormatHeld(held); h != "" {
				out.Header.Set(wire.HdrHeld, h)
			}
			out.Header.Set(wire.HdrComputeUS, strconv.FormatInt(took.Microseconds(), 10))
			out.Data = wire.AppendRouted(nil, rt)
			telemetry.Inject(j.ctx, out)
			if err := n.bus.NC.PublishMsg(out); err != nil {
				n.log.Warn("paused pass not sent", "request", j.request, "err", err)
			}
		}
		j.span.End()
		r0 += rows
	}
}
