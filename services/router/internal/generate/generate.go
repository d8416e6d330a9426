// Package generate drives one completion through the grid: it picks a route
// through the plan's live replicas, sends the prompt and then each new token
// through the stages, samples from the returned logits, and recovers when a
// node fails by re-routing and re-running the token prefix.
package generate

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/router/internal/grid"
)

// Errors a request can end with; the API maps them to status codes.
var (
	// ErrBadRequest wraps every problem with the request itself.
	ErrBadRequest = errors.New("invalid request")
	// ErrUnavailable means no live route could serve the request.
	ErrUnavailable = errors.New("no capacity")
	// errHealing (an ErrUnavailable) means a stage of the plan has no
	// replica to run it now: they left, are loading, or failed moments ago.
	// The registry and planner react to that (a node back from back-off, a
	// re-plan), so the request waits for a while before it fails.
	errHealing = fmt.Errorf("%w", ErrUnavailable)
)

// Request is one completion to generate.
type Request struct {
	ID          string
	Customer    string
	Model       string
	Prompt      string
	MaxTokens   int
	Temperature float32
	TopP        float32
	Seed        uint64
	Stop        []string
}

// Result is a finished completion.
type Result struct {
	Text         string
	Tokens       []int
	PromptTokens int
	FinishReason string
	// Recomputed counts token positions re-run after failures.
	Recomputed int
	Failovers  int
}

// Engine generates completions.
type Engine struct {
	bus          *bus.Conn
	view         *grid.View
	log          *slog.Logger
	stageTimeout time.Duration
	failoverWait time.Duration
	costs        RouteCosts
	health       *health
	metrics      *metrics
	load         *expertLoad
}

// New returns an engine over the grid view. stageTimeout bounds one pass
// through a route; failoverWait is how long a request whose route broke
// waits for a new one; one pass in every loadSample (0: none) also counts
// the expert choices of layers whose stage node holds all their experts.
func New(b *bus.Conn, view *grid.View, log *slog.Logger, stageTimeout, failoverWait time.Duration, costs RouteCosts, loadSample int) *Engine {
	if stageTimeout <= 0 {
		stageTimeout = 10 * time.Second
	}
	if failoverWait <= 0 {
		failoverWait = 30 * time.Second
	}
	if costs.HopOverhead <= 0 {
		costs.HopOverhead = 100 * time.Microsecond
	}
	if costs.DefaultLayerTime <= 0 {
		costs.DefaultLayerTime = time.Millisecond
	}
	return &Engine{bus: b, view: view, log: log, stageTimeout: stageTimeout, failoverWait: failoverWait, costs: costs, health: newHealth(), metrics: newMetrics(), load: newExpertLoad(loadSample)}
}

// NewID returns a random request id.
func NewID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + strings.ToLower(strconv.FormatUint(binary.LittleEndian.Uint64(b[:8]), 36)+strconv.FormatUint(uint64(binary.LittleEndian.Uint32(b[8:])), 36))
}

// Validate checks req against the model and returns its prompt tokens.
func (e *Engine) Validate(req *Request) (*grid.Model, []int, error) {
	m, err := e.view.Model(req.Model)
	if err != nil {
		return nil, nil, err
	}
	if req.Prompt == "" {
		return nil, nil, fmt.Errorf("%w: prompt is empty", ErrBadRequest)
	}
	if req.MaxTokens < 1 {
		return nil, nil, fmt.Errorf("%w: max_tokens must be at least 1, got %d", ErrBadRequest, req.MaxTokens)
	}
	if req.Temperature < 0 || req.Temperature > 2 {
		return nil, nil, fmt.Errorf("%w: temperature must be between 0 and 2, got %g", ErrBadRequest, req.Temperature)
	}
	if req.TopP < 0 || req.TopP > 1 {
		return nil, nil, fmt.Errorf("%w: top_p must be between 0 and 1, got %g", ErrBadRequest, req.TopP)
	}
	if len(req.Stop) > 4 {
		return nil, nil, fmt.Errorf("%w: at most 4 stop sequences, got %d", ErrBadRequest, len(req.Stop))
	}
	ids := m.Tokenizer.Encode(req.Prompt, true, false)
	ctxLen := m.Manifest.Config.SeqLen
	if len(ids)+req.MaxTokens > ctxLen {
		return nil, nil, fmt.Errorf("%w: prompt (%d tokens) plus max_tokens (%d) exceeds the model's context of %d tokens", ErrBadRequest, len(ids), req.MaxTokens, ctxLen)
	}
	return m, ids, nil
}

// Generate runs req, calling emit with each new piece of text (whole UTF-8
// characters only) as it is produced; emit may be nil.
func (e *Engine) Generate(ctx context.Context, req Request, emit func(text string, token int)) (_ *Result, err error) {
	m, prompt, err := e.Validate(&req)
	if err != nil {
		return nil, err
	}
	defer func() { e.metrics.finished(ctx, req.Model, len(prompt), err) }()
	if req.ID == "" {
		req.ID = NewID("req-")
	}
	ctx, span := otel.Tracer("tessera/router").Start(ctx, "router.generate",
		trace.WithAttributes(attribute.String("request", req.ID), attribute.String("model", req.Model), attribute.String("customer", req.Customer)))
	defer span.End()
	s := &session{e: e, req: req, model: m, seq: append([]int(nil), prompt...), promptLen: len(prompt)}
	defer s.release()
	res := &Result{PromptTokens: len(prompt)}
	sampler := compute.NewSampler(req.Temperature, req.TopP, req.Seed)
	var text strings.Builder
	var pending []byte // bytes of an incomplete UTF-8 character
	emitted := 0
	prev := prompt[len(prompt)-1]
	for len(res.Tokens) < req.MaxTokens {
		logits, err := s.step(ctx)
		if err != nil {
			span.RecordError(err)
			return nil, err
		}
		next := sampler.Sample(logits)
		if next == model.TokenBOS || next == model.TokenEOS {
			res.FinishReason = "stop"
			break
		}
		res.Tokens = append(res.Tokens, next)
		e.metrics.token(ctx, req.Model)
		s.seq = append(s.seq, next)
		pending = append(pending, m.Tokenizer.Decode(prev, next)...)
		prev = next
		// Hand out only complete characters.
		cut := completeUTF8(pending)
		text.Write(pending[:cut])
		pending = pending[cut:]
		if stop, at := findStop(text.String(), req.Stop, emitted); stop {
			full := text.String()[:at]
			if emit != nil && at > emitted {
				emit(full[emitted:], next)
			}
			text.Reset()
			text.WriteString(full)
			res.FinishReason = "stop"
			break
		}
		// Hold back text that could be the start of a stop sequence.
		safe := text.Len() - holdBack(text.String(), req.Stop)
		if emit != nil && safe > emitted {
			emit(text.String()[emitted:safe], next)
			emitted = safe
		}
	}
	if res.FinishReason == "" {
		res.FinishReason = "length"
		text.Write(pending)
		if emit != nil && text.Len() > emitted {
			emit(text.String()[emitted:], prev)
		}
	}
	res.Text = text.String()
	res.Recomputed, res.Failovers = s.recomputed, s.failovers
	span.SetAttributes(attribute.Int("completion_tokens", len(res.Tokens)), attribute.Int("failovers", s.failovers))
	return res, nil
}

// completeUTF8 returns the length of the longest prefix of b that does not
// end inside a UTF-8 character.
func completeUTF8(b []byte) int {
	for back := 1; back <= 3 && back <= len(b); back++ {
		c := b[len(b)-back]
		if c < 0x80 {
			return len(b)
		}
		if c >= 0xC0 { // a lead byte: is its sequence complete?
			need := 2
			if c >= 0xE0 {
				need = 3
			}
			if c >= 0xF0 {
				need = 4
			}
			if back < need {
				return len(b) - back
			}
			return len(b)
		}
	}
	if !utf8.Valid(b) {
		return len(b)
	}
	return len(b)
}

// findStop reports whether text contains a stop sequence starting at or
// after from-maxlen, and where the first one starts.
func findStop(text string, stops []string, from int) (bool, int) {
	best := -1
	for _, s := range stops {
		if s == "" {
			continue
		}
		start := max(0, from-len(s))
		if i := strings.Index(text[start:], s); i >= 0 && (best < 0 || start+i < best) {
			best = start + i
		}
	}
	return best >= 0, best
}

// holdBack is how many trailing bytes of text might begin a stop sequence.
func holdBack(text string, stops []string) int {
	hold := 0
	for _, s := range stops {
		for k := min(len(s)-1, len(text)); k > hold; k-- {
			if strings.HasSuffix(text, s[:k]) {
				hold = k
				break
			}
		}
	}
	return hold
}

// hop is one stage of a route: a node and the layers it runs.
type hop struct {
	node       string
	first, end int
}

// session is one request's progress through the grid.
type session struct {
	e          *Engine
	req        Request
	model      *grid.Model
	plan       *wire.Plan
	route      []hop
	calls      callState
	seq        []int // every token so far (prompt and generated)
	promptLen  int
	done       int // tokens the route's caches hold
	recomputed int
	failovers  int
	// experts is the node picked for each (layer, expert) of split layers;
	// splits are the split layers of each hop of the route.
	experts map[[2]int]string
	splits  [][]int
}

// step sends the tokens the route has not seen and returns the logits of
// the last one, re-routing (and re-running the prefix) on failure.
func (s *session) step(ctx context.Context) ([]float32, error) {
	const maxAttempts = 8
	var lastErr error
	deadline := time.Now().Add(s.e.failoverWait)
	for attempt := 0; attempt < maxAttempts; {
		if s.route == nil {
			if err := s.pickRoute(); err != nil {
				// After a failure, or while a stage has no replica to run
				// it, wait for the grid to heal (a re-plan, a node back
				// from back-off) instead of failing the request.
				heal := lastErr != nil || errors.Is(err, errHealing)
				if !heal || !errors.Is(err, ErrUnavailable) || time.Now().After(deadline) {
					if lastErr != nil {
						return nil, fmt.Errorf("%w (after: %v)", err, lastErr)
					}
					return nil, err
				}
				select {
				case <-ctx.Done():
					return nil, ctx.Err()
				case <-time.After(50 * time.Millisecond):
				}
				continue
			}
		}
		attempt++
		logits, failed, err := s.send(ctx)
		if err == nil {
			s.e.health.succeeded(s.route)
			return logits, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, ErrBadRequest) {
			return nil, err
		}
		lastErr = err
		s.e.log.Warn("stage failed; re-routing", "request", s.req.ID, "node", failed, "err", err)
		s.e.metrics.failover(ctx, StageFailure{Time: time.Now().UTC(), Request: s.req.ID, Model: s.req.Model, Node: failed, Error: err.Error()})
		if failed != "" {
			s.e.health.fail(failed)
		}
		s.recomputed += s.done
		s.failovers++
		for _, hp := range s.route {
			s.e.health.releaseNode(hp.node)
		}
		s.route, s.done = nil, 0
	}
	return nil, fmt.Errorf("%w: %v", ErrUnavailable, lastErr)
}

// send runs the tokens seq[done:] through the route, one hop at a time:
// the router sends each stage its input and takes its output back, so that
// executors only answer requests and never address each other (they need no
// permission to publish work to another node).
func (s *session) send(ctx context.Context) ([]float32, string, error) {
	toks := s.seq[s.done:]
	in := make([]int32, len(toks))
	for i, t := range toks {
		in[i] = int32(t)
	}
	phase := wire.PhaseDecode
	switch {
	case s.done == 0 && len(s.seq) == s.promptLen:
		phase = wire.PhasePrefill
	case len(toks) > 1 || s.done == 0:
		phase = wire.PhaseRecompute
	}
	frame := wire.AppendI32(nil, in)
	cfg := s.model.Manifest.Config
	sampled := s.model.Manifest.ExpertGroups() > 0 && s.e.load.sample()
	for i, hp := range s.route {
		msg := nats.NewMsg(subjects.Stage(hp.node))
		h := msg.Header
		h.Set(wire.HdrRequest, s.req.ID)
		h.Set(wire.HdrModel, s.req.Model)
		h.Set(wire.HdrPlan, strconv.FormatUint(s.plan.Version, 10))
		h.Set(wire.HdrCustomer, s.req.Customer)
		h.Set(wire.HdrPos, strconv.Itoa(s.done))
		h.Set(wire.HdrRange, fmt.Sprintf("%d:%d", hp.first, hp.end))
		h.Set(wire.HdrPhase, phase)
		split := s.splits[i]
		if sampled {
			split = hopLayers(hp)
		}
		if len(split) > 0 {
			h.Set(wire.HdrSplit, joinInts(split))
		}
		msg.Data = frame
		telemetry.Inject(ctx, msg)
		reply, failed, err := s.hop(ctx, hp, msg, len(in), phase, split, s.splits[i])
		if err != nil {
			return nil, failed, err
		}
		f, err := wire.DecodeFrame(reply.Data)
		if err != nil {
			return nil, hp.node, fmt.Errorf("node %s: %w", hp.node, err)
		}
		last := i == len(s.route)-1
		want := cfg.Dim
		if last {
			want = cfg.Vocab
		}
		if f.DType != wire.F32 || f.Cols != want || (!last && f.Rows != len(in)) {
			return nil, hp.node, fmt.Errorf("node %s: reply frame %d×%d, want ×%d", hp.node, f.Rows, f.Cols, want)
		}
		if last {
			logits, err := f.F32(nil)
			if err != nil {
				return nil, hp.node, fmt.Errorf("node %s: %w", hp.node, err)
			}
			s.done = len(s.seq)
			return logits[len(logits)-f.Cols:], "", nil
		}
		// The hidden state goes on to the next stage as it came.
		frame = reply.Data
	}
	return nil, "", fmt.Errorf("empty route")
}

// hop sends msg to hp's node and returns its final answer: while the node
// pauses at a layer of split, the router computes that layer's experts on
// their holders and resumes the node with their summed outputs. Layers of
// split outside spread (the layers whose experts the node does not all
// hold) are paused at only to count their choices, on a sampled pass. It
// returns the node to blame with an error that is a node's fault.
func (s *session) hop(ctx context.Context, hp hop, msg *nats.Msg, rows int, phase string, split, spread []int) (*nats.Msg, string, error) {
	for pauses := 0; ; pauses++ {
		sent := time.Now()
		reply, err := s.call(ctx, hp.node, msg, s.e.stageTimeout+time.Duration(rows)*10*time.Millisecond)
		s.e.metrics.hopDone(ctx, s.req.Model, phase, time.Since(sent))
		if err != nil {
			if ctx.Err() != nil {
				return nil, "", ctx.Err()
			}
			return nil, hp.node, fmt.Errorf("node %s: %w", hp.node, err)
		}
		if e := reply.Header.Get(wire.HdrError); e != "" {
			switch {
			case strings.HasPrefix(e, wire.ErrCodeKVMiss):
				// A replica without our cache: re-run the prefix (not a node fault).
				return nil, "", fmt.Errorf("node %s: %s", hp.node, e)
			case strings.HasPrefix(e, wire.ErrCodeBadRequest):
				return nil, "", fmt.Errorf("%w: %s", ErrBadRequest, e)
			}
			return nil, hp.node, fmt.Errorf("node %s: %s", hp.node, e)
		}
		t := reply.Header.Get(wire.HdrTrunk)
		if t == "" {
			return reply, "", nil
		}
		layer, err := strconv.Atoi(t)
		if err != nil || pauses >= len(split) || layer != split[pauses] {
			return nil, hp.node, fmt.Errorf("node %s: paused at layer %q, want the split layers %v in order", hp.node, t, split)
		}
		held, err := wire.ParseHeld(reply.Header.Get(wire.HdrHeld), s.model.Manifest.ExpertGroups())
		if err != nil {
			return nil, hp.node, fmt.Errorf("node %s: %w", hp.node, err)
		}
		weight := int64(1)
		if !slices.Contains(spread, layer) {
			weight = s.e.load.every
		}
		sum, err := s.runExperts(ctx, msg, layer, rows, reply.Data, held, weight)
		if err != nil {
			if errors.Is(err, wire.ErrFrame) {
				return nil, hp.node, fmt.Errorf("node %s: %w", hp.node, err)
			}
			return nil, "", err
		}
		next := nats.NewMsg(msg.Subject)
		for k, v := range msg.Header {
			next.Header[k] = v
		}
		next.Header.Set(wire.HdrOp, wire.OpResume)
		next.Header.Set(wire.HdrLayer, strconv.Itoa(layer))
		next.Data = wire.AppendF32(nil, rows, s.model.Manifest.Config.Dim, sum)
		msg = next
	}
}

// hopLayers lists the layers hp runs.
func hopLayers(hp hop) []int {
	out := make([]int, 0, hp.end-hp.first)
	for l := hp.first; l < hp.end; l++ {
		out = append(out, l)
	}
	return out
}

// joinInts writes v comma-separated.
func joinInts(v []int) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = strconv.Itoa(x)
	}
	return strings.Join(parts, ",")
}

func holds(r wire.NodeRecord, model string, first, end, layers int) bool {
	have := map[string]bool{}
	for _, f := range r.Heartbeat.Fragments {
		have[f] = true
	}
	if first == 0 && !have[model+"/embed"] {
		return false
	}
	if end == layers && !have[model+"/head"] {
		return false
	}
	for l := first; l < end; l++ {
		if !have[model+"/layer."+strconv.Itoa(l)] {
			return false
		}
	}
	return true
}

// release tells every executor the request is over (caches freed, usage
// published).
func (s *session) release() {
	for _, hp := range s.route {
		s.e.health.releaseNode(hp.node)
	}
	s.calls.close()
	b := []byte(`{"op":"release","request":"` + s.req.ID + `"}`)
	if err := s.e.bus.NC.Publish(subjects.SessionRelease, b); err != nil {
		s.e.log.Warn("release not sent", "request", s.req.ID, "err", err)
	}
}

// health tracks per-node failures (with growing back-off) and in-flight
// requests for route choice.
type health struct {
	mu    sync.Mutex
	fails map[string]*failure
	busy  map[string]int
}

type failure struct {
	count int
	// last is when the node last failed; until is the end of its back-off.
	last, until time.Time
}

func newHealth() *health {
	return &health{fails: map[string]*failure{}, busy: map[string]int{}}
}

// fail records that node failed. Failures while it is backed off already
// (other requests' part of the same outage) do not lengthen the back-off.
func (h *health) fail(node string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now()
	f := h.fails[node]
	if f == nil {
		f = &failure{}
		h.fails[node] = f
	}
	f.last = now
	if now.Before(f.until) {
		return
	}
	f.count++
	f.until = now.Add(time.Duration(1<<min(f.count-1, 8)) * 500 * time.Millisecond)
}

// backedOff reports whether node failed recently; each failure after a
// back-off ended doubles the next (0.5 s, 1 s, 2 s, … up to about 2
// minutes). A node that left the grid and joined it again since its last
// failure (the registry's joined time is later) starts afresh.
func (h *health) backedOff(node string, joined time.Time) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	f := h.fails[node]
	if f != nil && joined.After(f.last) {
		delete(h.fails, node)
		return false
	}
	return f != nil && time.Now().Before(f.until)
}

// succeeded forgets the failures of the nodes of a route that just served.
func (h *health) succeeded(route []hop) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.fails) == 0 {
		return
	}
	for _, hp := range route {
		if f := h.fails[hp.node]; f != nil && time.Now().After(f.until) {
			delete(h.fails, hp.node)
		}
	}
}

func (h *health) acquire(node string) {
	h.mu.Lock()
	h.busy[node]++
	h.mu.Unlock()
}

func (h *health) releaseNode(node string) {
	h.mu.Lock()
	if h.busy[node] > 0 {
		h.busy[node]--
	}
	h.mu.Unlock()
}

func (h *health) inflight(node string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.busy[node]
}

// Conn is the engine's NATS connection.
func (e *Engine) Conn() *nats.Conn { return e.bus.NC }
