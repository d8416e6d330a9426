package telemetry

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

func TestTraceContextTravelsInNATSHeaders(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	ctx, span := tp.Tracer("test").Start(context.Background(), "parent")
	msg := nats.NewMsg("x")
	Inject(ctx, msg)
	span.End()
	if msg.Header.Get("traceparent") == "" {
		t.Fatalf("no lowercase traceparent header: %v", msg.Header)
	}
	if _, ok := msg.Header["Traceparent"]; ok {
		t.Fatal("header key was canonicalised")
	}
	got := trace.SpanContextFromContext(Extract(context.Background(), msg))
	if got.TraceID() != span.SpanContext().TraceID() || got.SpanID() != span.SpanContext().SpanID() {
		t.Fatalf("extracted %v, want %v", got, span.SpanContext())
	}
}

func TestSetupRejectsUnknownExporter(t *testing.T) {
	t.Setenv("OTEL_TRACES_EXPORTER", "carrier-pigeon")
	if _, err := Setup(context.Background(), "x"); err == nil {
		t.Fatal("want an error naming the bad exporter")
	}
	t.Setenv("OTEL_TRACES_EXPORTER", "none")
	shutdown, err := Setup(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	if err := shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}
