package settlement_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/telemetry/telemetrytest"
	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
)

// An event a node publishes again after the stream's de-duplication window
// (its usage spool replayed long after a lost acknowledgement) is settled
// once: the second copy is dead-lettered as a duplicate, whether the first
// is in the ledger already or earlier in the same batch. Each event that
// carries trace context is settled in a span of its request's trace.
func TestReplayedEventsSettleOnce(t *testing.T) {
	rec := telemetrytest.Install(t)
	g := newGrid(t, nil)
	nd := newNode(t, "node-r", "gpu-co", "gpu")
	g.register(nd)
	evs := nd.events(t, 0, 12, []string{"acme"}, []string{"stories260k"}, t0)
	var want totals
	want.add(evs[:10]...)
	g.publish(evs[:10])
	g.start()
	g.waitSettled(want.Events, 30*time.Second)

	ctx := context.Background()
	// Past the window the stream stores a second publish of the same id:
	// publishing without Nats-Msg-Id plays that.
	replay := func(ev wire.UsageEvent, traceparent string) {
		t.Helper()
		m, err := usagesig.Message(&ev)
		if err != nil {
			t.Fatal(err)
		}
		m.Header.Del(wire.HdrMsgID)
		if traceparent != "" {
			m.Header["traceparent"] = []string{traceparent}
		}
		if _, err := g.conn.JS.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	parent := "00-" + traceID + "-00f067aa0ba902b7-01"
	g.stop()
	replay(evs[2], "")
	replay(evs[5], "")
	// A new event and its replay in one batch.
	replay(evs[10], parent)
	replay(evs[10], parent)
	replay(evs[11], "")
	want.add(evs[10:]...)
	g.start()
	g.waitSettled(want.Events, 30*time.Second)
	g.checkLedger(want)

	dups := map[string]int{}
	for _, d := range g.deadLetters(3) {
		if d.Reason != settlement.ReasonDuplicate {
			t.Fatalf("dead letter %+v, want reason %s", d, settlement.ReasonDuplicate)
		}
		var ev wire.UsageEvent
		if err := wire.Decode(d.Data, &ev); err != nil {
			t.Fatal(err)
		}
		dups[ev.ID]++
	}
	if want := fmt.Sprint(map[string]int{evs[2].ID: 1, evs[5].ID: 1, evs[10].ID: 1}); fmt.Sprint(dups) != want {
		t.Fatalf("duplicates dead-lettered %v, want %v", dups, want)
	}

	// Both copies of the traced event were settled in its trace: one
	// stored, one dead-lettered.
	outcomes := map[string]int{}
	for _, s := range rec.Spans.GetSpans() {
		if s.Name != "settlement.settle" {
			continue
		}
		if s.Parent.TraceID().String() != traceID || s.Parent.SpanID().String() != "00f067aa0ba902b7" || s.SpanContext.TraceID() != s.Parent.TraceID() {
			t.Fatalf("span %s has parent %v, trace %v", s.Name, s.Parent, s.SpanContext.TraceID())
		}
		if s.SpanKind != trace.SpanKindConsumer {
			t.Fatalf("span kind %v", s.SpanKind)
		}
		for _, a := range s.Attributes {
			if a.Key == "outcome" {
				outcomes[a.Value.AsString()]++
			}
		}
	}
	if want := fmt.Sprint(map[string]int{"dead_lettered:duplicate": 1, "settled": 1}); fmt.Sprint(outcomes) != want {
		t.Fatalf("settlement spans by outcome %v, want %v", outcomes, want)
	}
}
