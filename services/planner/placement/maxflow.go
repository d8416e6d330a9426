package placement

import "math"

// flowNet is a directed graph with float capacities for Dinic's max-flow
// algorithm. It keeps its slices between uses so that a search loop that
// evaluates many placements does not allocate.
type flowNet struct {
	head  []int32
	next  []int32
	to    []int32
	cap   []float64
	level []int32
	iter  []int32
	queue []int32
}

// flowEps is the residual capacity below which an edge counts as saturated.
const flowEps = 1e-9

// reset empties the graph and sizes it for n vertices.
func (g *flowNet) reset(n int) {
	g.head = resize(g.head, n)
	for i := range g.head {
		g.head[i] = -1
	}
	g.next, g.to, g.cap = g.next[:0], g.to[:0], g.cap[:0]
	g.level = resize(g.level, n)
	g.iter = resize(g.iter, n)
}

func resize[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

// addEdge adds u→v with capacity c and its residual twin; it returns the
// forward edge's index (the twin is index^1).
func (g *flowNet) addEdge(u, v int, c float64) int {
	e := len(g.to)
	g.to = append(g.to, int32(v), int32(u))
	g.cap = append(g.cap, c, 0)
	g.next = append(g.next, g.head[u], g.head[v])
	g.head[u], g.head[v] = int32(e), int32(e+1)
	return e
}

// flowOn is the flow pushed through forward edge e.
func (g *flowNet) flowOn(e int) float64 { return g.cap[e^1] }

// maxFlow pushes as much flow as possible from s to t and returns its value.
func (g *flowNet) maxFlow(s, t int) float64 {
	total := 0.0
	for g.bfs(s, t) {
		copy(g.iter, g.head)
		for {
			f := g.dfs(s, t, math.Inf(1))
			if f <= flowEps {
				break
			}
			total += f
			if math.IsInf(total, 1) {
				return total
			}
		}
	}
	return total
}

func (g *flowNet) bfs(s, t int) bool {
	for i := range g.level {
		g.level[i] = -1
	}
	g.queue = append(g.queue[:0], int32(s))
	g.level[s] = 0
	for qi := 0; qi < len(g.queue); qi++ {
		u := g.queue[qi]
		for e := g.head[u]; e >= 0; e = g.next[e] {
			v := g.to[e]
			if g.cap[e] > flowEps && g.level[v] < 0 {
				g.level[v] = g.level[u] + 1
				g.queue = append(g.queue, v)
			}
		}
	}
	return g.level[t] >= 0
}

func (g *flowNet) dfs(u, t int, limit float64) float64 {
	if u == t {
		return limit
	}
	for ; g.iter[u] >= 0; g.iter[u] = g.next[g.iter[u]] {
		e := g.iter[u]
		v := int(g.to[e])
		if g.cap[e] <= flowEps || g.level[v] != g.level[u]+1 {
			continue
		}
		if d := g.dfs(v, t, min(limit, g.cap[e])); d > flowEps {
			g.cap[e] -= d
			g.cap[e^1] += d
			return d
		}
	}
	return 0
}
