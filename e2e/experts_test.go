package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// moeTestConfig is a small seeded mixture of experts: 4 layers of 8
// experts, 2 active per token, over the demo model's 512-token vocabulary.
var moeTestConfig = wire.ModelConfig{Dim: 64, HiddenDim: 96, Layers: 4, Heads: 4, KVHeads: 2, Vocab: 512, SeqLen: 128,
	SharedClassifier: true, Experts: 8, TopK: 2}

// startExpertGrid runs n executors whose planner spreads each layer's
// experts over spread of them, imports ck as model id (fragments as opts
// says) and waits until every node holds its experts.
// synthMoE returns the seeded synthetic mixture of experts of these tests,
// as a model to import, and the prompt's tokens.
func synthMoE(t testing.TB) (*model.Checkpoint, *expertModel, []int) {
	t.Helper()
	ck, err := model.Synthesize(moeTestConfig, 42)
	if err != nil {
		t.Fatal(err)
	}
	tb, prompt := demoTokenizer(t, moeTestConfig.Vocab)
	return ck, &expertModel{ck: ck, tok: tb, groups: moeTestConfig.Experts}, prompt
}

func startExpertGrid(t testing.TB, n, spread int, models map[string]*expertModel, tweaks ...func(*local.Options)) (*local.Grid, string) {
	t.Helper()
	o := testOptions(t)
	o.Executors = n
	o.Router.HTTPAddr = "127.0.0.1:0"
	o.Router.AnonymousCustomer = "tester"
	o.Router.StageTimeout = 5 * time.Second
	o.Router.ExpertLoadInterval = 100 * time.Millisecond
	o.Planner.Settle = 200 * time.Millisecond
	o.Planner.ExpertSpread = spread
	// Nodes holding some of a layer's experts are challenged on what they
	// hold, often; their answers are under test here, not their speed on
	// two shared cores.
	o.Registry.ChallengeEvery = 300 * time.Millisecond
	o.Registry.ChallengeSlack = 5 * time.Second
	o.Executor.HeartbeatInterval = 200 * time.Millisecond
	o.Executor.Threads = 1
	for _, tw := range tweaks {
		tw(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, err := local.Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	st, err := fragstore.Open(ctx, g.Admin.JS)
	if err != nil {
		t.Fatal(err)
	}
	for id, m := range models {
		blobs, man, err := model.Fragments(id, m.ck, m.tok, m.opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Import(ctx, blobs, m.tok, man, nil); err != nil {
			t.Fatal(err)
		}
	}
	addr, err := g.HTTPAddr(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for id, m := range models {
		m.plan = waitExpertsLoaded(t, g, id, n, spread, m.groups)
	}
	return g, "http://" + addr
}

// expertModel is a model of the expert tests: its checkpoint, tokenizer
// and fragment options, its expert groups per layer, and (once loaded) its
// plan.
type expertModel struct {
	ck     *model.Checkpoint
	tok    []byte
	opts   model.FragmentOptions
	groups int
	plan   wire.Plan
}

// waitExpertsLoaded waits for a plan of model id over n nodes that spreads
// its experts (when spread is above 1), and for every node to report the
// fragments it assigns.
func waitExpertsLoaded(t testing.TB, g *local.Grid, id string, n, spread, groups int) wire.Plan {
	t.Helper()
	return waitPlan(t, g, id, n, func(a wire.Assignment, r wire.NodeRecord) error {
		if spread > 1 && (len(a.Experts) == 0 || len(a.Experts) == groups) {
			return fmt.Errorf("node %s holds experts %v: not spread", a.Node, a.Experts)
		}
		held := a.Experts
		if len(held) == 0 {
			for e := 0; e < groups; e++ {
				held = append(held, e)
			}
		}
		for l := a.First; l < a.End; l++ {
			for _, x := range held {
				if f := id + "/" + model.ExpertFragment(l, x); !slices.Contains(r.Heartbeat.Fragments, f) {
					return fmt.Errorf("node %s has not loaded %s yet", a.Node, f)
				}
			}
		}
		return nil
	})
}

// holderOf maps each expert to the nodes whose assignment lists it.
func holderOf(plan wire.Plan) map[int][]string {
	out := map[int][]string{}
	for _, a := range plan.Assignments {
		for _, e := range a.Experts {
			out[e] = append(out[e], a.Node)
		}
	}
	return out
}

// reference is a single-process greedy run of a model: per step the
// logits, and per (layer, position) the FFN input and the chosen experts.
type reference struct {
	tokens  []int
	logits  [][]float32
	normed  map[[2]int][]float32
	choices map[[2]int][]int
}

// runReference generates steps tokens greedily after prompt in one
// process, the layers run by a compute.Pass so that every layer's choice
// of experts is seen.
func runReference(t *testing.T, ck *model.Checkpoint, opts model.FragmentOptions, prompt []int, steps int) *reference {
	t.Helper()
	pool := compute.NewPool(1)
	defer pool.Close()
	st, err := referenceStage(ck, opts, pool)
	if err != nil {
		t.Fatal(err)
	}
	c := st.Config
	ref := &reference{normed: map[[2]int][]float32{}, choices: map[[2]int][]int{}}
	cache := compute.NewCache(c, c.Layers)
	in, pos := prompt, 0
	for s := 0; s < steps; s++ {
		toks := make([]int32, len(in))
		for i, v := range in {
			toks[i] = int32(v)
		}
		it := &compute.Item{Cache: cache, Pos: pos, N: len(in), Tokens: toks}
		p, err := st.Begin([]*compute.Item{it})
		if err != nil {
			t.Fatal(err)
		}
		for l := 0; l < c.Layers; l++ {
			if err := p.Trunk(l); err != nil {
				t.Fatal(err)
			}
			for r := 0; r < p.Rows; r++ {
				k := [2]int{l, pos + r}
				ref.normed[k] = append([]float32(nil), p.Normed[r*c.Dim:(r+1)*c.Dim]...)
				for _, ch := range p.Choices[r*p.K : (r+1)*p.K] {
					ref.choices[k] = append(ref.choices[k], int(ch.Expert))
				}
			}
			if err := p.FFN(); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Finish(); err != nil {
			t.Fatal(err)
		}
		ref.logits = append(ref.logits, append([]float32(nil), it.Logits...))
		next := compute.Argmax(it.Logits)
		ref.tokens = append(ref.tokens, next)
		pos += len(in)
		in = []int{next}
	}
	return ref
}

// traffic records the grid's messages that the expert tests check: the
// expert requests and the logits the last stage returns.
type traffic struct {
	mu      sync.Mutex
	experts []expertCall
	logits  [][]float32
	// stages are the nodes that got stage requests, per request.
	stages map[string][]string
	// released are the requests whose release went out. The router sends
	// it after all of a request's messages, and one server hands a
	// subscriber the messages in the order it took them in: once a release
	// is seen, so is everything of its request.
	released map[string]bool
}

// expertCall is one expert request as its node received it.
type expertCall struct {
	node    string
	request string
	layer   int
	routed  wire.Routed
	// local is set for experts the stage node computed itself (HdrHeld).
	local bool
}

// watchTraffic subscribes to every subject of the grid.
func watchTraffic(t testing.TB, g *local.Grid, dim, vocab, groups int) *traffic {
	t.Helper()
	tr := &traffic{stages: map[string][]string{}, released: map[string]bool{}}
	sub, err := g.Admin.NC.Subscribe(">", func(m *nats.Msg) {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		if m.Subject == subjects.SessionRelease {
			var c wire.Control
			if wire.Decode(m.Data, &c) == nil {
				tr.released[c.Request] = true
			}
			return
		}
		if node, ok := strings.CutSuffix(strings.TrimPrefix(m.Subject, subjects.Root+".node."), ".stage"); ok && m.Subject == subjects.Stage(node) {
			req := m.Header.Get(wire.HdrRequest)
			if !slices.Contains(tr.stages[req], node) {
				tr.stages[req] = append(tr.stages[req], node)
			}
			return
		}
		if node, ok := strings.CutSuffix(strings.TrimPrefix(m.Subject, subjects.Root+".node."), ".expert"); ok && m.Subject == subjects.Expert(node) {
			l, _ := strconv.Atoi(m.Header.Get(wire.HdrLayer))
			r, err := wire.DecodeRouted(m.Data, dim, groups)
			if err != nil {
				t.Errorf("expert request to %s: %v", node, err)
				return
			}
			tr.experts = append(tr.experts, expertCall{node: node, request: m.Header.Get(wire.HdrRequest), layer: l, routed: r})
			return
		}
		if l := m.Header.Get(wire.HdrTrunk); l != "" && m.Header.Get(wire.HdrHeld) != "" {
			// A paused stage node computed the chosen experts it holds:
			// those rows reached it as if sent.
			layer, _ := strconv.Atoi(l)
			held, err := wire.ParseHeld(m.Header.Get(wire.HdrHeld), groups)
			if err != nil {
				t.Errorf("paused answer of %s: %v", m.Header.Get(wire.HdrNode), err)
				return
			}
			r, err := wire.DecodeRouted(m.Data, dim, groups)
			if err != nil {
				t.Errorf("paused answer of %s: %v", m.Header.Get(wire.HdrNode), err)
				return
			}
			local := wire.Routed{Dim: dim, K: r.K}
			for row := 0; row < r.Rows; row++ {
				es := slices.Clone(r.Experts[row*r.K : (row+1)*r.K])
				ws := slices.Clone(r.Weights[row*r.K : (row+1)*r.K])
				any := false
				for i, e := range es {
					if e < 0 || !held[e] {
						es[i], ws[i] = -1, 0
					} else {
						any = true
					}
				}
				if any {
					local.Rows++
					local.X = append(local.X, r.X[row*dim:(row+1)*dim]...)
					local.Experts, local.Weights = append(local.Experts, es...), append(local.Weights, ws...)
				}
			}
			tr.experts = append(tr.experts, expertCall{node: m.Header.Get(wire.HdrNode), request: m.Header.Get(wire.HdrRequest), layer: layer, routed: local, local: true})
			return
		}
		if f, err := wire.DecodeFrame(m.Data); err == nil && f.DType == wire.F32 && f.Cols == vocab && f.Rows == 1 {
			v, _ := f.F32(nil)
			tr.logits = append(tr.logits, v)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	sub.SetPendingLimits(-1, -1)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	// The server has the subscription before any request starts.
	if err := g.Admin.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	return tr
}

// wait waits until everything of request has been seen (its release).
func (tr *traffic) wait(t testing.TB, request string) {
	t.Helper()
	bustest.CheckFor(t, 10*time.Second, 5*time.Millisecond, func() error {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		if !tr.released[request] {
			return fmt.Errorf("request %s not released yet", request)
		}
		return nil
	})
}

// routedTo checks every expert request of request against the reference:
// each row is matched to its position by its FFN input, and the experts
// it asks for are the reference's choices for that row that the node
// holds. It returns, per (layer, position), the nodes that received the
// row.
func (tr *traffic) routedTo(t *testing.T, request string, ref *reference, holders map[int][]string) map[[2]int][]string {
	t.Helper()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	got := map[[2]int][]string{}
	for _, c := range tr.experts {
		if c.request != request {
			continue
		}
		r := c.routed
		for row := 0; row < r.Rows; row++ {
			x := r.X[row*r.Dim : (row+1)*r.Dim]
			pos, best := -1, math.Inf(1)
			for k, v := range ref.normed {
				if k[0] != c.layer {
					continue
				}
				if d := maxAbsDiff(x, v); d < best {
					pos, best = k[1], d
				}
			}
			if best > 1e-3 {
				t.Fatalf("layer %d: a row sent to %s matches no reference row (closest differs by %g)", c.layer, c.node, best)
			}
			k := [2]int{c.layer, pos}
			var asked, want []int
			for _, e := range r.Experts[row*r.K : (row+1)*r.K] {
				if e >= 0 {
					asked = append(asked, int(e))
				}
			}
			for _, e := range ref.choices[k] {
				if slices.Contains(holders[e], c.node) {
					want = append(want, e)
				}
			}
			sort.Ints(asked)
			sort.Ints(want)
			if !slices.Equal(asked, want) {
				t.Errorf("layer %d position %d: %s was asked for experts %v, the row chose %v of which it holds %v", c.layer, pos, c.node, asked, ref.choices[k], want)
			}
			got[k] = append(got[k], c.node)
		}
	}
	return got
}

// reachedExactly checks that every (layer, position) row of the reference
// reached exactly the holders of the experts it chose, each once.
func reachedExactly(t *testing.T, got map[[2]int][]string, ref *reference, holders map[int][]string) {
	t.Helper()
	if len(got) != len(ref.choices) {
		t.Errorf("%d (layer, position) rows reached experts, the reference has %d", len(got), len(ref.choices))
	}
	for k, chosen := range ref.choices {
		var want []string
		for _, e := range chosen {
			want = append(want, holders[e]...)
		}
		sort.Strings(want)
		want = slices.Compact(want)
		nodes := slices.Clone(got[k])
		sort.Strings(nodes)
		if !slices.Equal(nodes, want) {
			t.Errorf("layer %d position %d chose experts %v: reached %v, want exactly %v", k[0], k[1], chosen, got[k], want)
		}
	}
}

func maxAbsDiff(a, b []float32) float64 {
	d := 0.0
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

// referenceStage is the whole model in one stage (with every expert).
func referenceStage(ck *model.Checkpoint, opts model.FragmentOptions, pool *compute.Pool) (*compute.Stage, error) {
	if opts.Grouping == nil {
		return compute.StageFromCheckpoint(ck, 0, ck.Config.Layers, pool)
	}
	return groupedStage(ck, opts.Grouping, pool)
}

// demoTokenizer returns the demo model's tokenizer file and prompt ids.
func demoTokenizer(t testing.TB, vocab int) ([]byte, []int) {
	t.Helper()
	_, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	tb, err := os.ReadFile(tp)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := model.ParseTokenizer(tp, tb, vocab)
	if err != nil {
		t.Fatal(err)
	}
	return tb, tok.Encode(testmodel.Prompt, true, false)
}

// completeGreedy asks the grid for a greedy completion of the demo prompt.
func completeGreedy(t testing.TB, base, id string, tokens int) wire.CompletionResponse {
	t.Helper()
	res, err := tryCompleteGreedy(base, id, tokens)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// A synthetic mixture of experts with its experts spread over three
// executors gives the single-process tokens and logits, and each token's
// hidden state reaches exactly the executors holding its top-k experts in
// each layer, never the others. The routers' expert-use counts reach KV
// expertload.
func TestMoEExpertsSpreadOverThreeExecutors(t *testing.T) {
	const id, steps = "moe-test", 8
	ck, m, prompt := synthMoE(t)
	g, base := startExpertGrid(t, 3, 3, map[string]*expertModel{id: m})
	holders := holderOf(m.plan)
	for e := 0; e < moeTestConfig.Experts; e++ {
		if len(holders[e]) != 1 {
			t.Fatalf("expert %d held by %v, want one node", e, holders[e])
		}
	}
	ref := runReference(t, ck, model.FragmentOptions{}, prompt, steps)
	tr := watchTraffic(t, g, moeTestConfig.Dim, moeTestConfig.Vocab, moeTestConfig.Experts)
	res := completeGreedy(t, base, id, steps)
	if !slices.Equal(res.Tokens, ref.tokens) {
		t.Fatalf("grid tokens %v, single process %v", res.Tokens, ref.tokens)
	}
	tr.wait(t, res.ID)
	tr.mu.Lock()
	logits := tr.logits
	tr.mu.Unlock()
	if len(logits) != steps {
		t.Fatalf("saw %d logits frames, want %d", len(logits), steps)
	}
	for s := range logits {
		if d := maxAbsDiff(logits[s], ref.logits[s]); d > 1e-3 {
			t.Fatalf("step %d: logits differ from the single process by %g", s, d)
		}
	}
	got := tr.routedTo(t, res.ID, ref, holders)
	reachedExactly(t, got, ref, holders)
	if c := tr.contacted(res.ID); len(c) < 2 {
		t.Errorf("experts of only %v were used: the test does not exercise spreading", c)
	}
	// The routers' counts: every row's choices, per layer and expert.
	want := make([][]int64, moeTestConfig.Layers)
	for l := range want {
		want[l] = make([]int64, moeTestConfig.Experts)
	}
	for k, chosen := range ref.choices {
		for _, e := range chosen {
			want[k[0]][e]++
		}
	}
	checkExpertLoad(t, g, id, want)
	// The registry challenged the nodes on the trunks and experts they hold,
	// and they passed.
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		reply, err := g.Admin.NC.Request(subjects.RegistryStats, nil, time.Second)
		if err != nil {
			return err
		}
		var st wire.RegistryStats
		if err := json.Unmarshal(reply.Data, &st); err != nil {
			return err
		}
		if st.ChallengesFailed > 0 || st.ByState[wire.NodeQuarantined] > 0 {
			t.Fatalf("registry stats %+v: a challenge failed", st)
		}
		if st.ChallengesPassed < 3 {
			return fmt.Errorf("%d challenges passed", st.ChallengesPassed)
		}
		return nil
	})
	// Requests at once share the stage's paused passes and the holders'
	// expert batches, and keep their own output.
	const n = 4
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			code, b := post(t, base+"/v1/completions", fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":%d,"temperature":0}`, id, testmodel.Prompt, steps))
			var r wire.CompletionResponse
			if err := json.Unmarshal(b, &r); err != nil || code != http.StatusOK || !slices.Equal(r.Tokens, ref.tokens) {
				errs <- fmt.Errorf("HTTP %d: tokens %v (%v), want %v", code, r.Tokens, err, ref.tokens)
				return
			}
			errs <- nil
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// checkExpertLoad waits until KV expertload holds want for model id.
func checkExpertLoad(t *testing.T, g *local.Grid, id string, want [][]int64) {
	t.Helper()
	kv, err := g.Admin.JS.KeyValue(context.Background(), subjects.BucketExpertLoad)
	if err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		e, err := kv.Get(context.Background(), id)
		if err != nil {
			return err
		}
		var load wire.ExpertLoad
		if err := wire.Decode(e.Value(), &load); err != nil {
			return err
		}
		for l := range want {
			if !slices.Equal(load.Counts[l], want[l]) {
				return fmt.Errorf("layer %d counts %v, want %v", l, load.Counts[l], want[l])
			}
		}
		return nil
	})
}

// groupedStage is a dense checkpoint's whole model in one stage with each
// FFN cut into the grouping's neuron groups, chosen by its scorer, as the
// grid computes it.
func groupedStage(ck *model.Checkpoint, grp *model.FFNGrouping, pool *compute.Pool) (*compute.Stage, error) {
	c := ck.Config
	c.FFNGroups, c.TopK = grp.Groups(), grp.TopK
	layers, err := compute.GroupedLayers(ck, grp)
	if err != nil {
		return nil, err
	}
	emb := &compute.Embedding{Table: compute.NewMatrixF32(c.Vocab, c.Dim, ck.TokenEmbedding)}
	head := &compute.Head{Norm: ck.FinalNorm, Classifier: compute.NewMatrixF32(c.Vocab, c.Dim, ck.Classifier)}
	return compute.NewStage(c, 0, c.Layers, emb, layers, head, pool)
}

// usageOf returns the usage events of request in stream USAGE, waiting
// until the stage with the head and every node in experts has published.
func usageOf(t testing.TB, g *local.Grid, request string, experts []string) []wire.UsageEvent {
	t.Helper()
	ctx := context.Background()
	st, err := g.Admin.JS.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	var out []wire.UsageEvent
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		out = out[:0]
		info, err := st.Info(ctx)
		if err != nil {
			return err
		}
		head := false
		seen := map[string]bool{}
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
			m, err := st.GetMsg(ctx, seq)
			if err != nil {
				return err
			}
			var u wire.UsageEvent
			if err := json.Unmarshal(m.Data, &u); err != nil || u.Request != request {
				continue
			}
			out = append(out, u)
			head = head || u.GeneratedTokens > 0
			if strings.HasPrefix(u.Fragment, "experts") {
				seen[u.Node] = true
			}
		}
		if !head {
			return fmt.Errorf("no usage of the head stage for %s yet", request)
		}
		for _, n := range experts {
			if !seen[n] {
				return fmt.Errorf("no expert usage of %s for %s yet", n, request)
			}
		}
		return nil
	})
	return out
}

// usageTotals sums a request's events: all FLOPs, the expert holders'
// FLOPs, and all messages.
func usageTotals(events []wire.UsageEvent) (flops, expertFLOPs, messages int64) {
	for _, u := range events {
		flops += u.FLOPs
		messages += u.Messages
		if strings.HasPrefix(u.Fragment, "experts") {
			expertFLOPs += u.FLOPs
		}
	}
	return flops, expertFLOPs, messages
}

// contacted lists the nodes that computed experts for request: those
// that got expert requests and stage nodes that computed their own.
func (tr *traffic) contacted(request string) []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var out []string
	for _, c := range tr.experts {
		if c.request == request && !slices.Contains(out, c.node) {
			out = append(out, c.node)
		}
	}
	sort.Strings(out)
	return out
}

// groupedDemoModels returns the demo model and two expert models of it
// with each FFN cut into groups neuron groups (fitted on the model's own
// text): all, with every group active, and two, with 2 active.
func groupedDemoModels(t testing.TB, groups int, all, two string) (*model.Checkpoint, map[string]*expertModel) {
	t.Helper()
	cp, _, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	ck, err := model.LoadCheckpoint(cp)
	if err != nil {
		t.Fatal(err)
	}
	pool := compute.NewPool(1)
	defer pool.Close()
	calib, err := compute.CalibrationSequences(ck, 4, 64, pool)
	if err != nil {
		t.Fatal(err)
	}
	every, err := compute.FitGrouping(ck, calib, groups, groups, pool)
	if err != nil {
		t.Fatal(err)
	}
	some := *every
	some.TopK = 2
	tb, _ := demoTokenizer(t, ck.Config.Vocab)
	return ck, map[string]*expertModel{
		all: {ck: ck, tok: tb, opts: model.FragmentOptions{Grouping: every}, groups: groups},
		two: {ck: ck, tok: tb, opts: model.FragmentOptions{Grouping: &some}, groups: groups},
	}
}

// The demo model with each FFN cut into 4 neuron groups, one group per
// executor: with all 4 groups active the grid gives llama2.c's greedy
// output exactly; with 2 active each row reaches only the executors of
// the groups its predictor chose (as in one process), and the executors'
// usage events bill half the groups' FLOPs and fewer messages.
func TestSelectiveGroupsOnTheGrid(t *testing.T) {
	const groups, steps = 4, 16
	ck, models := groupedDemoModels(t, groups, "stories-k4", "stories-k2")
	two := models["stories-k2"].opts.Grouping
	// Gate and up projections for 2 groups that differ from the dense
	// ones, as a distilled model's do (4 calibration sequences are too few
	// to distil), so that each holder must compute with its group's own
	// from its fragment to give the one-process result.
	two.Gate, two.Up = make([][][]float32, ck.Config.Layers), make([][][]float32, ck.Config.Layers)
	for l := range two.Gate {
		two.Gate[l], two.Up[l] = make([][]float32, groups), make([][]float32, groups)
		two.Gate[l][2], two.Up[l][2] = slices.Clone(ck.W1[l]), slices.Clone(ck.W3[l])
		for i := range two.Gate[l][2] {
			two.Gate[l][2][i] *= 1.05
			two.Up[l][2][i] *= 0.95
		}
	}
	_, prompt := demoTokenizer(t, ck.Config.Vocab)
	g, base := startExpertGrid(t, groups, groups, models)
	tr := watchTraffic(t, g, ck.Config.Dim, ck.Config.Vocab, groups)

	dense := completeGreedy(t, base, "stories-k4", len(testmodel.GreedyIDs))
	if !slices.Equal(dense.Tokens, testmodel.GreedyIDs) {
		t.Fatalf("k=4 tokens %v\nwant llama2.c's %v", dense.Tokens, testmodel.GreedyIDs)
	}
	if dense.Choices[0].Text != testmodel.GreedyText {
		t.Fatalf("k=4 text %q, want %q", dense.Choices[0].Text, testmodel.GreedyText)
	}

	// The same number of tokens at k=4 and k=2, to compare their bills.
	ref := runReference(t, ck, model.FragmentOptions{Grouping: two}, prompt, steps)
	sel := completeGreedy(t, base, "stories-k2", steps)
	if !slices.Equal(sel.Tokens, ref.tokens) {
		t.Fatalf("k=2 grid tokens %v, single process %v", sel.Tokens, ref.tokens)
	}
	holders := holderOf(models["stories-k2"].plan)
	tr.wait(t, sel.ID)
	reachedExactly(t, tr.routedTo(t, sel.ID, ref, holders), ref, holders)
	full := completeGreedy(t, base, "stories-k4", steps)
	tr.wait(t, full.ID)
	fullUse := usageOf(t, g, full.ID, tr.contacted(full.ID))
	selUse := usageOf(t, g, sel.ID, tr.contacted(sel.ID))
	fFLOPs, fExpert, fMsgs := usageTotals(fullUse)
	sFLOPs, sExpert, sMsgs := usageTotals(selUse)
	t.Logf("k=4: %d FLOPs (%d in groups), %d messages; k=2: %d FLOPs (%d in groups), %d messages", fFLOPs, fExpert, fMsgs, sFLOPs, sExpert, sMsgs)
	if 2*sExpert != fExpert {
		t.Errorf("k=2 groups billed %d FLOPs, want half of k=4's %d", sExpert, fExpert)
	}
	if sFLOPs >= fFLOPs || sMsgs >= fMsgs {
		t.Errorf("k=2 billed %d FLOPs and %d messages, k=4 %d and %d: selective must cost less", sFLOPs, sMsgs, fFLOPs, fMsgs)
	}
}

// Experts not spread: every executor holds all experts of its layers and
// runs each layer whole (its experts loaded from their own fragments), with
// the single-process tokens and no expert request.
func TestMoEWholeOnEachExecutor(t *testing.T) {
	const id, steps = "moe-whole", 8
	ck, m, prompt := synthMoE(t)
	g, base := startExpertGrid(t, 2, 0, map[string]*expertModel{id: m})
	ref := runReference(t, ck, model.FragmentOptions{}, prompt, steps)
	tr := watchTraffic(t, g, moeTestConfig.Dim, moeTestConfig.Vocab, moeTestConfig.Experts)
	res := completeGreedy(t, base, id, steps)
	if !slices.Equal(res.Tokens, ref.tokens) {
		t.Fatalf("grid tokens %v, single process %v", res.Tokens, ref.tokens)
	}
	tr.wait(t, res.ID)
	if c := tr.contacted(res.ID); len(c) != 0 {
		t.Fatalf("expert requests went to %v although every stage holds all experts", c)
	}
}

// An executor computing replicated experts dies in the middle of
// generations that use it both ways: as a holder another stage node sends
// them to (that router sends the rows to the other holder), and as the
// stage node computing its own (the router moves the stage, whose new node
// computes them or sends them to the other holder). Several requests run
// at once so that, the router spreading them by load, one stage node holds
// no replicated shard and must send those experts out. Every request
// finishes with the single-process tokens.
func TestExpertHolderFailsOver(t *testing.T) {
	const id, steps, streams = "moe-failover", 60, 4
	ck, m, prompt := synthMoE(t)
	// Two shards over three nodes: one shard lives on two of them. No
	// speed tests: the nodes' speeds on two shared cores would tilt the
	// router's choice, and with equal speeds it spreads the requests by
	// load over all three nodes.
	g, base := startExpertGrid(t, 3, 2, map[string]*expertModel{id: m}, func(o *local.Options) { o.Executor.SpeedTest = -1 })
	holders := holderOf(m.plan)
	ref := runReference(t, ck, model.FragmentOptions{}, prompt, steps)
	tr := watchTraffic(t, g, moeTestConfig.Dim, moeTestConfig.Vocab, moeTestConfig.Experts)
	type result struct {
		res wire.CompletionResponse
		err error
	}
	done := make(chan result, streams)
	for i := 0; i < streams; i++ {
		go func() {
			res, err := tryCompleteGreedy(base, id, steps)
			done <- result{res, err}
		}()
	}
	// The victim: a node a request's stage node sends replicated experts
	// to, while it is itself the stage node of another request.
	var victim, spare, sender, hosted string
	var mark int
	bustest.CheckFor(t, 30*time.Second, 5*time.Millisecond, func() error {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		victim, sender, hosted = "", "", ""
		for _, c := range tr.experts {
			st := tr.stages[c.request]
			if c.local || len(st) != 1 || st[0] == c.node {
				continue
			}
			for _, e := range c.routed.Experts {
				if e >= 0 && len(holders[int(e)]) == 2 {
					victim, sender = c.node, c.request
					spare = holders[int(e)][0]
					if spare == victim {
						spare = holders[int(e)][1]
					}
				}
			}
		}
		if victim == "" {
			return errors.New("no stage node has sent replicated experts to another node yet")
		}
		for req, st := range tr.stages {
			if len(st) == 1 && st[0] == victim && !tr.released[req] {
				hosted = req
			}
		}
		if hosted == "" {
			return fmt.Errorf("%s holds replicated experts but is no running request's stage node", victim)
		}
		mark = len(tr.experts)
		return nil
	})
	t.Logf("killing %s: holder for request %s (spare %s), stage node of request %s", victim, sender, spare, hosted)
	if err := g.Kill(victim); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < streams; i++ {
		r := <-done
		if r.err != nil {
			t.Fatalf("after losing %s: %v", victim, r.err)
		}
		if !slices.Equal(r.res.Tokens, ref.tokens) {
			t.Fatalf("tokens after losing %s: %v, single process %v", victim, r.res.Tokens, ref.tokens)
		}
		tr.wait(t, r.res.ID)
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	// The request that sent experts to the victim sent them to the spare
	// afterwards.
	toSpare := false
	for _, c := range tr.experts[mark:] {
		toSpare = toSpare || (c.request == sender && c.node == spare)
	}
	if !toSpare {
		t.Errorf("after %s died, request %s sent the spare holder %s none of its experts", victim, sender, spare)
	}
	// The request whose stage node died moved to another node.
	if st := tr.stages[hosted]; len(st) < 2 {
		t.Errorf("request %s ran only on %v although its stage node %s died", hosted, st, victim)
	}
}

// tryCompleteGreedy is completeGreedy for goroutines other than the
// test's: it returns what went wrong.
func tryCompleteGreedy(base, id string, tokens int) (wire.CompletionResponse, error) {
	var res wire.CompletionResponse
	body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":%d,"temperature":0}`, id, testmodel.Prompt, tokens)
	resp, err := http.Post(base+"/v1/completions", "application/json", strings.NewReader(body))
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return res, err
	}
	if resp.StatusCode != http.StatusOK {
		return res, fmt.Errorf("HTTP %d: %s", resp.StatusCode, b)
	}
	return res, json.Unmarshal(b, &res)
}
