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
	out := s.callAll(ctx, []outgoing{{node: node, msg: msg}}, timeout)
	return out[0].reply, out[0].err
}

// outgoing is one request of a callAll and, once it returns, its outcome.
type outgoing struct {
	node  string
	msg   *nats.Msg
	reply *nats.Msg
	err   error
}

// callAll sends every request at once and waits for all their answers (or
// failures), probing the nodes still owing one as call does; it fills in
// each request's reply or error. A context that ends fails every request
// still open.
func (s *session) callAll(ctx context.Context, reqs []outgoing, timeout time.Duration) []outgoing {
	nc := s.e.bus.NC
	c := &s.calls
	if c.sub == nil {
		c.prefix = nc.NewInbox()
		c.ch = make(chan *nats.Msg, 256) // a full channel would drop replies
		sub, err := nc.ChanSubscribe(c.prefix+".*", c.ch)
		if err != nil {
			for i := range reqs {
				reqs[i].err = err
			}
			return reqs
		}
		c.sub = sub
	}
	open := map[string]int{} // reply subject → request
	for i := range reqs {
		c.n++
		reqs[i].msg.Reply = c.prefix + "." + strconv.Itoa(c.n)
		if err := nc.PublishMsg(reqs[i].msg); err != nil {
			reqs[i].err = err
			continue
		}
		open[reqs[i].msg.Reply] = i
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	probe := time.NewTicker(probeEvery)
	defer probe.Stop()
	fail := func(err error) {
		for _, i := range open {
			reqs[i].err = err
		}
		clear(open)
	}
	for len(open) > 0 {
		select {
		case m := <-c.ch:
			i, ok := open[m.Subject]
			if !ok {
				continue // the answer to an earlier, abandoned call
			}
			delete(open, m.Subject)
			if m.Header.Get("Status") == "503" {
				reqs[i].err = nats.ErrNoResponders
				continue
			}
			reqs[i].reply = m
		case <-probe.C:
			pinged := map[string]error{}
			for subj, i := range open {
				node := reqs[i].node
				err, done := pinged[node]
				if !done {
					ping := nats.NewMsg(subjects.Control(node))
					ping.Data = []byte(`{"op":"ping"}`)
					_, err = nc.RequestMsg(ping, probeTimeout)
					pinged[node] = err
				}
				if err != nil {
					reqs[i].err = fmt.Errorf("node stopped answering: %w", err)
					delete(open, subj)
				}
			}
		case <-timer.C:
			fail(nats.ErrTimeout)
		case <-ctx.Done():
			fail(ctx.Err())
		}
	}
	return reqs
}
