package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// DeadLetter records msg in the dead-letter stream with the reason (a short
// token such as "bad_signature") and the error, so that nothing malformed is
// silently dropped. It returns the publish error, if any; callers should then
// not acknowledge the original message.
func DeadLetter(ctx context.Context, js jetstream.JetStream, service, reason string, cause error, msg *nats.Msg, streamSeq uint64) error {
	if subjects.Token(reason) != nil {
		reason = "invalid"
	}
	dl := wire.DeadLetter{
		Service:   service,
		Reason:    reason,
		Time:      time.Now().UTC(),
		StreamSeq: streamSeq,
	}
	if cause != nil {
		dl.Error = cause.Error()
	}
	if msg != nil {
		dl.Subject = msg.Subject
		dl.Data = msg.Data
		if len(msg.Header) > 0 {
			dl.Headers = map[string][]string(msg.Header)
		}
	}
	b, err := json.Marshal(dl)
	if err != nil {
		return fmt.Errorf("dead letter: %w", err)
	}
	slog.Warn("dead-lettered message", "service", service, "reason", reason, "subject", dl.Subject, "err", dl.Error)
	var opts []jetstream.PublishOpt
	if streamSeq > 0 {
		// A message from a stream is dead-lettered again when its consumer
		// crashes before acknowledging it: the stream keeps one letter.
		opts = append(opts, jetstream.WithMsgID(fmt.Sprintf("%s:%s:%d", service, dl.Subject, streamSeq)))
	}
	ack, err := js.Publish(ctx, subjects.DeadLetter(service, reason), b, opts...)
	if err != nil {
		return fmt.Errorf("dead letter %s/%s: %w", service, reason, err)
	}
	if ack.Duplicate {
		return nil
	}
	// The global provider keeps one instrument per name: asking for it on
	// each (rare) dead letter costs a map lookup.
	if c, err := otel.Meter(MeterName).Int64Counter(DeadLetterMetric,
		metric.WithUnit("{message}"), metric.WithDescription("messages dead-lettered, by service and reason")); err == nil {
		c.Add(ctx, 1, metric.WithAttributes(attribute.String("service", service), attribute.String("reason", reason)))
	}
	return nil
}

// MeterName is the instrumentation scope of the bus's metrics.
const MeterName = "tessera/bus"

// DeadLetterMetric is the counter of dead-lettered messages (attributes
// service and reason).
const DeadLetterMetric = "tessera.deadletters"
