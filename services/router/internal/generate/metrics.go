package generate

import (
	"context"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// MeterName is the instrumentation scope of the router's metrics.
const MeterName = "tessera/router"

// metrics are the router's OpenTelemetry instruments (through the global
// MeterProvider) and the recent activity the console shows.
type metrics struct {
	generated metric.Int64Counter
	prompt    metric.Int64Counter
	requests  metric.Int64Counter
	failovers metric.Int64Counter
	hop       metric.Float64Histogram
	activity  *Activity
}

// newMetrics makes the instruments; one the provider refuses is a no-op.
func newMetrics() *metrics {
	meter := otel.Meter(MeterName)
	m := &metrics{activity: newActivity(time.Now)}
	m.generated, _ = meter.Int64Counter("tessera.router.tokens.generated",
		metric.WithUnit("{token}"), metric.WithDescription("tokens generated (rate: the grid's tokens/s through this router)"))
	m.prompt, _ = meter.Int64Counter("tessera.router.tokens.prompt",
		metric.WithUnit("{token}"), metric.WithDescription("prompt tokens of admitted requests"))
	m.requests, _ = meter.Int64Counter("tessera.router.requests",
		metric.WithUnit("{request}"), metric.WithDescription("finished requests, by outcome (ok, error)"))
	m.failovers, _ = meter.Int64Counter("tessera.router.failovers",
		metric.WithUnit("{failover}"), metric.WithDescription("routes abandoned after a stage failed"))
	m.hop, _ = meter.Float64Histogram("tessera.router.hop.duration",
		metric.WithUnit("s"), metric.WithDescription("one stage request's round trip as the router sees it, by phase"),
		metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	return m
}

func (m *metrics) token(ctx context.Context, model string) {
	m.generated.Add(ctx, 1, metric.WithAttributes(attribute.String("model", model)))
	m.activity.token()
}

func (m *metrics) finished(ctx context.Context, model string, prompt int, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "error"
	}
	m.prompt.Add(ctx, int64(prompt), metric.WithAttributes(attribute.String("model", model)))
	m.requests.Add(ctx, 1, metric.WithAttributes(attribute.String("model", model), attribute.String("outcome", outcome)))
}

func (m *metrics) hopDone(ctx context.Context, model, phase string, took time.Duration) {
	m.hop.Record(ctx, took.Seconds(), metric.WithAttributes(attribute.String("model", model), attribute.String("phase", phase)))
}

func (m *metrics) failover(ctx context.Context, f StageFailure) {
	m.failovers.Add(ctx, 1, metric.WithAttributes(attribute.String("model", f.Model)))
	m.activity.failed(f)
}

// StageFailure is one stage request that failed and made a request change
// route.
type StageFailure struct {
	Time    time.Time `json:"time"`
	Request string    `json:"request"`
	Model   string    `json:"model"`
	// Node is the node blamed (empty when the failure was no node's fault,
	// such as a replica without the request's KV cache).
	Node  string `json:"node,omitempty"`
	Error string `json:"error"`
}

// activityWindow is how far back Activity remembers tokens, in seconds.
const activityWindow = 60

// maxFailures is how many recent stage failures Activity keeps.
const maxFailures = 50

// Activity is what the router did lately: tokens generated per second
// over the last minute and the last stage failures. It is safe for
// concurrent use.
type Activity struct {
	now func() time.Time

	mu       sync.Mutex
	buckets  [activityWindow]int64
	stamps   [activityWindow]int64 // the Unix second each bucket counts
	failures []StageFailure
}

func newActivity(now func() time.Time) *Activity { return &Activity{now: now} }

func (a *Activity) token() {
	sec := a.now().Unix()
	i := sec % activityWindow
	a.mu.Lock()
	if a.stamps[i] != sec {
		a.stamps[i], a.buckets[i] = sec, 0
	}
	a.buckets[i]++
	a.mu.Unlock()
}

func (a *Activity) failed(f StageFailure) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failures = append(a.failures, f)
	if len(a.failures) > maxFailures {
		a.failures = append(a.failures[:0], a.failures[len(a.failures)-maxFailures:]...)
	}
}

// TokensPerSecond returns the tokens generated in each of the last 60
// whole seconds, oldest first (the current, unfinished second excluded).
func (a *Activity) TokensPerSecond() []int64 {
	now := a.now().Unix()
	out := make([]int64, activityWindow)
	a.mu.Lock()
	defer a.mu.Unlock()
	for k := range activityWindow {
		sec := now - activityWindow + int64(k)
		if i := sec % activityWindow; a.stamps[i] == sec {
			out[k] = a.buckets[i]
		}
	}
	return out
}

// Failures returns the recent stage failures, newest last.
func (a *Activity) Failures() []StageFailure {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]StageFailure(nil), a.failures...)
}

// Activity returns what the engine did lately.
func (e *Engine) Activity() *Activity { return e.metrics.activity }
