package generate

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/subjects"
)

// probeEvery is how long the router waits on a stage before it checks that
// the node is still there; probeTimeout bounds the check.
const (
	probeEvery   = 250 * time.Millisecond
	probeTimeout = 500 * time.Millisecond
)

// callState is a session's reply inbox: one subscription for all its stage
// calls, each call answered on its own subject below it, so that a late
// answer to an abandoned call is told apart and dropped.
type callState struct {
	prefix string
	sub    *nats.Subscription
	ch     chan *nats.Msg
	n      int
}

func (c *callState) close() {
	if c.sub != nil {
		_ = c.sub.Unsubscribe()
		c.sub = nil
	}
}

// call sends msg to node and waits for its answer. A node that dies with a
// request in hand never answers, so while it waits the router asks the
// node now and then whether it is still there (a ping on its control
// subject): a dead node fails the call within a fraction of a second
// instead of at the timeout. A node with no subscriber at all fails it at
// once (no responders).
func (s *session) call(ctx context.Context, node string, msg *nats.Msg, timeout time.Duration) (*nats.Msg, error) {
	nc := s.e.bus.NC
	c := &s.calls
	if c.sub == nil {
		c.prefix = nc.NewInbox()
		c.ch = make(chan *nats.Msg, 16)
		sub, err := nc.ChanSubscribe(c.prefix+".*", c.ch)
		if err != nil {
			return nil, err
		}
		c.sub = sub
	}
	c.n++
	msg.Reply = c.prefix + "." + strconv.Itoa(c.n)
	if err := nc.PublishMsg(msg); err != nil {
		return nil, err
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	probe := time.NewTicker(probeEvery)
	defer probe.Stop()
	for {
		select {
		case m := <-c.ch:
			if m.Subject != msg.Reply {
				continue // the answer to an earlier, abandoned call
			}
			if m.Header.Get("Status") == "503" {
				return nil, nats.ErrNoResponders
			}
			return m, nil
		case <-probe.C:
			ping := nats.NewMsg(subjects.Control(node))
			ping.Data = []byte(`{"op":"ping"}`)
			if _, err := nc.RequestMsg(ping, probeTimeout); err != nil {
				return nil, fmt.Errorf("node stopped answering: %w", err)
			}
		case <-timer.C:
			return nil, nats.ErrTimeout
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
