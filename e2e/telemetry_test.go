package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry/telemetrytest"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
)

// telemetryGrid is a pipeline over three executors with settlement on a
// real ClickHouse, with in-memory OpenTelemetry providers installed
// before anything starts.
func telemetryGrid(t *testing.T) (*telemetrytest.Recorder, *local.Grid, string, settlement.Config) {
	t.Helper()
	rec := telemetrytest.Install(t)
	o := testOptions(t)
	o.Executors = 3
	o.Router.HTTPAddr = "127.0.0.1:0"
	o.Router.AnonymousCustomer = "tester"
	o.Planner.Strategy = "exo"
	o.NoSettlement = false
	o.Settlement.ClickHouseAddr, o.Settlement.ClickHouseDatabase = []string{proctest.ClickHouse(t)}, "tessera_telemetry"
	o.Settlement.BatchWait = 50 * time.Millisecond
	g, base := startGridWith(t, o)
	return rec, g, base, o.Settlement
}

// complete runs one greedy completion and returns its response.
func complete(t *testing.T, base string, maxTokens int) wire.CompletionResponse {
	t.Helper()
	code, b := post(t, base+"/v1/completions", fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":%d,"temperature":0}`, testmodel.ID, testmodel.Prompt, maxTokens))
	if code != http.StatusOK {
		t.Errorf("HTTP %d: %s", code, b)
		return wire.CompletionResponse{}
	}
	var res wire.CompletionResponse
	if err := json.Unmarshal(b, &res); err != nil {
		t.Error(err)
	}
	return res
}

func attr(s sdktrace.ReadOnlySpan, key string) string {
	for _, a := range s.Attributes() {
		if a.Key == attribute.Key(key) {
			return a.Value.Emit()
		}
	}
	return ""
}

// Each request is one trace: the router's span is its root, every stage
// request on every executor is a child of it, and so is settlement's span
// for each of the request's usage events, which carry the trace from the
// executors through stream USAGE. Two requests at once do not mix.
func TestOneTracePerRequest(t *testing.T) {
	rec, _, base, scfg := telemetryGrid(t)
	const maxTokens = 4
	var wg sync.WaitGroup
	results := make([]wire.CompletionResponse, 2)
	for i := range results {
		wg.Go(func() { results[i] = complete(t, base, maxTokens) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for _, res := range results {
		// Every executor's usage settled: three rows.
		bustest.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
			rows, err := settlement.RequestUsage(context.Background(), scfg, res.ID)
			if err != nil {
				return err
			}
			if len(rows) != 3 {
				return fmt.Errorf("%d usage rows for %s, want 3", len(rows), res.ID)
			}
			return nil
		})
	}
	// The settlement spans end right after the rows are stored.
	var spans tracetest.SpanStubs
	bustest.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		spans = rec.Spans.GetSpans()
		n := 0
		for _, s := range spans {
			if s.Name == "settlement.settle" {
				n++
			}
		}
		if n < 6 {
			return fmt.Errorf("%d settlement spans, want 6", n)
		}
		return nil
	})
	ro := spans.Snapshots()
	traces := map[trace.TraceID]bool{}
	for _, res := range results {
		var root sdktrace.ReadOnlySpan
		for _, s := range ro {
			if s.Name() == "router.generate" && attr(s, "request") == res.ID {
				if root != nil {
					t.Fatalf("two router spans for %s", res.ID)
				}
				root = s
			}
		}
		if root == nil {
			t.Fatalf("no router.generate span for %s", res.ID)
		}
		if root.Parent().IsValid() {
			t.Fatalf("router span of %s has a parent %v: it should be the root", res.ID, root.Parent())
		}
		tid := root.SpanContext().TraceID()
		if traces[tid] {
			t.Fatalf("two requests share trace %s", tid)
		}
		traces[tid] = true
		byName := map[string]int{}
		nodes := map[string]bool{}
		for _, s := range ro {
			if s.SpanContext().TraceID() != tid || s.SpanContext().SpanID() == root.SpanContext().SpanID() {
				continue
			}
			byName[s.Name()]++
			if s.Parent().SpanID() != root.SpanContext().SpanID() {
				t.Errorf("%s span %s has parent %s, want the router span %s", s.Name(), s.SpanContext().SpanID(), s.Parent().SpanID(), root.SpanContext().SpanID())
			}
			switch s.Name() {
			case "executor.stage":
				if attr(s, "request") != res.ID {
					t.Errorf("stage span of request %q in the trace of %s", attr(s, "request"), res.ID)
				}
				nodes[attr(s, "node")] = true
			case "settlement.settle":
				if attr(s, "request") != res.ID || attr(s, "outcome") != "settled" {
					t.Errorf("settlement span of request %q with outcome %q in the trace of %s", attr(s, "request"), attr(s, "outcome"), res.ID)
				}
			default:
				t.Errorf("unexpected span %s in the trace of %s", s.Name(), res.ID)
			}
		}
		// Three stages, each passed once for the prompt and once per later token.
		want := map[string]int{"executor.stage": 3 * maxTokens, "settlement.settle": 3}
		if fmt.Sprint(byName) != fmt.Sprint(want) {
			t.Errorf("trace of %s below the router span: %v, want %v", res.ID, byName, want)
		}
		if len(nodes) != 3 {
			t.Errorf("trace of %s has stage spans on %v, want all three executors", res.ID, nodes)
		}
		t.Logf("trace %s: router.generate (root) > %d executor.stage on %d nodes, %d settlement.settle", tid, byName["executor.stage"], len(nodes), byName["settlement.settle"])
	}
}

// The metrics the grid exports exist and move with the work: tokens and
// layer-tokens (throughput), queue depth, stage and hop latency, device
// utilization and memory, settlement's lag, and dead letters by service
// and reason.
func TestMetricsMove(t *testing.T) {
	rec, g, base, _ := telemetryGrid(t)
	before := rec.Metrics(t)
	const maxTokens = 6
	res := complete(t, base, maxTokens)
	if t.Failed() {
		t.FailNow()
	}
	// A malformed release reaches every executor, each dead-letters it.
	if err := g.Admin.NC.Publish(subjects.SessionRelease, []byte(`{"op":"explode"}`)); err != nil {
		t.Fatal(err)
	}
	layers, prompt := 5, res.Usage.PromptTokens
	wantLayerTokens := float64((prompt + maxTokens - 1) * layers)
	var after map[string]metricdata.Metrics
	bustest.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		after = rec.Metrics(t)
		for _, c := range []struct {
			name  string
			attrs []string
			check func(v float64, points int) error
		}{
			{"tessera.router.tokens.generated", nil, equal(maxTokens)},
			{"tessera.router.tokens.prompt", nil, equal(float64(prompt))},
			{"tessera.router.requests", []string{"outcome=ok"}, equal(1)},
			{"tessera.router.hop.duration", nil, equal(3 * maxTokens)},
			{"tessera.executor.layer_tokens", nil, equal(wantLayerTokens)},
			{"tessera.executor.stage.duration", nil, equal(3 * maxTokens)},
			{"tessera.executor.queue.depth", nil, pointsAtLeast(3)},
			{"tessera.executor.device.utilization", []string{"kind=cpu"}, pointsAtLeast(3)},
			{"tessera.executor.device.memory.used", nil, positive(3)},
			{"tessera.executor.device.memory.total", nil, positive(3)},
			{"tessera.executor.usage.published", nil, equal(3)},
			{"settlement.events.settled", nil, equal(3)},
			{"settlement.lag.events", nil, pointsAtLeast(1)},
			{"settlement.lag.seconds", nil, pointsAtLeast(1)},
			{bus.DeadLetterMetric, []string{"service=executor", "reason=bad_release"}, equal(3)},
		} {
			m, ok := after[c.name]
			if !ok {
				return fmt.Errorf("no metric %s among %s", c.name, telemetrytest.Names(after))
			}
			v, n := telemetrytest.Value(m, c.attrs...)
			if old, ok := before[c.name]; ok {
				// Counters count from the start: compare with the moment
				// before the request.
				if !gauges[c.name] {
					ov, _ := telemetrytest.Value(old, c.attrs...)
					v -= ov
				}
			}
			if err := c.check(v, n); err != nil {
				return fmt.Errorf("%s%v: %w", c.name, c.attrs, err)
			}
		}
		return nil
	})
	var names []string
	for n := range after {
		if strings.HasPrefix(n, "tessera.") || strings.HasPrefix(n, "settlement.") {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	t.Logf("metrics: %s", strings.Join(names, ", "))
}

// gauges are the metrics whose values are levels, not running counts.
var gauges = map[string]bool{
	"tessera.executor.queue.depth": true, "tessera.executor.device.utilization": true,
	"tessera.executor.device.memory.used": true, "tessera.executor.device.memory.total": true,
	"settlement.lag.events": true, "settlement.lag.seconds": true,
}

func equal(want float64) func(float64, int) error {
	return func(v float64, _ int) error {
		if v != want {
			return fmt.Errorf("moved by %v, want %v", v, want)
		}
		return nil
	}
}

func pointsAtLeast(n int) func(float64, int) error {
	return func(_ float64, points int) error {
		if points < n {
			return fmt.Errorf("%d data points, want at least %d", points, n)
		}
		return nil
	}
}

func positive(n int) func(float64, int) error {
	return func(v float64, points int) error {
		if points < n || v <= 0 {
			return fmt.Errorf("%d data points summing to %v, want %d or more and a positive sum", points, v, n)
		}
		return nil
	}
}
