// Package nodetest drives executor nodes the way the router and planner
// do, over a real NATS server: it starts nodes, publishes plans, and sends
// stage requests along a route. Tests and benchmarks of the executor use it.
package nodetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/node"
)

// Start runs a node with opts on its own connection to s until the test
// ends.
func Start(t testing.TB, s *server.Server, opts node.Options, log *slog.Logger) *node.Node {
	t.Helper()
	c := bustest.Connect(t, s, opts.ID)
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	n, err := node.New(opts, c, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := n.Run(ctx); err != nil {
			t.Errorf("node %s: %v", opts.ID, err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return n
}

// Hop is one stage of a route: a node and its layer range.
type Hop struct {
	Node       string
	First, End int
}

// Plan returns a plan of model (with layers layers) assigning each hop's
// range to its node, the first with the embedding and the last the head.
func Plan(model string, layers int, route []Hop) wire.Plan {
	p := wire.Plan{Model: model, Strategy: "test", Layers: layers}
	for i, h := range route {
		p.Assignments = append(p.Assignments, wire.Assignment{Node: h.Node, First: h.First, End: h.End, Embed: i == 0, Head: i == len(route)-1})
		p.Stages = append(p.Stages, wire.Stage{First: h.First, End: h.End, Replicas: []string{h.Node}})
	}
	return p
}

// PutPlan publishes p in KV plans.
func PutPlan(ctx context.Context, c *bus.Conn, p wire.Plan) error {
	kv, err := c.JS.KeyValue(ctx, subjects.BucketPlans)
	if err != nil {
		return err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	_, err = kv.Put(ctx, p.Model, b)
	return err
}

// ErrStage is a stage error reply (its text is the node's code and message).
var ErrStage = errors.New("stage error")

// Request is one request's token stream through a route.
type Request struct {
	ID    string
	Model string
	Route []Hop
	// Compute is the stages' own compute time in the last Step, as their
	// replies report it (HdrComputeUS): the rest of a step's time is
	// messaging.
	Compute time.Duration
}

// Step sends tokens at position pos through the route, one hop at a time
// as the router does (each stage answers the requester, which sends the
// hidden state on), and returns the last row's logits.
func (r *Request) Step(ctx context.Context, nc *nats.Conn, pos int, tokens []int32) ([]float32, error) {
	phase := wire.PhaseDecode
	if pos == 0 {
		phase = wire.PhasePrefill
	}
	data := wire.AppendI32(nil, tokens)
	r.Compute = 0
	for i, hp := range r.Route {
		msg := nats.NewMsg(subjects.Stage(hp.Node))
		h := msg.Header
		h.Set(wire.HdrRequest, r.ID)
		h.Set(wire.HdrModel, r.Model)
		h.Set(wire.HdrCustomer, "bench")
		h.Set(wire.HdrPos, strconv.Itoa(pos))
		h.Set(wire.HdrRange, fmt.Sprintf("%d:%d", hp.First, hp.End))
		h.Set(wire.HdrPhase, phase)
		msg.Data = data
		reply, err := nc.RequestMsgWithContext(ctx, msg)
		if err != nil {
			return nil, err
		}
		if e := reply.Header.Get(wire.HdrError); e != "" {
			return nil, fmt.Errorf("%w: %s", ErrStage, e)
		}
		us, err := strconv.ParseInt(reply.Header.Get(wire.HdrComputeUS), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: header %s: %v", ErrStage, wire.HdrComputeUS, err)
		}
		r.Compute += time.Duration(us) * time.Microsecond
		if i < len(r.Route)-1 {
			data = reply.Data
			continue
		}
		f, err := wire.DecodeFrame(reply.Data)
		if err != nil {
			return nil, err
		}
		return f.F32(nil)
	}
	return nil, fmt.Errorf("%w: empty route", ErrStage)
}
