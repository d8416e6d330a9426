package placement

import (
	"context"
	"math/rand/v2"
	"slices"
)

// DefaultEvaluations is the local-search budget (max-flow evaluations) of a
// Tessera with Evaluations 0.
const DefaultEvaluations = 6000

// polishSpans is the plan size up to which the search gets its whole budget.
const polishSpans = 48

// polishMaxSpans bounds the plans the local search touches: beyond it the
// construction is already fine-grained and one evaluation costs too much.
const polishMaxSpans = 400

// search is the local-search state: spans by node (first == end: idle).
type search struct {
	f     *Fleet
	ev    evaluator
	at    []span // at[k] is the span of nodes[k]
	nodes []int
	buf   []span
	bufAt []int // bufAt[b] is the position in at of buf[b]
	rng   *rand.Rand
	evals int
}

// flow evaluates the current spans (idle nodes left out).
func (s *search) flow() float64 {
	s.buf, s.bufAt = s.buf[:0], s.bufAt[:0]
	for k, sp := range s.at {
		if sp.end > sp.first {
			s.buf = append(s.buf, sp)
			s.bufAt = append(s.bufAt, k)
		}
	}
	s.evals++
	total, _ := s.ev.run(s.f, s.buf, Strict, false)
	return total
}

// bottleneck lists the positions (in at) of the spans on the min cut of the
// last evaluation: their capacity is what limits the flow.
func (s *search) bottleneck() []int {
	var out []int
	for gi := range s.ev.groups {
		if s.ev.net.level[2+2*gi] >= 0 && s.ev.net.level[3+2*gi] < 0 {
			for _, m := range s.ev.groups[gi].members {
				out = append(out, s.bufAt[m])
			}
		}
	}
	return out
}

// ok reports whether node position k may hold [first, end).
func (s *search) ok(k, first, end int) bool {
	i := s.nodes[k]
	n := end - first
	return first >= 0 && end <= s.f.problem.Model.Layers && n >= 1 && n <= s.f.limit[i] && s.f.capacity[i][n] > 0
}

// polish improves spans by local search on the exact max flow: it moves the
// boundaries around the bottleneck, puts idle nodes beside it and swaps
// ranges between nodes, keeping every change that does not lower the flow.
// It is deterministic for a given seed and budget.
func (t Tessera) polish(ctx context.Context, f *Fleet, spans []span) []span {
	budget := t.Evaluations
	if budget == 0 {
		budget = DefaultEvaluations
	}
	if budget < 0 || len(spans) == 0 || len(spans) > polishMaxSpans {
		return spans
	}
	// An evaluation costs about the number of spans: keep the work, not the
	// count, constant beyond a fleet of polishSpans.
	if len(spans) > polishSpans {
		budget = max(1, budget*polishSpans/len(spans))
	}
	s := &search{f: f, rng: rand.New(rand.NewPCG(t.Seed, 0x7e55e4a))}
	used := map[int]bool{}
	for _, sp := range spans {
		s.nodes = append(s.nodes, sp.node)
		s.at = append(s.at, sp)
		used[sp.node] = true
	}
	for _, i := range f.eligible() {
		if !used[i] && len(s.nodes) < polishMaxSpans {
			s.nodes = append(s.nodes, i)
			s.at = append(s.at, span{node: i})
		}
	}
	cur := s.flow()
	best, bestAt := cur, slices.Clone(s.at)
	saved := make([]span, len(s.at))
	for s.evals < budget && ctx.Err() == nil {
		// Re-evaluate so the min cut belongs to the current spans.
		cur = s.flow()
		cut := s.bottleneck()
		copy(saved, s.at)
		if !s.move(cut) {
			continue
		}
		next := s.flow()
		switch {
		case next > cur*(1+1e-12):
			cur = next
			if cur > best*(1+1e-12) {
				best, bestAt = cur, slices.Clone(s.at)
			}
		case next >= cur*(1-1e-12) && s.rng.IntN(4) == 0:
			cur = next // drift along the plateau now and then
		default:
			copy(s.at, saved)
		}
	}
	var out []span
	for _, sp := range bestAt {
		if sp.end > sp.first {
			out = append(out, sp)
		}
	}
	return out
}

// move applies one random change, aimed at the bottleneck; false when the
// drawn change is not possible.
func (s *search) move(cut []int) bool {
	if len(cut) == 0 {
		return false
	}
	k := cut[s.rng.IntN(len(cut))]
	sp := s.at[k]
	switch s.rng.IntN(4) {
	case 0: // shrink from the front: the spans ending at first follow
		return s.shiftBoundary(sp.first, +1)
	case 1: // shrink from the back: the spans starting at end follow
		return s.shiftBoundary(sp.end, -1)
	case 2: // a node joins beside the bottleneck span
		j := s.rng.IntN(len(s.at))
		if j == k || !s.ok(j, sp.first, sp.end) {
			return false
		}
		if other := s.at[j]; other.end > other.first && s.rng.IntN(2) == 0 {
			return false // mostly recruit idle nodes; sometimes take a busy one
		}
		s.at[j] = span{node: s.nodes[j], first: sp.first, end: sp.end, pipe: sp.pipe}
		return true
	default: // swap ranges with another node
		j := s.rng.IntN(len(s.at))
		o := s.at[j]
		if j == k || s.nodes[j] == s.nodes[k] || !s.ok(k, o.first, o.end) && o.end > o.first || !s.ok(j, sp.first, sp.end) {
			return false
		}
		s.at[k] = span{node: s.nodes[k], first: o.first, end: o.end, pipe: o.pipe}
		s.at[j] = span{node: s.nodes[j], first: sp.first, end: sp.end, pipe: sp.pipe}
		return true
	}
}

// shiftBoundary moves boundary b by d for every span that starts or ends
// there; false if a span would become empty or exceed its node's limit.
func (s *search) shiftBoundary(b, d int) bool {
	L := s.f.problem.Model.Layers
	if b <= 0 || b >= L || b+d <= 0 || b+d >= L {
		return false
	}
	for k, sp := range s.at {
		if sp.end <= sp.first {
			continue
		}
		first, end := sp.first, sp.end
		if first == b {
			first += d
		}
		if end == b {
			end += d
		}
		if (first != sp.first || end != sp.end) && !s.ok(k, first, end) {
			return false
		}
	}
	for k := range s.at {
		sp := &s.at[k]
		if sp.end <= sp.first {
			continue
		}
		if sp.first == b {
			sp.first += d
		}
		if sp.end == b {
			sp.end += d
		}
	}
	return true
}
