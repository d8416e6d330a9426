// Package telemetrytest installs in-memory OpenTelemetry providers as the
// process's global ones for a test, with the W3C trace-context propagator,
// and reads back the spans and metrics the code under test recorded.
package telemetrytest

import (
	"context"
	"sort"
	"strings"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// Recorder holds what the global providers recorded since Install.
type Recorder struct {
	// Spans receives every ended span at once (a synchronous exporter).
	Spans  *tracetest.InMemoryExporter
	Reader *sdkmetric.ManualReader
}

// Install makes in-memory providers the global ones until the test ends,
// when no-op providers replace them. Code that creates its instruments
// before Install records nowhere: install first, then start what is tested.
func Install(t testing.TB) *Recorder {
	t.Helper()
	r := &Recorder{Spans: tracetest.NewInMemoryExporter(), Reader: sdkmetric.NewManualReader()}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(r.Spans))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(r.Reader))
	otel.SetTracerProvider(tp)
	otel.SetMeterProvider(mp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() {
		otel.SetTracerProvider(tracenoop.NewTracerProvider())
		otel.SetMeterProvider(metricnoop.NewMeterProvider())
		_ = tp.Shutdown(context.Background())
		_ = mp.Shutdown(context.Background())
	})
	return r
}

// Metrics collects every metric now, by name.
func (r *Recorder) Metrics(t testing.TB) map[string]metricdata.Metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Reader.Collect(context.Background(), &rm); err != nil {
		t.Fatalf("collect metrics: %v", err)
	}
	out := map[string]metricdata.Metrics{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

// Names lists metric names, sorted, for failure messages.
func Names(ms map[string]metricdata.Metrics) string {
	names := make([]string, 0, len(ms))
	for n := range ms {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// Value sums m's data points whose attributes include every key=value of
// attrs (given as "key=value" strings): the sum of counter or gauge values,
// or the count of histogram observations. matched is how many data points
// matched (none for other kinds of data).
func Value(m metricdata.Metrics, attrs ...string) (value float64, matched int) {
	match := func(set attribute.Set) bool {
		for _, kv := range attrs {
			k, v, _ := strings.Cut(kv, "=")
			got, ok := set.Value(attribute.Key(k))
			if !ok || got.Emit() != v {
				return false
			}
		}
		return true
	}
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		return points(d.DataPoints, match)
	case metricdata.Sum[float64]:
		return points(d.DataPoints, match)
	case metricdata.Gauge[int64]:
		return points(d.DataPoints, match)
	case metricdata.Gauge[float64]:
		return points(d.DataPoints, match)
	case metricdata.Histogram[float64]:
		return histogramPoints(d.DataPoints, match)
	case metricdata.Histogram[int64]:
		return histogramPoints(d.DataPoints, match)
	}
	return 0, 0
}

func points[N int64 | float64](ps []metricdata.DataPoint[N], match func(attribute.Set) bool) (value float64, n int) {
	for _, p := range ps {
		if match(p.Attributes) {
			value, n = value+float64(p.Value), n+1
		}
	}
	return value, n
}

func histogramPoints[N int64 | float64](ps []metricdata.HistogramDataPoint[N], match func(attribute.Set) bool) (value float64, n int) {
	for _, p := range ps {
		if match(p.Attributes) {
			value, n = value+float64(p.Count), n+1
		}
	}
	return value, n
}
