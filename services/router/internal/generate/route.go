package generate

import (
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// RouteCosts are the inputs of route choice that are not measured per node.
type RouteCosts struct {
	// Region is the router's region.
	Region string
	// HopOverhead is the fixed cost of one stage request (serialisation,
	// NATS round trip on one host).
	HopOverhead time.Duration
	// RegionLatency is the one-way latency to a node in another region.
	RegionLatency time.Duration
	// DefaultLayerTime is assumed per token and layer for a node that
	// reports no speed for the model.
	DefaultLayerTime time.Duration
}

// candidate is a replica able to run one stage.
type candidate struct {
	node   string
	region string
	// layerSec is seconds per token through one layer on this node.
	layerSec float64
	// load is queued plus in-flight requests on the node.
	load float64
}

// stageCandidates are the replicas of one stage.
type stageCandidates struct {
	first, end int
	cands      []candidate
}

// chooseRoute picks one replica per stage minimising the expected seconds
// per token: on each node its layers × layerSec × (1 + load) (a busy node
// shares its batches), plus a round trip from the router for every hop —
// consecutive stages on the same node are one hop. A dynamic programme over
// the stages with the previous stage's choice as state finds the optimum.
func chooseRoute(stages []stageCandidates, costs RouteCosts) ([]hop, float64) {
	rtt := func(c candidate) float64 {
		d := costs.HopOverhead
		if c.region != costs.Region {
			d += 2 * costs.RegionLatency
		}
		return d.Seconds()
	}
	// best[i][j]: least cost of stages [0..i] with stage i on candidate j.
	best := make([][]float64, len(stages))
	from := make([][]int, len(stages))
	for i, st := range stages {
		best[i] = make([]float64, len(st.cands))
		from[i] = make([]int, len(st.cands))
		for j, c := range st.cands {
			compute := float64(st.end-st.first) * c.layerSec * (1 + c.load)
			if i == 0 {
				best[i][j] = compute + rtt(c)
				from[i][j] = -1
				continue
			}
			best[i][j] = math.Inf(1)
			for k, p := range stages[i-1].cands {
				cost := best[i-1][k] + compute
				if p.node != c.node {
					cost += rtt(c)
				}
				if cost < best[i][j] {
					best[i][j], from[i][j] = cost, k
				}
			}
		}
	}
	last := len(stages) - 1
	j, total := 0, math.Inf(1)
	for k, v := range best[last] {
		if v < total {
			j, total = k, v
		}
	}
	picks := make([]int, len(stages))
	for i := last; i >= 0; i-- {
		picks[i] = j
		j = from[i][j]
	}
	var route []hop
	for i, st := range stages {
		c := st.cands[picks[i]]
		if n := len(route); n > 0 && route[n-1].node == c.node && route[n-1].end == st.first {
			route[n-1].end = st.end
			continue
		}
		route = append(route, hop{node: c.node, first: st.first, end: st.end})
	}
	return route, total
}

// pickRoute chooses the route for the request's remaining tokens over the
// current plan's live replicas that hold each stage, have room for the
// request's KV cache and are not backed off after a failure.
func (s *session) pickRoute() error {
	m, err := s.e.view.Model(s.req.Model)
	if err != nil {
		return err
	}
	if m.Plan == nil || len(m.Plan.Stages) == 0 {
		return fmt.Errorf("%w: model %s has no plan yet", ErrUnavailable, s.req.Model)
	}
	// Routes are only chosen at the start and after a failure: a request
	// keeps its plan between them, and switches plans only then.
	s.plan = m.Plan
	need := int64(len(s.seq) + s.req.MaxTokens)
	stages := make([]stageCandidates, 0, len(s.plan.Stages))
	for _, st := range s.plan.Stages {
		sc := stageCandidates{first: st.First, end: st.End}
		backedOff := 0
		for _, id := range st.Replicas {
			r, ok := s.e.view.Node(id)
			if !ok || r.State != wire.NodeReady || !holds(r, s.req.Model, st.First, st.End, s.plan.Layers) {
				continue
			}
			if r.Heartbeat.KVTokensFree > 0 && r.Heartbeat.KVTokensFree < need {
				continue
			}
			if s.e.health.backedOff(id, r.JoinedAt) {
				backedOff++
				continue
			}
			sc.cands = append(sc.cands, candidate{
				node: id, region: r.Heartbeat.Region,
				layerSec: layerSeconds(r, m.Manifest, s.e.costs.DefaultLayerTime),
				load:     float64(r.Heartbeat.QueueDepth + s.e.health.inflight(id)),
			})
		}
		if len(sc.cands) == 0 && backedOff > 0 {
			return fmt.Errorf("%w: every replica holding layers [%d,%d) of %s failed moments ago", errHealing, st.First, st.End, s.req.Model)
		}
		if len(sc.cands) == 0 {
			return fmt.Errorf("%w: no live replica with room holds layers [%d,%d) of %s", errHealing, st.First, st.End, s.req.Model)
		}
		stages = append(stages, sc)
	}
	route, _ := chooseRoute(stages, s.e.costs)
	splits := make([][]int, len(route))
	for i, hp := range route {
		splits[i] = s.splitLayers(hp)
	}
	if err := s.checkExperts(splits); err != nil {
		return err
	}
	s.experts, s.splits = nil, splits
	for _, hp := range s.route {
		s.e.health.releaseNode(hp.node)
	}
	for _, hp := range route {
		s.e.health.acquire(hp.node)
	}
	s.route = route
	return nil
}

// layerSeconds is a node's measured seconds per decode token through one
// layer of the model (its speed test for the model's dtype), or def.
func layerSeconds(r wire.NodeRecord, m wire.ModelManifest, def time.Duration) float64 {
	for _, sp := range r.Heartbeat.Speed {
		if sp.DecodeTokS > 0 && (sp.Model == m.ID || strings.HasPrefix(m.ID, sp.Model)) && (sp.DType == "" || sp.DType == m.DType) {
			return 1 / sp.DecodeTokS
		}
	}
	return def.Seconds()
}
