package node

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// onChallenge answers the registry's challenge: it runs the given hidden
// states through the named layers on a throwaway cache (for a model stored
// as expert groups: one layer's trunk, or one expert) and returns the
// output with the compute time. Layers the node holds are used as they
// are served; others are fetched for the occasion (a quarantined node holds
// nothing, yet must be able to prove itself).
func (n *Node) onChallenge(msg *nats.Msg) {
	req := msg.Header.Get(wire.HdrRequest)
	out, rows, dim, took, err := n.answerChallenge(msg)
	if err != nil {
		n.log.Warn("challenge not answered", "challenge", req, "err", err)
		n.respondError(msg.Reply, req, err)
		return
	}
	if n.opts.TamperChallenge != nil {
		n.opts.TamperChallenge(out)
	}
	reply := nats.NewMsg(msg.Reply)
	reply.Header.Set(wire.HdrNode, n.opts.ID)
	reply.Header.Set(wire.HdrRequest, req)
	reply.Header.Set(wire.HdrComputeUS, strconv.FormatInt(took.Microseconds(), 10))
	reply.Data = wire.AppendF32(make([]byte, 0, wire.FrameHeaderSize+4*len(out)), rows, dim, out)
	if err := n.bus.NC.PublishMsg(reply); err != nil {
		n.log.Warn("challenge answer not sent", "challenge", req, "err", err)
	}
}

func (n *Node) answerChallenge(msg *nats.Msg) (out []float32, rows, dim int, took time.Duration, err error) {
	modelID := msg.Header.Get(wire.HdrModel)
	if err := subjects.Token(modelID); err != nil {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "header %s: %v", wire.HdrModel, err)
	}
	first, end, err := parseRange(msg.Header.Get(wire.HdrRange))
	if err != nil {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "%v", err)
	}
	f, err := wire.DecodeFrame(msg.Data)
	var hidden []float32
	if err == nil {
		hidden, err = f.F32(nil)
	}
	if err != nil {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "%v", err)
	}
	op := msg.Header.Get(wire.HdrOp)
	if op == wire.OpExpert {
		return n.answerExpertChallenge(msg, modelID, first, hidden, f)
	}
	if op != "" && op != wire.OpTrunk {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "header %s=%q: want empty, %s or %s", wire.HdrOp, op, wire.OpTrunk, wire.OpExpert)
	}
	if op == wire.OpTrunk && end != first+1 {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "a trunk challenge names one layer, not [%d,%d)", first, end)
	}
	cfg, layers, err := n.challengeLayers(modelID, first, end)
	if err != nil {
		return nil, 0, 0, 0, err
	}
	if f.Cols != cfg.Dim {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "frame has %d columns, the model's width is %d", f.Cols, cfg.Dim)
	}
	start := time.Now()
	rows = f.Rows
	if op == wire.OpTrunk {
		out, err = compute.TrunkLayer(cfg, first, layers[0], hidden, f.Rows, n.pool)
		rows = 2 * f.Rows
	} else {
		out, err = compute.ForwardLayers(cfg, first, layers, hidden, f.Rows, n.pool)
	}
	if err != nil {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "%v", err)
	}
	return out, rows, cfg.Dim, time.Since(start), nil
}

// answerExpertChallenge applies expert HdrExpert of layer to the frame's
// rows (weight 1), with the expert the node serves or, when it does not
// hold it, one fetched and verified for the occasion.
func (n *Node) answerExpertChallenge(msg *nats.Msg, modelID string, layer int, hidden []float32, f wire.Frame) ([]float32, int, int, time.Duration, error) {
	e, err := strconv.Atoi(msg.Header.Get(wire.HdrExpert))
	if err != nil || e < 0 {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "header %s=%q: want an expert index", wire.HdrExpert, msg.Header.Get(wire.HdrExpert))
	}
	n.mu.Lock()
	var ex *compute.Expert
	var cfg wire.ModelConfig
	if m := n.models[modelID]; m != nil {
		ex, cfg = m.experts[[2]int{layer, e}].w, m.manifest.Config
	}
	n.mu.Unlock()
	if ex == nil {
		if cfg, ex, err = n.fetchExpert(modelID, layer, e); err != nil {
			return nil, 0, 0, 0, err
		}
	}
	if f.Cols != cfg.Dim {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "frame has %d columns, the model's width is %d", f.Cols, cfg.Dim)
	}
	start := time.Now()
	out := make([]float32, len(hidden))
	if err := ex.Apply(compute.NewWorkspace(n.pool), hidden, f.Rows, nil, out); err != nil {
		return nil, 0, 0, 0, replyErr(wire.ErrCodeBadRequest, "%v", err)
	}
	return out, f.Rows, cfg.Dim, time.Since(start), nil
}

// fetchExpert fetches and verifies expert e of layer of the model.
func (n *Node) fetchExpert(modelID string, layer, e int) (wire.ModelConfig, *compute.Expert, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	man, err := n.challengeManifest(ctx, modelID)
	if err != nil {
		return wire.ModelConfig{}, nil, err
	}
	var ex *compute.Expert
	err = n.fetchForChallenge(ctx, man, func(ref wire.FragmentRef) bool { return ref.Layer == layer && ref.Expert == e },
		func(f *model.Fragment) (err error) {
			ex, err = compute.ExpertFromFragment(man.Config, f)
			return err
		})
	if err == nil && ex == nil {
		err = replyErr(wire.ErrCodeBadRequest, "model %s has no expert %d in layer %d", modelID, e, layer)
	}
	return man.Config, ex, err
}

// challengeManifest is the manifest of a model a challenge names.
func (n *Node) challengeManifest(ctx context.Context, modelID string) (wire.ModelManifest, error) {
	if n.store == nil {
		return wire.ModelManifest{}, replyErr(wire.ErrCodeNotLoaded, "node %s has not started", n.opts.ID)
	}
	man, err := n.store.Manifest(ctx, modelID)
	if err != nil {
		return wire.ModelManifest{}, replyErr(wire.ErrCodeNotLoaded, "%v", err)
	}
	return man, nil
}

// fetchForChallenge fetches and verifies the fragments of man that keep
// selects, in manifest order, and hands each to use.
func (n *Node) fetchForChallenge(ctx context.Context, man wire.ModelManifest, keep func(wire.FragmentRef) bool, use func(*model.Fragment) error) error {
	for _, ref := range man.Fragments {
		if !keep(ref) {
			continue
		}
		frag, err := n.store.Fragment(ctx, ref, nil)
		if err == nil {
			err = use(frag)
		}
		if err != nil {
			return replyErr(wire.ErrCodeInternal, "fragment %s: %v", ref.ID, err)
		}
	}
	return nil
}

// challengeLayers returns layers [first, end) of the model: the ones the
// node serves when it holds them all, else freshly fetched and verified.
func (n *Node) challengeLayers(modelID string, first, end int) (wire.ModelConfig, []*compute.Layer, error) {
	n.mu.Lock()
	if m := n.models[modelID]; m != nil && end <= m.manifest.Config.Layers {
		var layers []*compute.Layer
		for l := first; l < end && m.layers[l] != nil; l++ {
			layers = append(layers, m.layers[l])
		}
		if len(layers) == end-first {
			cfg := m.manifest.Config
			n.mu.Unlock()
			return cfg, layers, nil
		}
	}
	n.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	man, err := n.challengeManifest(ctx, modelID)
	if err != nil {
		return wire.ModelConfig{}, nil, err
	}
	if end > man.Config.Layers {
		return wire.ModelConfig{}, nil, replyErr(wire.ErrCodeBadRequest, "range [%d,%d) outside the model's %d layers", first, end, man.Config.Layers)
	}
	layers := make([]*compute.Layer, 0, end-first)
	err = n.fetchForChallenge(ctx, man, func(ref wire.FragmentRef) bool {
		return ref.Kind == model.KindLayer && ref.Layer >= first && ref.Layer < end
	},
		func(f *model.Fragment) error {
			l, err := compute.LayerFromFragment(man.Config, f)
			layers = append(layers, l)
			return err
		})
	if err != nil {
		return wire.ModelConfig{}, nil, err
	}
	if len(layers) != end-first {
		return wire.ModelConfig{}, nil, replyErr(wire.ErrCodeNotLoaded, "model %s lacks fragments of layers [%d,%d)", modelID, first, end)
	}
	return man.Config, layers, nil
}

// WaitIdle waits until no request has sent the node work within idle and
// nothing is queued (the requests it serves have finished or were
// abandoned), or until ctx ends. A draining node calls it before it stops,
// so that the generations it takes part in complete.
func (n *Node) WaitIdle(ctx context.Context, idle time.Duration) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		cut := time.Now().Add(-idle)
		busy := int(n.queued.Load())
		n.mu.Lock()
		for _, se := range n.sessions {
			if se.last.After(cut) {
				busy++
			}
		}
		n.mu.Unlock()
		if busy == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("node %s still busy with %d requests: %w", n.opts.ID, busy, ctx.Err())
		case <-t.C:
		}
	}
}
