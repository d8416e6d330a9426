package node

import (
	"context"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/spool"
)

// traceHeaders returns the trace context headers ("traceparent",
// "tracestate") that carry sc, so that settlement's spans join the trace
// of the request the usage is for.
func traceHeaders(sc trace.SpanContext) map[string]string {
	if !sc.IsValid() {
		return nil
	}
	h := nats.Header{}
	otel.GetTextMapPropagator().Inject(trace.ContextWithRemoteSpanContext(context.Background(), sc), telemetry.HeaderCarrier(h))
	if len(h) == 0 {
		return nil
	}
	out := make(map[string]string, len(h))
	for k, v := range h {
		if len(v) > 0 {
			out[k] = v[0]
		}
	}
	return out
}

// publishEntry publishes one spooled event into stream USAGE with its id as
// Nats-Msg-Id, retrying with back-off until the stream acknowledges it or
// ctx ends; the stream's de-duplication makes the retries safe. An
// acknowledged event leaves the spool.
func (n *Node) publishEntry(ctx context.Context, e spool.Entry) error {
	wait := 50 * time.Millisecond
	for {
		m := nats.NewMsg(subjects.UsageNode(n.opts.ID))
		for k, v := range e.Header {
			m.Header[k] = []string{v}
		}
		m.Header.Set(wire.HdrMsgID, e.ID)
		m.Data = e.Data
		_, err := n.bus.JS.PublishMsg(ctx, m)
		if err == nil {
			n.metrics.usagePublished(ctx)
			if n.opts.Spool != nil {
				if err := n.opts.Spool.Done(e.ID); err != nil {
					n.log.Warn("usage spool", "id", e.ID, "err", err)
				}
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// replaySpool publishes what the spool holds: at start everything (events
// a previous run signed but did not see acknowledged), then, every
// interval, what a release gave up on.
func (n *Node) replaySpool(ctx context.Context, interval time.Duration) {
	sp := n.opts.Spool
	if sp == nil {
		return
	}
	replay := func(olderThan time.Duration) {
		cut := time.Now().Add(-olderThan)
		var sent, failed int
		for _, e := range sp.Pending() {
			if e.Spooled.After(cut) {
				continue // its release is still publishing it
			}
			pctx, cancel := context.WithTimeout(ctx, n.opts.PublishTimeout)
			err := n.publishEntry(pctx, e)
			cancel()
			if err != nil {
				failed++
				if ctx.Err() != nil {
					return
				}
				continue
			}
			sent++
		}
		if sent+failed > 0 {
			n.log.Info("spooled usage re-published", "events", sent, "still_pending", failed)
		}
	}
	replay(0)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			replay(n.opts.PublishTimeout)
		}
	}
}
