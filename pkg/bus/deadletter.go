package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

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
	if _, err := js.Publish(ctx, subjects.DeadLetter(service, reason), b); err != nil {
		return fmt.Errorf("dead letter %s/%s: %w", service, reason, err)
	}
	return nil
}
