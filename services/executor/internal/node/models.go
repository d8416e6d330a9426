package node

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// modelState is what this node holds of one model: a contiguous range of
// layers (plus embedding and head at the ends) and a runner per range served.
type modelState struct {
	manifest    wire.ModelManifest
	planVersion uint64
	first, end  int
	embed       *compute.Embedding
	head        *compute.Head
	layers      map[int]*compute.Layer
	bytes       int64
	runners     map[[2]int]*runner
	// experts are the expert groups held, by (layer, expert), for models
	// stored as expert groups; holdExperts is the assignment's list (nil:
	// every expert of the assigned layers).
	experts       map[[2]int]heldExpert
	holdExperts   []int
	expertRunners map[int]*expertRunner
}

// heldExpert is one loaded expert group and its fragment's size.
type heldExpert struct {
	w     *compute.Expert
	bytes int64
}

// holdsExperts reports whether the node holds every expert of layer l.
func (m *modelState) holdsExperts(l int) bool {
	for e := 0; e < m.manifest.ExpertGroups(); e++ {
		if m.experts[[2]int{l, e}].w == nil {
			return false
		}
	}
	return true
}

// wantsExpert reports whether the current assignment includes expert e of
// layer l.
func (m *modelState) wantsExpert(l, e int) bool {
	return l >= m.first && l < m.end && (len(m.holdExperts) == 0 || slices.Contains(m.holdExperts, e))
}

func (m *modelState) fragmentIDs() []string {
	var out []string
	if m.embed != nil {
		out = append(out, m.manifest.ID+"/"+model.FragEmbed)
	}
	keys := make([]int, 0, len(m.layers))
	for l := range m.layers {
		keys = append(keys, l)
	}
	sort.Ints(keys)
	for _, l := range keys {
		out = append(out, m.manifest.ID+"/"+model.LayerFragment(l))
	}
	held := make([][2]int, 0, len(m.experts))
	for k := range m.experts {
		held = append(held, k)
	}
	slices.SortFunc(held, func(a, b [2]int) int { return cmp.Or(cmp.Compare(a[0], b[0]), cmp.Compare(a[1], b[1])) })
	for _, k := range held {
		out = append(out, m.manifest.ID+"/"+model.ExpertFragment(k[0], k[1]))
	}
	if m.head != nil {
		out = append(out, m.manifest.ID+"/"+model.FragHead)
	}
	return out
}

// holds reports whether the node can run layers [first, end) of the model.
func (m *modelState) holds(first, end int) error {
	if first == 0 && m.embed == nil {
		return fmt.Errorf("embedding not loaded")
	}
	if end == m.manifest.Config.Layers && m.head == nil {
		return fmt.Errorf("head not loaded")
	}
	for l := first; l < end; l++ {
		if m.layers[l] == nil {
			return fmt.Errorf("layer %d not loaded", l)
		}
	}
	return nil
}

// watchPlans follows KV plans and loads what each plan assigns to this node.
func (n *Node) watchPlans(ctx context.Context) {
	for ctx.Err() == nil {
		if err := n.followPlans(ctx); err != nil && ctx.Err() == nil {
			n.log.Warn("plan watch failed; retrying", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

func (n *Node) followPlans(ctx context.Context) error {
	kv, err := n.bus.JS.KeyValue(ctx, subjects.BucketPlans)
	if err != nil {
		return err
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("plan watcher closed")
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var p wire.Plan
			if err := json.Unmarshal(e.Value(), &p); err != nil {
				n.log.Warn("ignoring undecodable plan", "key", e.Key(), "err", err)
				continue
			}
			p.Version = e.Revision()
			if err := n.applyPlan(ctx, p); err != nil {
				n.log.Error("plan not applied", "model", p.Model, "version", p.Version, "err", err)
			}
		}
	}
}

// applyPlan loads the fragments p assigns to this node that it lacks. Layers
// it no longer needs stay until no request uses them (see reapIdle), so that
// requests started under the previous plan finish on it.
func (n *Node) applyPlan(ctx context.Context, p wire.Plan) error {
	var mine *wire.Assignment
	for i := range p.Assignments {
		if p.Assignments[i].Node == n.opts.ID {
			mine = &p.Assignments[i]
		}
	}
	n.mu.Lock()
	cur := n.models[p.Model]
	n.mu.Unlock()
	if mine == nil {
		if cur != nil {
			n.mu.Lock()
			cur.planVersion = p.Version
			cur.first, cur.end = 0, 0
			n.mu.Unlock()
			n.log.Info("plan assigns nothing to this node", "model", p.Model, "version", p.Version)
		}
		return nil
	}
	man, err := n.store.Manifest(ctx, p.Model)
	if err != nil {
		return err
	}
	if mine.First < 0 || mine.End > man.Config.Layers || mine.First >= mine.End {
		return fmt.Errorf("assignment [%d,%d) outside the model's %d layers", mine.First, mine.End, man.Config.Layers)
	}
	var need []wire.FragmentRef
	for _, ref := range man.Fragments {
		switch {
		case ref.Expert >= 0:
			// An expert group: only those the assignment lists.
			if ref.Layer < mine.First || ref.Layer >= mine.End || (len(mine.Experts) > 0 && !slices.Contains(mine.Experts, ref.Expert)) {
				continue
			}
		case ref.Kind == model.KindEmbed && mine.First == 0,
			ref.Kind == model.KindHead && mine.End == man.Config.Layers,
			ref.Kind == model.KindLayer && ref.Layer >= mine.First && ref.Layer < mine.End:
		default:
			continue
		}
		if cur != nil && cur.manifest.Created.Equal(man.Created) && cur.hasFragment(ref) {
			continue
		}
		need = append(need, ref)
	}
	var total int64
	for _, r := range need {
		total += r.Bytes
	}
	n.fetch.total.Add(total)
	loaded := map[string]*model.Fragment{}
	for _, ref := range need {
		f, err := n.fetchVerified(ctx, ref)
		if err != nil {
			return err
		}
		loaded[ref.ID] = f
	}
	// Build the new state, reusing what is already loaded.
	ns := &modelState{manifest: man, planVersion: p.Version, first: mine.First, end: mine.End, layers: map[int]*compute.Layer{}, runners: map[[2]int]*runner{},
		experts: map[[2]int]heldExpert{}, holdExperts: slices.Clone(mine.Experts), expertRunners: map[int]*expertRunner{}}
	n.mu.Lock()
	defer n.mu.Unlock()
	if cur != nil && cur.manifest.Created.Equal(man.Created) {
		ns.embed, ns.head = cur.embed, cur.head
		for l, w := range cur.layers {
			ns.layers[l] = w
		}
		for k, x := range cur.experts {
			ns.experts[k] = x
		}
		ns.bytes = cur.bytes
		ns.runners = cur.runners
		ns.expertRunners = cur.expertRunners
	} else if cur != nil {
		cur.stopRunners()
	}
	cfg := man.Config
	for _, ref := range need {
		f := loaded[ref.ID]
		if ref.Expert >= 0 {
			x, err := compute.ExpertFromFragment(cfg, f)
			if err != nil {
				return err
			}
			ns.experts[[2]int{ref.Layer, ref.Expert}] = heldExpert{w: x, bytes: ref.Bytes}
			ns.bytes += ref.Bytes
			continue
		}
		switch ref.Kind {
		case model.KindEmbed:
			e, err := compute.EmbeddingFromFragment(cfg, f)
			if err != nil {
				return err
			}
			ns.embed = e
		case model.KindHead:
			h, err := compute.HeadFromFragment(cfg, f)
			if err != nil {
				return err
			}
			ns.head = h
		case model.KindLayer:
			l, err := compute.LayerFromFragment(cfg, f)
			if err != nil {
				return err
			}
			ns.layers[ref.Layer] = l
		}
		ns.bytes += ref.Bytes
	}
	if len(need) > 0 && man.ExpertGroups() > 0 {
		// Stages hold their layers' experts: new ones need new stages.
		ns.stopRunners()
		ns.runners, ns.expertRunners = map[[2]int]*runner{}, map[int]*expertRunner{}
	}
	n.models[p.Model] = ns
	n.log.Info("plan applied", "model", p.Model, "version", p.Version, "layers", fmt.Sprintf("[%d,%d)", mine.First, mine.End), "fetched_bytes", total)
	return nil
}

// fragmentBytes is the size of the model's fragment id (0 if unknown).
func (m *modelState) fragmentBytes(id string) int64 {
	for _, f := range m.manifest.Fragments {
		if f.ID == id {
			return f.Bytes
		}
	}
	return 0
}

// stopRunners stops every stage and expert runner of the model.
func (m *modelState) stopRunners() {
	for _, r := range m.runners {
		r.stop()
	}
	for _, r := range m.expertRunners {
		r.stop()
	}
}

func (m *modelState) hasFragment(ref wire.FragmentRef) bool {
	if ref.Expert >= 0 {
		return m.experts[[2]int{ref.Layer, ref.Expert}].w != nil
	}
	switch ref.Kind {
	case model.KindEmbed:
		return m.embed != nil
	case model.KindHead:
		return m.head != nil
	case model.KindLayer:
		return m.layers[ref.Layer] != nil
	}
	return false
}

// fetchVerified fetches a fragment, retrying a few times when its digest
// does not match (a corrupt or truncated blob is never loaded).
func (n *Node) fetchVerified(ctx context.Context, ref wire.FragmentRef) (*model.Fragment, error) {
	var last error
	for attempt := 0; attempt < 3; attempt++ {
		var prev int64
		f, err := n.store.Fragment(ctx, ref, func(done, _ int64) {
			n.fetch.done.Add(done - prev)
			prev = done
		})
		if err == nil {
			return f, nil
		}
		n.fetch.done.Add(-prev)
		last = err
		n.log.Warn("fragment refused; fetching again", "fragment", ref.ID, "object", ref.Object, "err", err)
		if !errors.Is(err, fragstore.ErrDigest) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("fragment %s: %w", ref.ID, last)
}

// trimUnused drops layers outside the current assignment that no open
// request uses. Called with n.mu held.
func (n *Node) trimUnused() {
	for id, m := range n.models {
		used := map[int]bool{}
		usedEmbed, usedHead := false, false
		for k := range n.sessions {
			if k.model != id {
				continue
			}
			for l := k.first; l < k.end; l++ {
				used[l] = true
			}
			usedEmbed = usedEmbed || k.first == 0
			usedHead = usedHead || k.end == m.manifest.Config.Layers
		}
		for l := range m.layers {
			if (l < m.first || l >= m.end) && !used[l] {
				delete(m.layers, l)
				m.bytes -= m.fragmentBytes(model.LayerFragment(l))
			}
		}
		for k, x := range m.experts {
			if !m.wantsExpert(k[0], k[1]) {
				// Expert requests hold no state: what the plan dropped goes.
				delete(m.experts, k)
				m.bytes -= x.bytes
				if r := m.expertRunners[k[0]]; r != nil {
					r.stop()
					delete(m.expertRunners, k[0])
				}
			}
		}
		if m.first != 0 && !usedEmbed {
			m.embed = nil
		}
		if m.end != m.manifest.Config.Layers && !usedHead {
			m.head = nil
		}
		for r, run := range m.runners {
			if m.holds(r[0], r[1]) != nil && !slices.ContainsFunc(keysOf(n.sessions), func(k sessionKey) bool { return k.model == id && k.first == r[0] && k.end == r[1] }) {
				run.stop()
				delete(m.runners, r)
			}
		}
		if len(m.layers) == 0 && len(m.experts) == 0 && m.embed == nil && m.head == nil {
			delete(n.models, id)
		}
	}
}

func keysOf[K comparable, V any](m map[K]V) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
