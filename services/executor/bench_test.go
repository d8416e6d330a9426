package executor_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/node"
	"github.com/tessera-grid/tessera/services/executor/internal/nodetest"
)

var synthModel = sync.OnceValues(func() (*model.Checkpoint, error) {
	return model.Synthesize(testmodel.BenchConfig, testmodel.BenchSeed)
})

// benchModel is the synthetic model of stories110M's shape.
func benchModel(b *testing.B) *model.Checkpoint {
	b.Helper()
	ck, err := synthModel()
	if err != nil {
		b.Fatal(err)
	}
	return ck
}

func benchTokenizer(b *testing.B) []byte {
	b.Helper()
	tok, err := model.SynthesizeTokenizer(testmodel.BenchConfig.Vocab, testmodel.BenchSeed)
	if err != nil {
		b.Fatal(err)
	}
	return tok
}

// demoModel is the demo model (stories260K) and its tokenizer.
func demoModel(b *testing.B) (*model.Checkpoint, []byte) {
	b.Helper()
	cp, tp, err := testmodel.Paths()
	if err != nil {
		b.Fatal(err)
	}
	ck, err := model.LoadCheckpoint(cp)
	if err != nil {
		b.Fatal(err)
	}
	tok, err := os.ReadFile(tp)
	if err != nil {
		b.Fatal(err)
	}
	return ck, tok
}

// best holds this test binary's best figures (go test -count N).
var best benchfig.Best

// decodeContext is the positions decode cycles through (llama-bench's tg128).
const decodeContext = 128

// hopsPerToken counts the request/reply round trips of one decode step
// through three stages: the router asks each stage in turn.
const hopsPerToken = 3

// BenchmarkPipeline3 measures decode through three executors on loopback
// NATS, each holding four of the twelve layers (the first also the
// embedding, the last the head), fetched from the object store. The same
// three stages called directly in this process are the baseline: each
// position is decoded both ways in turn, so that a disturbance hits both
// alike; decode_pipeline3_vs_direct3 is the ratio of their total times.
//
// The cost of the hops alone is measured on the demo model, whose compute
// (tens of microseconds) leaves the messages' time in plain view:
// hop_overhead_p50_us is the median difference per token between the NATS
// route and the direct calls, divided by the three request/reply round
// trips a token takes (the router sends each stage its input in turn).
func BenchmarkPipeline3(b *testing.B) {
	for _, tc := range []struct{ name, dtype, suffix string }{
		{"f32", model.DTypeF32, ""}, {"q8_0", model.DTypeQ8_0, "_q8"}, {"hops", model.DTypeF32, ""},
	} {
		// Set up once: the sub-benchmark runs several times (b.N ramps up).
		pool := compute.NewPool(0)
		b.Cleanup(pool.Close)
		ck, tok := benchModel(b), benchTokenizer(b)
		if tc.name == "hops" {
			ck, tok = demoModel(b)
		}
		s, route, m, blobs := startPipeline(b, ck, tok, tc.dtype, pool)
		direct := directStages(b, m, blobs, route, pool)
		c := bustest.Connect(b, s, "router")
		req := &nodetest.Request{ID: "bench", Model: m.ID, Route: route}
		viaNATS := func(pos int, tok int32) error {
			_, err := req.Step(context.Background(), c.NC, pos, []int32{tok})
			return err
		}
		toks := testmodel.BenchTokens(decodeContext, m.Config.Vocab)
		b.Run(tc.name, func(b *testing.B) {
			directTimes, natsTimes, nodeTimes := timeDecode(b, toks, direct, viaNATS, req)
			b.ResetTimer()
			start := time.Now()
			for i := 0; i < b.N; i++ {
				if err := viaNATS(i%decodeContext, toks[i%decodeContext]); err != nil {
					b.Fatal(err)
				}
			}
			tps := float64(b.N) / time.Since(start).Seconds()
			b.StopTimer()
			diffs := make([]time.Duration, len(natsTimes))
			for i := range diffs {
				diffs[i] = natsTimes[i] - directTimes[i]
			}
			hop := median(diffs).Seconds() * 1e6 / hopsPerToken
			directTPS := float64(len(directTimes)) / sum(directTimes).Seconds()
			ratio := sum(directTimes).Seconds() / sum(natsTimes).Seconds()
			// Where the pipeline's extra time goes: the nodes' compute
			// against the same stages called directly, and the rest of
			// a token's time (messages, queues) per token.
			nodeCompute := sum(nodeTimes).Seconds() / sum(directTimes).Seconds()
			msgMS := (sum(natsTimes) - sum(nodeTimes)).Seconds() * 1e3 / float64(len(natsTimes))
			b.ReportMetric(tps, "tok/s")
			b.ReportMetric(directTPS, "direct-tok/s")
			b.ReportMetric(hop, "hop-µs")
			b.ReportMetric(ratio, "vs-direct")
			b.ReportMetric(nodeCompute, "node-compute-vs-direct")
			b.ReportMetric(msgMS, "msg-ms/token")
			if b.N < decodeContext {
				return // too short a run to record
			}
			if tc.name == "hops" {
				if err := best.Lower(map[string]float64{"hop_overhead_p50_us": hop}); err != nil {
					b.Fatal(err)
				}
				return
			}
			if err := best.Higher(map[string]float64{
				"decode_tok_s" + tc.suffix + "_pipeline3":      tps,
				"decode_tok_s" + tc.suffix + "_direct3":        directTPS,
				"decode_pipeline3" + tc.suffix + "_vs_direct3": ratio,
			}); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// timeDecode decodes positions 0..127 with both steps in turn, twice over
// (the first pass warms up), and returns the second pass's step times and,
// of the NATS steps, the compute time the nodes reported (req.Compute).
func timeDecode(b *testing.B, toks []int32, direct, viaNATS func(pos int, tok int32) error, req *nodetest.Request) (dt, nt, ct []time.Duration) {
	b.Helper()
	dt = make([]time.Duration, len(toks))
	nt = make([]time.Duration, len(toks))
	ct = make([]time.Duration, len(toks))
	for pass := 0; pass < 2; pass++ {
		for pos, tok := range toks {
			t0 := time.Now()
			if err := direct(pos, tok); err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			if err := viaNATS(pos, tok); err != nil {
				b.Fatal(err)
			}
			dt[pos], nt[pos], ct[pos] = t1.Sub(t0), time.Since(t1), req.Compute
		}
	}
	return dt, nt, ct
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func sum(d []time.Duration) time.Duration {
	var t time.Duration
	for _, v := range d {
		t += v
	}
	return t
}

// startPipeline imports the benchmark model stored as dtype, starts three
// nodes with a plan splitting it in thirds, and waits until they hold their
// fragments. It returns the server, the route, the manifest and the blobs.
//
// The nodes share pool, as executors on separate machines would each have
// all of their cores for their stage: on one machine, separate pools would
// have the idle stages' workers compete with the working one's.
func startPipeline(b *testing.B, ck *model.Checkpoint, tok []byte, dtype string, pool *compute.Pool) (*server.Server, []nodetest.Hop, wire.ModelManifest, []model.Blob) {
	b.Helper()
	blobs, m, err := model.Fragments(fmt.Sprintf("bench-%dx%d-%s", ck.Config.Dim, ck.Config.Layers, dtype), ck, tok, model.FragmentOptions{DType: dtype})
	if err != nil {
		b.Fatal(err)
	}
	s := bustest.Server(b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	admin := bustest.Connect(b, s, "admin")
	st, err := fragstore.Open(ctx, admin.JS)
	if err != nil {
		b.Fatal(err)
	}
	if err := st.Import(ctx, blobs, tok, m, nil); err != nil {
		b.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	L := m.Config.Layers
	route := []nodetest.Hop{{Node: "a", First: 0, End: L / 3}, {Node: "b", First: L / 3, End: 2 * L / 3}, {Node: "c", First: 2 * L / 3, End: L}}
	nodes := make([]*node.Node, len(route))
	for i, h := range route {
		nodes[i] = nodetest.Start(b, s, node.Options{ID: h.Node, Pool: pool}, log)
	}
	if err := nodetest.PutPlan(ctx, admin, nodetest.Plan(m.ID, m.Config.Layers, route)); err != nil {
		b.Fatal(err)
	}
	bustest.CheckFor(b, 5*time.Minute, 50*time.Millisecond, func() error {
		for i, n := range nodes {
			want := route[i].End - route[i].First + 1 // its layers and the embedding or head
			if i == 1 {
				want--
			}
			if got := len(n.Status().Fragments); got != want {
				return fmt.Errorf("node %s holds %d of %d fragments", route[i].Node, got, want)
			}
		}
		return nil
	})
	return s, route, m, blobs
}

// directStages builds the route's three stages in this process from the
// same blobs and returns a decode step running them one after another.
func directStages(b *testing.B, m wire.ModelManifest, blobs []model.Blob, route []nodetest.Hop, pool *compute.Pool) func(pos int, tok int32) error {
	b.Helper()
	cfg := m.Config
	frags := map[string]*model.Fragment{}
	for _, bl := range blobs {
		f, err := model.DecodeFragment(bl.Ref.ID, bl.Data)
		if err != nil {
			b.Fatal(err)
		}
		frags[bl.Ref.ID] = f
	}
	var stages []*compute.Stage
	var caches []*compute.Cache
	for i, h := range route {
		var layers []*compute.Layer
		for l := h.First; l < h.End; l++ {
			ly, err := compute.LayerFromFragment(cfg, frags[model.LayerFragment(l)])
			if err != nil {
				b.Fatal(err)
			}
			layers = append(layers, ly)
		}
		var emb *compute.Embedding
		var head *compute.Head
		var err error
		if i == 0 {
			if emb, err = compute.EmbeddingFromFragment(cfg, frags[model.FragEmbed]); err != nil {
				b.Fatal(err)
			}
		}
		if i == len(route)-1 {
			if head, err = compute.HeadFromFragment(cfg, frags[model.FragHead]); err != nil {
				b.Fatal(err)
			}
		}
		st, err := compute.NewStage(cfg, h.First, h.End, emb, layers, head, pool)
		if err != nil {
			b.Fatal(err)
		}
		stages = append(stages, st)
		caches = append(caches, compute.NewCache(cfg, h.End-h.First))
	}
	it := &compute.Item{N: 1}
	items := []*compute.Item{it}
	tok := make([]int32, 1)
	return func(pos int, t int32) error {
		tok[0] = t
		it.Pos, it.Tokens, it.Hidden = pos, tok, it.Hidden[:0]
		for i, st := range stages {
			it.Cache = caches[i]
			if i > 0 {
				it.Tokens = nil
			}
			if err := st.Forward(items); err != nil {
				return err
			}
		}
		return nil
	}
}
