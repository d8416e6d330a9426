package node

import (
	"context"
	"encoding/json"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// publishEvent publishes u into stream USAGE with its id as Nats-Msg-Id,
// retrying with back-off until the stream acknowledges it or ctx ends; the
// stream's de-duplication makes the retries safe.
func (n *Node) publishEvent(ctx context.Context, u *wire.UsageEvent) error {
	b, err := json.Marshal(u)
	if err != nil {
		return err
	}
	wait := 50 * time.Millisecond
	for {
		m := nats.NewMsg(subjects.UsageNode(n.opts.ID))
		m.Header.Set(wire.HdrMsgID, u.ID)
		m.Data = b
		_, err = n.bus.JS.PublishMsg(ctx, m)
		if err == nil {
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
