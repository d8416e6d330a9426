package node

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/spool"
)

// finished is a session as a release finds it: some work done for a
// request whose first stage request carried trace context tc.
func finished(request string, tc trace.SpanContext) *session {
	se := &session{key: sessionKey{request: request, model: "m", first: 0, end: 2}, customer: "acme", trace: tc}
	se.usage.Start = time.Now().UTC()
	se.usage.LayerTokens, se.usage.Messages = 10, 5
	return se
}

func spanContext(t *testing.T) trace.SpanContext {
	t.Helper()
	tid, _ := trace.TraceIDFromHex("0af7651916cd43dd8448eb211c80319c")
	sid, _ := trace.SpanIDFromHex("b7ad6b7169203331")
	return trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled, Remote: true})
}

// usageMessages reads every message of stream USAGE.
func usageMessages(t *testing.T, js jetstream.JetStream) []jetstream.RawStreamMsg {
	t.Helper()
	ctx := context.Background()
	st, err := js.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, *m)
	}
	return out
}

func withTraceContext(t *testing.T) {
	prev := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() { otel.SetTextMapPropagator(prev) })
}

// A released session's event is spooled, published with its id as
// Nats-Msg-Id and the request's trace context, and leaves the spool once
// the stream has it.
func TestUsageCarriesTraceAndLeavesSpool(t *testing.T) {
	withTraceContext(t)
	s := bustest.Server(t)
	sp, err := spool.Open(filepath.Join(t.TempDir(), "usage.spool"))
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	c := bustest.Connect(t, s, "n1")
	n, err := New(Options{ID: "n1", Spool: sp}, c, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	tc := spanContext(t)
	n.publishUsage([]*session{finished("req-1", tc)}, "test")
	n.publishing.Wait()
	msgs := usageMessages(t, c.JS)
	if len(msgs) != 1 {
		t.Fatalf("%d usage messages, want 1", len(msgs))
	}
	m := msgs[0]
	var ev wire.UsageEvent
	if err := json.Unmarshal(m.Data, &ev); err != nil {
		t.Fatal(err)
	}
	if ev.ID != usageID("n1", finished("req-1", tc).key) || m.Header.Get(wire.HdrMsgID) != ev.ID {
		t.Fatalf("event id %q, Nats-Msg-Id %q", ev.ID, m.Header.Get(wire.HdrMsgID))
	}
	if want := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"; m.Header.Get("traceparent") != want {
		t.Fatalf("traceparent %q, want %q (headers %v)", m.Header.Get("traceparent"), want, m.Header)
	}
	if sp.Len() != 0 {
		t.Fatalf("%d events left in the spool after the stream acknowledged them", sp.Len())
	}
}

// Events a release cannot publish stay on disk; the node publishes them
// when the stream is back, and a node started on the spool of one that
// died publishes what it left, each once.
func TestSpooledUsageIsPublishedLater(t *testing.T) {
	withTraceContext(t)
	s := bustest.Server(t)
	admin := bustest.Connect(t, s, "admin")
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "usage.spool")
	sp, err := spool.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	// The stream is gone: nothing can be published.
	if err := admin.JS.DeleteStream(ctx, subjects.StreamUsage); err != nil {
		t.Fatal(err)
	}
	n, err := New(Options{ID: "n1", Spool: sp, PublishTimeout: 100 * time.Millisecond, SpoolRetry: 50 * time.Millisecond},
		bustest.Connect(t, s, "n1"), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	n.publishUsage([]*session{finished("req-1", spanContext(t)), finished("req-2", trace.SpanContext{})}, "test")
	n.publishing.Wait()
	if sp.Len() != 2 {
		t.Fatalf("%d events spooled after a failed publish, want 2", sp.Len())
	}
	// The process dies: the spool is all that is left.
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := bus.Bootstrap(ctx, admin.JS, 1); err != nil {
		t.Fatal(err)
	}

	sp2, err := spool.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer sp2.Close()
	if sp2.Len() != 2 {
		t.Fatalf("%d events in the spool after a restart, want 2", sp2.Len())
	}
	// Publish one of them (the one without trace context) already, as if
	// its acknowledgement had been lost.
	second := sp2.Pending()[1]
	if _, err := admin.JS.Publish(ctx, subjects.UsageNode("n1"), second.Data, jetstream.WithMsgID(second.ID)); err != nil {
		t.Fatal(err)
	}
	n2, err := New(Options{ID: "n1", Spool: sp2, PublishTimeout: 100 * time.Millisecond, SpoolRetry: 50 * time.Millisecond},
		bustest.Connect(t, s, "n1-again"), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- n2.Run(rctx) }()
	defer func() { cancel(); <-done }()
	bustest.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		if l := sp2.Len(); l != 0 {
			return fmt.Errorf("%d events still spooled", l)
		}
		return nil
	})
	msgs := usageMessages(t, admin.JS)
	if len(msgs) != 2 {
		t.Fatalf("%d usage messages, want 2 (one per event)", len(msgs))
	}
	for _, m := range msgs {
		var ev wire.UsageEvent
		if err := json.Unmarshal(m.Data, &ev); err != nil {
			t.Fatal(err)
		}
		wantTrace := ev.Request == "req-1"
		if (m.Header.Get("traceparent") != "") != wantTrace {
			t.Fatalf("event of %s has traceparent %q", ev.Request, m.Header.Get("traceparent"))
		}
	}
}
