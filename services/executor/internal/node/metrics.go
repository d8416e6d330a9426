package node

import (
	"context"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// MeterName is the instrumentation scope of the executor's metrics.
const MeterName = "tessera/executor"

// metrics are the node's OpenTelemetry instruments (through the global
// MeterProvider, which telemetry.Setup installs).
type metrics struct {
	node          attribute.KeyValue
	layerTokens   metric.Int64Counter
	stageDuration metric.Float64Histogram
	usageEvents   metric.Int64Counter
	batchSize     metric.Int64Histogram
}

// newMetrics makes the node's instruments. An instrument the provider
// refuses is replaced by a no-op one: metrics never stop a node.
func newMetrics(node string) *metrics {
	meter := otel.Meter(MeterName)
	m := &metrics{node: attribute.String("node", node)}
	m.layerTokens, _ = meter.Int64Counter("tessera.executor.layer_tokens",
		metric.WithUnit("{token}"), metric.WithDescription("tokens × layers computed (rate: the node's throughput)"))
	m.stageDuration, _ = meter.Float64Histogram("tessera.executor.stage.duration",
		metric.WithUnit("s"), metric.WithDescription("stage request latency on the node, queueing included"),
		metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	m.usageEvents, _ = meter.Int64Counter("tessera.executor.usage.published",
		metric.WithUnit("{event}"), metric.WithDescription("usage events acknowledged by stream USAGE"))
	m.batchSize, _ = meter.Int64Histogram("tessera.executor.batch.size",
		metric.WithUnit("{request}"), metric.WithDescription("stage requests computed together in one forward pass"),
		metric.WithExplicitBucketBoundaries(1, 2, 4, 8, 16, 32, 64))
	return m
}

// register observes the node's queue depth and spooled usage until the
// returned function is called.
func (m *metrics) register(n *Node) func() {
	meter := otel.Meter(MeterName)
	queue, err1 := meter.Int64ObservableGauge("tessera.executor.queue.depth",
		metric.WithUnit("{request}"), metric.WithDescription("stage requests queued or computing"))
	spooled, err2 := meter.Int64ObservableGauge("tessera.executor.usage.spooled",
		metric.WithUnit("{event}"), metric.WithDescription("usage events on disk not yet acknowledged by the stream"))
	if err1 != nil || err2 != nil {
		n.log.Warn("executor gauges not registered", "queue", err1, "spool", err2)
		return func() {}
	}
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		attrs := metric.WithAttributes(m.node)
		o.ObserveInt64(queue, n.queued.Load(), attrs)
		if n.opts.Spool != nil {
			o.ObserveInt64(spooled, int64(n.opts.Spool.Len()), attrs)
		}
		return nil
	}, queue, spooled)
	if err != nil {
		n.log.Warn("executor gauges not registered", "err", err)
		return func() {}
	}
	return func() { _ = reg.Unregister() }
}

// stageDone records one finished stage request.
func (m *metrics) stageDone(j *job, took time.Duration) {
	ctx := context.Background()
	m.layerTokens.Add(ctx, int64(j.rows*(j.end-j.first)), metric.WithAttributes(m.node, attribute.String("model", j.model)))
	m.stageDuration.Record(ctx, time.Since(j.received).Seconds(), metric.WithAttributes(m.node, attribute.String("phase", j.phase)))
}

// batchDone records the size of one forward pass's batch.
func (m *metrics) batchDone(size int) {
	m.batchSize.Record(context.Background(), int64(size), metric.WithAttributes(m.node))
}

// usagePublished counts one acknowledged usage event.
func (m *metrics) usagePublished(ctx context.Context) {
	m.usageEvents.Add(ctx, 1, metric.WithAttributes(m.node))
}
