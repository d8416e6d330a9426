package registry

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// challengeState is where a node stands with its challenges.
type challengeState struct {
	// next is when the node is due (zero: nothing to challenge it on yet).
	next     time.Time
	inFlight bool
	// layers are the layer fragments the node held when it was last
	// scheduled; a change schedules a challenge at once.
	layers string
	// model is the model of the last failed challenge: a quarantined node
	// that holds nothing any more is challenged on it again.
	model string
}

// challenger proves that nodes compute what they claim, as fast as they
// claim: it sends a node a random input for one layer it holds and compares
// the answer with the output it computes itself from the same fragment.
type challenger struct {
	r    *Registry
	pool *compute.Pool
	sem  chan struct{}
	wg   sync.WaitGroup

	// ctx is the challenges' context, set by Registry.Run before the first
	// schedule (both run on Run's goroutine).
	ctx context.Context

	mu     sync.Mutex
	store  *fragstore.Store
	layers map[string]*cachedLayer
	order  []string
}

// cachedLayer is one challenge's weights: a layer, or (for a model stored
// as expert groups, groups > 0) one expert of a layer.
type cachedLayer struct {
	cfg    wire.ModelConfig
	layer  *compute.Layer
	expert *compute.Expert
	groups int
}

// challengeLayerCache is how many layers the challenger keeps computed
// weights of.
const challengeLayerCache = 8

func newChallenger(r *Registry) *challenger {
	return &challenger{r: r, pool: compute.NewPool(1), sem: make(chan struct{}, r.cfg.ChallengeConcurrency), layers: map[string]*cachedLayer{}}
}

func (c *challenger) enabled() bool { return c.r.cfg.ChallengeEvery >= 0 }

// stop waits for the challenges in flight (their context has ended).
func (c *challenger) stop() {
	c.wg.Wait()
	c.pool.Close()
}

// every is the mean time between challenges of a node that passes.
func (c *challenger) every() time.Duration {
	if c.r.cfg.ChallengeEvery == 0 {
		return 10 * time.Minute
	}
	return c.r.cfg.ChallengeEvery
}

// noticeLocked schedules a challenge when the layers a node holds change
// (at join, the first time it holds any). Called with r.mu held.
func (c *challenger) noticeLocked(e *entry, now time.Time) {
	if !c.enabled() {
		return
	}
	held := heldLayers(e.rec.Heartbeat.Fragments)
	sig := strings.Join(held, ",")
	if sig == e.challenge.layers {
		return
	}
	e.challenge.layers = sig
	if len(held) > 0 && (e.challenge.next.IsZero() || e.quarantine == "") {
		// Soon, at a moment the node cannot predict.
		e.challenge.next = now.Add(time.Duration(rand.Float64() * float64(e.interval)))
	}
}

// heldLayers returns the layer fragments ("model/layer.i") in fragments.
func heldLayers(fragments []string) []string {
	var out []string
	for _, f := range fragments {
		if _, id, ok := strings.Cut(f, "/"); ok && strings.HasPrefix(id, "layer.") {
			out = append(out, f)
		}
	}
	return out
}

// challengeJob is one challenge to run.
type challengeJob struct {
	node       string
	hb         wire.Heartbeat
	retryModel string
}

// schedule starts the challenges that are due.
func (c *challenger) schedule(now time.Time) {
	if !c.enabled() {
		return
	}
	ctx := c.ctx
	if ctx == nil || ctx.Err() != nil {
		return
	}
	var jobs []challengeJob
	c.r.mu.Lock()
	for id, e := range c.r.nodes {
		if e.challenge.inFlight || e.challenge.next.IsZero() || now.Before(e.challenge.next) || e.rec.Heartbeat.State == wire.NodeDraining {
			continue
		}
		select {
		case c.sem <- struct{}{}:
		default:
			continue // at capacity: due nodes wait for the next sweep
		}
		e.challenge.inFlight = true
		jobs = append(jobs, challengeJob{node: id, hb: e.rec.Heartbeat, retryModel: e.challenge.model})
	}
	c.r.mu.Unlock()
	for _, j := range jobs {
		c.wg.Go(func() {
			defer func() { <-c.sem }()
			c.challenge(ctx, j)
		})
	}
}

// challenge runs one challenge and records its outcome.
func (c *challenger) challenge(ctx context.Context, j challengeJob) {
	modelID, layer, expert, held := pickLayer(j)
	if modelID == "" {
		c.finish(ctx, j.node, "", nil, nil)
		return
	}
	verdict, err := c.try(ctx, j, modelID, layer, expert, held)
	if ctx.Err() != nil {
		c.finish(ctx, j.node, modelID, nil, nil)
		return
	}
	if err != nil {
		// The registry could not pose the challenge; the node is not at fault.
		c.r.log.Warn("challenge not posed", "node", j.node, "model", modelID, "layer", layer, "err", err)
		c.finish(ctx, j.node, modelID, nil, err)
		return
	}
	c.finish(ctx, j.node, modelID, verdict, nil)
}

// pickLayer picks a random layer fragment the node holds (a layer, or
// expert of a layer; expert is -1 for a layer) or, for a node that holds
// none, a random layer of the model it last failed on (held false).
func pickLayer(j challengeJob) (modelID string, layer, expert int, held bool) {
	if ls := heldLayers(j.hb.Fragments); len(ls) > 0 {
		f := ls[rand.IntN(len(ls))]
		m, id, _ := strings.Cut(f, "/")
		if l, e, err := model.ParseExpertID(id); err == nil {
			return m, l, e, true
		}
		_, l, err := model.ParseFragmentID(id)
		if err == nil {
			return m, l, -1, true
		}
	}
	if j.retryModel != "" {
		return j.retryModel, -1, -1, false
	}
	return "", 0, -1, false
}

// verdict is a challenge's outcome: nil error is a pass.
type verdict struct {
	err error
}

// try poses the challenge and judges the answer.
// A layer of a model stored as expert groups is challenged in parts, as
// nodes hold it: its trunk (wire.OpTrunk) or one of its experts
// (wire.OpExpert); other layers whole.
func (c *challenger) try(ctx context.Context, j challengeJob, modelID string, layer, expert int, held bool) (*verdict, error) {
	cl, layer, err := c.layer(ctx, modelID, layer, expert)
	if err != nil {
		return nil, err
	}
	cfg := cl.cfg
	rows := min(c.r.cfg.ChallengeRows, cfg.SeqLen)
	input := make([]float32, rows*cfg.Dim)
	for i := range input {
		input[i] = float32(rand.NormFloat64())
	}
	msg := nats.NewMsg(subjects.Challenge(j.node))
	var want []float32
	wantRows := rows
	switch {
	case cl.expert != nil:
		want = make([]float32, len(input))
		err = cl.expert.Apply(compute.NewWorkspace(c.pool), input, rows, nil, want)
		msg.Header.Set(wire.HdrOp, wire.OpExpert)
		msg.Header.Set(wire.HdrExpert, strconv.Itoa(expert))
	case cl.groups > 0:
		want, err = compute.TrunkLayer(cfg, layer, cl.layer, input, rows, c.pool)
		wantRows = 2 * rows
		msg.Header.Set(wire.HdrOp, wire.OpTrunk)
	default:
		want, err = compute.ForwardLayers(cfg, layer, []*compute.Layer{cl.layer}, input, rows, c.pool)
	}
	if err != nil {
		return nil, err
	}
	msg.Header.Set(wire.HdrRequest, "chal-"+nuid.Next())
	msg.Header.Set(wire.HdrModel, modelID)
	msg.Header.Set(wire.HdrRange, fmt.Sprintf("%d:%d", layer, layer+1))
	msg.Data = wire.AppendF32(nil, rows, cfg.Dim, input)
	rctx, cancel := context.WithTimeout(ctx, c.r.cfg.ChallengeTimeout)
	defer cancel()
	start := time.Now()
	reply, err := c.r.bus.NC.RequestMsgWithContext(rctx, msg)
	took := time.Since(start)
	where := fmt.Sprintf("layer %d of %s", layer, modelID)
	if cl.expert != nil {
		where = fmt.Sprintf("expert %d of layer %d of %s", expert, layer, modelID)
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return &verdict{fmt.Errorf("%w: no answer on %s within %s: %v", ErrChallengeFailed, where, c.r.cfg.ChallengeTimeout, err)}, nil
	}
	if e := reply.Header.Get(wire.HdrError); e != "" {
		return &verdict{fmt.Errorf("%w: node answered %s with an error: %s", ErrChallengeFailed, where, e)}, nil
	}
	f, err := wire.DecodeFrame(reply.Data)
	var got []float32
	if err == nil {
		got, err = f.F32(nil)
	}
	if err != nil || f.Rows != wantRows || f.Cols != cfg.Dim {
		return &verdict{fmt.Errorf("%w: answer on %s is not a %d×%d frame (%d×%d, %v)", ErrChallengeFailed, where, wantRows, cfg.Dim, f.Rows, f.Cols, err)}, nil
	}
	diff, scale := 0.0, 1.0
	for i := range want {
		diff = max(diff, math.Abs(float64(got[i])-float64(want[i])))
		scale = max(scale, math.Abs(float64(want[i])))
	}
	if diff > c.r.cfg.ChallengeTolerance*scale {
		return &verdict{fmt.Errorf("%w: wrong output on %s: differs by %.3g, tolerance %.3g", ErrChallengeFailed, where, diff, c.r.cfg.ChallengeTolerance*scale)}, nil
	}
	// A node that fetched the layer for the challenge is timed on its
	// compute alone; one that holds it, on the whole round trip.
	if !held {
		us, _ := strconv.ParseInt(reply.Header.Get(wire.HdrComputeUS), 10, 64)
		took = time.Duration(us) * time.Microsecond
	}
	if tokS := claimedPrefill(&j.hb, modelID); tokS > 0 {
		allowed := time.Duration(c.r.cfg.ChallengeSlowFactor*float64(rows)/tokS*float64(time.Second)) + c.r.cfg.ChallengeSlack
		if took > allowed {
			return &verdict{fmt.Errorf("%w: too slow on %s: %s for %d positions, the claimed %.0f tok/s allows %s", ErrChallengeFailed, where, took.Round(time.Microsecond), rows, tokS, allowed)}, nil
		}
	}
	return &verdict{}, nil
}

// claimedPrefill is the best prefill speed the node claims for the model
// (tokens/s through one layer), 0 when it claims none.
func claimedPrefill(hb *wire.Heartbeat, modelID string) float64 {
	best := 0.0
	for _, s := range hb.Speed {
		if s.Model == modelID {
			best = max(best, s.PrefillTokS)
		}
	}
	return best
}

// layer returns the weights of layer l of the model (a random layer when l
// is negative), or of its expert e when e is not negative, fetched from
// the object store and verified, and cached.
func (c *challenger) layer(ctx context.Context, modelID string, l, e int) (*cachedLayer, int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.store == nil {
		st, err := fragstore.Open(ctx, c.r.bus.JS)
		if err != nil {
			return nil, 0, err
		}
		c.store = st
	}
	man, err := c.store.Manifest(ctx, modelID)
	if err != nil {
		return nil, 0, err
	}
	if l < 0 {
		l = rand.IntN(man.Config.Layers)
	}
	key := fmt.Sprintf("%s|%s|%d|%d", modelID, man.Created.Format(time.RFC3339Nano), l, e)
	if cl := c.layers[key]; cl != nil {
		return cl, l, nil
	}
	var ref *wire.FragmentRef
	for i := range man.Fragments {
		f := &man.Fragments[i]
		if f.Layer == l && (e < 0 && f.Kind == model.KindLayer || e >= 0 && f.Expert == e) {
			ref = f
		}
	}
	if ref == nil {
		return nil, 0, fmt.Errorf("model %s has no fragment for layer %d (expert %d)", modelID, l, e)
	}
	frag, err := c.store.Fragment(ctx, *ref, nil)
	if err != nil {
		return nil, 0, err
	}
	cl := &cachedLayer{cfg: man.Config, groups: man.ExpertGroups()}
	if e >= 0 {
		cl.expert, err = compute.ExpertFromFragment(man.Config, frag)
	} else {
		cl.layer, err = compute.LayerFromFragment(man.Config, frag)
	}
	if err != nil {
		return nil, 0, err
	}
	c.layers[key] = cl
	c.order = append(c.order, key)
	if len(c.order) > challengeLayerCache {
		delete(c.layers, c.order[0])
		c.order = c.order[1:]
	}
	return cl, l, nil
}

// finish records a challenge's outcome: a failure quarantines the node, a
// pass after a failure restores it; either way the next one is scheduled.
func (c *challenger) finish(ctx context.Context, node, modelID string, v *verdict, posingErr error) {
	if v != nil {
		c.r.metrics.challenge(ctx, v.err == nil)
	}
	c.r.mu.Lock()
	defer c.r.mu.Unlock()
	e := c.r.nodes[node]
	if e == nil {
		return
	}
	e.challenge.inFlight = false
	now := time.Now()
	switch {
	case v == nil && posingErr == nil:
		// Nothing to challenge the node on (or shutting down).
		e.challenge.next = time.Time{}
		return
	case v == nil:
		e.challenge.next = now.Add(c.r.cfg.ChallengeRetry)
		return
	case v.err != nil:
		e.challenge.model = modelID
		e.challenge.next = now.Add(c.r.cfg.ChallengeRetry)
		reason := v.err.Error()
		c.r.log.Warn("challenge failed", "node", node, "reason", reason)
		if e.quarantine == "" {
			e.quarantine = reason
			c.r.event(node, wire.MemberQuarantined, reason)
		} else {
			e.quarantine = reason
		}
	default:
		e.challenge.model = ""
		e.challenge.next = now.Add(time.Duration((0.5 + rand.Float64()) * float64(c.every())))
		c.r.log.Debug("challenge passed", "node", node, "model", modelID)
		if e.quarantine != "" {
			e.quarantine = ""
			c.r.event(node, wire.MemberRestored, "challenge passed")
		}
	}
	c.r.setState(e)
	if mat := materialOf(&e.rec); mat != e.material {
		e.material = mat
		c.r.store(e)
	}
}
