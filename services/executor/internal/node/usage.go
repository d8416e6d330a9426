package node

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/spool"
)

// publishAttempt bounds one attempt to publish a usage event.
const publishAttempt = 5 * time.Second

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
		// Each attempt waits a few seconds for the acknowledgement: one
		// lost while the connection moves to another server is not waited
		// for until ctx ends.
		actx, cancel := context.WithTimeout(ctx, publishAttempt)
		_, err := n.bus.JS.PublishMsg(actx, m)
		cancel()
		if err == nil {
			n.metrics.usagePublished(ctx)
			if n.opts.Spool != nil {
				if err := n.opts.Spool.Done(e.ID); err != nil {
					n.log.Warn("usage spool", "id", e.ID, "err", err)
				}
			}
			return nil
		}
		if errors.Is(err, nats.ErrConnectionClosed) {
			return err // never coming back: the spool keeps it for the next run
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
	if n.opts.Spool == nil {
		return
	}
	n.replay(ctx, 0)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			n.replay(ctx, n.opts.PublishTimeout)
		}
	}
}

// replay publishes the spooled events older than olderThan (younger ones
// are still being published by their release), until ctx ends.
func (n *Node) replay(ctx context.Context, olderThan time.Duration) {
	sp := n.opts.Spool
	if sp == nil {
		return
	}
	cut := time.Now().Add(-olderThan)
	var sent, failed int
	for _, e := range sp.Pending() {
		if e.Spooled.After(cut) {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, n.opts.PublishTimeout)
		err := n.publishEntry(pctx, e)
		cancel()
		if err != nil {
			failed++
			if ctx.Err() != nil {
				break
			}
			continue
		}
		sent++
	}
	if sent+failed > 0 {
		n.log.Info("spooled usage re-published", "events", sent, "still_pending", failed)
	}
}
