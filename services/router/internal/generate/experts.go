package generate

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// Selective activation across executors. A model whose feed-forward layers
// are divided into expert groups (a mixture of experts' experts, or groups
// of a dense FFN's neurons) stores each group as its own fragment
// ("layer.<l>.expert.<e>"), and a plan may spread one layer's groups over
// several nodes. A hop whose node lacks some groups of a layer pauses there
// (wire/expert.go), having computed the chosen groups it holds itself:
// the router sends each row's normalized hidden state only to the nodes
// holding the other groups that row's gate chose, one message per node and
// layer, sums what they answer and resumes the hop.

// expertFragment is the heartbeat name of expert e of layer l of m.
func expertFragment(m string, l, e int) string { return m + "/" + model.ExpertFragment(l, e) }

// splitLayers lists the layers of hp whose expert groups its node does not
// all hold: their feed-forward networks run on the groups' holders.
func (s *session) splitLayers(hp hop) []int {
	groups := s.model.Manifest.ExpertGroups()
	if groups == 0 {
		return nil
	}
	var out []int
	for l := hp.first; l < hp.end; l++ {
		for e := 0; e < groups; e++ {
			if !s.e.view.Holds(hp.node, expertFragment(s.req.Model, l, e)) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

// expertHolders lists the live nodes that hold expert e of layer l under
// the request's plan, in plan order, leaving out those in skip and those
// backed off after a failure.
func (s *session) expertHolders(l, e int, skip map[string]bool) []string {
	var out []string
	frag := expertFragment(s.req.Model, l, e)
	for _, a := range s.plan.Assignments {
		if l < a.First || l >= a.End || (len(a.Experts) > 0 && !slices.Contains(a.Experts, e)) || skip[a.Node] {
			continue
		}
		r, ok := s.e.view.Node(a.Node)
		if !ok || r.State != wire.NodeReady || s.e.health.backedOff(a.Node, r.JoinedAt) || !s.e.view.Holds(a.Node, frag) {
			continue
		}
		out = append(out, a.Node)
	}
	return out
}

// expertHolder picks the node that computes expert e of layer l for this
// request: the one picked before while it stays usable (a request keeps
// talking to the same few nodes), else the least busy holder.
func (s *session) expertHolder(l, e int, skip map[string]bool) (string, bool) {
	k := [2]int{l, e}
	if n, ok := s.experts[k]; ok && !skip[n] {
		if r, live := s.e.view.Node(n); live && !s.e.health.backedOff(n, r.JoinedAt) {
			return n, true
		}
	}
	hs := s.expertHolders(l, e, skip)
	if len(hs) == 0 {
		return "", false
	}
	best := hs[0]
	for _, n := range hs[1:] {
		if s.e.health.inflight(n) < s.e.health.inflight(best) {
			best = n
		}
	}
	if s.experts == nil {
		s.experts = map[[2]int]string{}
	}
	s.experts[k] = best
	return best, true
}

// checkExperts reports an unavailable error when a split layer of a route
// (splits: each hop's split layers) has an expert group that no live node
// holds.
func (s *session) checkExperts(splits [][]int) error {
	groups := s.model.Manifest.ExpertGroups()
	for _, split := range splits {
		for _, l := range split {
			for e := 0; e < groups; e++ {
				if len(s.expertHolders(l, e, nil)) == 0 {
					return fmt.Errorf("%w: no live node holds expert %d of layer %d of %s", errHealing, e, l, s.req.Model)
				}
			}
		}
	}
	return nil
}

// choice is one (row, expert, weight) of a routed batch.
type choice struct {
	row    int
	expert int32
	weight float32
}

// runExperts computes the feed-forward output of layer for the rows a
// paused stage node sent (a wire.Routed payload), but for the experts the
// stage node computed itself (held): each node holding another chosen
// expert gets, in one message, the rows that chose its experts; a node
// that fails is left out and its rows go to another holder. It returns the
// rows' summed expert outputs (rows×dim). The rows' choices are counted
// for KV expertload, weight times each.
func (s *session) runExperts(ctx context.Context, base *nats.Msg, layer, rows int, data []byte, held []bool, weight int64) ([]float32, error) {
	cfg := s.model.Manifest.Config
	groups := s.model.Manifest.ExpertGroups()
	r, err := wire.DecodeRouted(data, cfg.Dim, groups)
	if err != nil {
		return nil, err
	}
	if r.Rows != rows {
		return nil, fmt.Errorf("%w: paused with %d rows, sent %d", wire.ErrFrame, r.Rows, rows)
	}
	s.e.load.count(s.req.Model, cfg.Layers, groups, layer, r, weight)
	var pending []choice
	for i, e := range r.Experts {
		if e >= 0 && !held[e] {
			pending = append(pending, choice{row: i / r.K, expert: e, weight: r.Weights[i]})
		}
	}
	out := make([]float32, rows*cfg.Dim)
	skip := map[string]bool{}
	var lastErr error
	for len(pending) > 0 {
		byNode := map[string][]choice{}
		for _, c := range pending {
			n, ok := s.expertHolder(layer, int(c.expert), skip)
			if !ok {
				if lastErr == nil {
					lastErr = errors.New("not planned on any live node")
				}
				return nil, fmt.Errorf("%w: expert %d of layer %d: %v", ErrUnavailable, c.expert, layer, lastErr)
			}
			byNode[n] = append(byNode[n], c)
		}
		nodes := make([]string, 0, len(byNode))
		for n := range byNode {
			nodes = append(nodes, n)
		}
		sort.Strings(nodes)
		reqs := make([]outgoing, len(nodes))
		rowsOf := make([][]int, len(nodes))
		for i, n := range nodes {
			var payload wire.Routed
			payload, rowsOf[i] = gather(r, byNode[n])
			msg := nats.NewMsg(subjects.Expert(n))
			for _, k := range []string{wire.HdrRequest, wire.HdrModel, wire.HdrPlan, wire.HdrCustomer, wire.HdrPhase} {
				msg.Header.Set(k, base.Header.Get(k))
			}
			msg.Header.Set(wire.HdrLayer, strconv.Itoa(layer))
			msg.Data = wire.AppendRouted(nil, payload)
			telemetry.Inject(ctx, msg)
			reqs[i] = outgoing{node: n, msg: msg}
		}
		sent := time.Now()
		s.callAll(ctx, reqs, s.e.stageTimeout)
		s.e.metrics.hopDone(ctx, s.req.Model, "expert", time.Since(sent))
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		pending = pending[:0:0]
		for i, rq := range reqs {
			err := expertReply(rq, len(rowsOf[i]), cfg.Dim, out, rowsOf[i])
			if err == nil {
				continue
			}
			if errors.Is(err, ErrBadRequest) {
				return nil, err
			}
			lastErr = fmt.Errorf("node %s: %w", rq.node, err)
			s.e.log.Warn("expert request failed; asking another holder", "request", s.req.ID, "node", rq.node, "layer", layer, "err", err)
			s.e.metrics.failover(ctx, StageFailure{Time: time.Now().UTC(), Request: s.req.ID, Model: s.req.Model, Node: rq.node, Error: err.Error()})
			s.e.health.fail(rq.node)
			skip[rq.node] = true
			pending = append(pending, byNode[rq.node]...)
		}
	}
	return out, nil
}

// gather builds the payload of one node's expert request: the rows that
// chose one of cs's experts, each with its experts and weights (padded
// with -1 to the most any row has), and the rows' indices in r.
func gather(r wire.Routed, cs []choice) (wire.Routed, []int) {
	per := map[int][]choice{}
	var rows []int
	k := 0
	for _, c := range cs {
		if per[c.row] == nil {
			rows = append(rows, c.row)
		}
		per[c.row] = append(per[c.row], c)
		k = max(k, len(per[c.row]))
	}
	sort.Ints(rows)
	p := wire.Routed{Rows: len(rows), Dim: r.Dim, K: k, X: make([]float32, 0, len(rows)*r.Dim), Experts: make([]int32, 0, len(rows)*k), Weights: make([]float32, 0, len(rows)*k)}
	for _, row := range rows {
		p.X = append(p.X, r.X[row*r.Dim:(row+1)*r.Dim]...)
		for j := 0; j < k; j++ {
			if j < len(per[row]) {
				p.Experts = append(p.Experts, per[row][j].expert)
				p.Weights = append(p.Weights, per[row][j].weight)
			} else {
				p.Experts = append(p.Experts, -1)
				p.Weights = append(p.Weights, 0)
			}
		}
	}
	return p, rows
}

// expertReply checks one expert answer and adds its rows (n×dim) into out
// at the rows' positions.
func expertReply(rq outgoing, n, dim int, out []float32, rows []int) error {
	if rq.err != nil {
		return rq.err
	}
	if e := rq.reply.Header.Get(wire.HdrError); e != "" {
		if strings.HasPrefix(e, wire.ErrCodeBadRequest) {
			return fmt.Errorf("%w: %s", ErrBadRequest, e)
		}
		return errors.New(e)
	}
	f, err := wire.DecodeFrame(rq.reply.Data)
	if err != nil {
		return err
	}
	if f.DType != wire.F32 || f.Rows != n || f.Cols != dim {
		return fmt.Errorf("%w: expert reply %d×%d, want %d×%d", wire.ErrFrame, f.Rows, f.Cols, n, dim)
	}
	v, err := f.F32(nil)
	if err != nil {
		return err
	}
	for i, row := range rows {
		dst := out[row*dim : (row+1)*dim]
		for c, x := range v[i*dim : (i+1)*dim] {
			dst[c] += x
		}
	}
	return nil
}
