package placement

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestAssignIsOptimal compares the assignment solver with brute force.
func TestAssignIsOptimal(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for trial := range 200 {
		n, m := 1+rng.IntN(4), 0
		m = n + rng.IntN(3)
		cost := make([][]float64, n)
		for i := range cost {
			cost[i] = make([]float64, m)
			for j := range cost[i] {
				cost[i][j] = float64(rng.IntN(10))
				if rng.IntN(6) == 0 {
					cost[i][j] = math.Inf(1)
				}
			}
		}
		got := assign(cost)
		total := func(match []int) (float64, int) {
			sum, missing := 0.0, 0
			for i, j := range match {
				if j < 0 {
					missing++
					continue
				}
				sum += cost[i][j]
			}
			return sum, missing
		}
		gotSum, gotMissing := total(got)
		seen := map[int]bool{}
		for _, j := range got {
			if j >= 0 && seen[j] {
				t.Fatalf("trial %d: column %d used twice: %v", trial, j, got)
			}
			seen[j] = true
		}
		best, bestMissing := math.Inf(1), n+1
		var rec func(i int, used []bool, match []int)
		rec = func(i int, used []bool, match []int) {
			if i == n {
				s, miss := total(match)
				if miss < bestMissing || miss == bestMissing && s < best {
					best, bestMissing = s, miss
				}
				return
			}
			for j := range m {
				if !used[j] && !math.IsInf(cost[i][j], 1) {
					used[j], match[i] = true, j
					rec(i+1, used, match)
					used[j], match[i] = false, -1
				}
			}
			match[i] = -1
			rec(i+1, used, match)
		}
		match := make([]int, n)
		rec(0, make([]bool, m), match)
		if gotMissing != bestMissing || gotSum != best {
			t.Fatalf("trial %d: cost %v: got %v (sum %v, %d unmatched), best %v (%d unmatched)", trial, cost, got, gotSum, gotMissing, best, bestMissing)
		}
	}
}

func TestPetalsBestStart(t *testing.T) {
	totals := []float64{5, 1, 1, 3, 0, 2, 9}
	// Windows of 2: sorted [1,5] [1,1] [1,3] [0,3] [0,2] [2,9]: [0,2] is smallest.
	if got := petalsBestStart(totals, 2); got != 4 {
		t.Fatalf("best start = %d, want 4", got)
	}
	if got := petalsBestStart([]float64{0, 0, 0}, 2); got != 0 {
		t.Fatalf("tie: best start = %d, want the earliest", got)
	}
}

func TestMaxFlowSmall(t *testing.T) {
	var g flowNet
	g.reset(4)
	g.addEdge(0, 1, 3)
	g.addEdge(0, 2, 2)
	g.addEdge(1, 2, 5)
	g.addEdge(1, 3, 2)
	g.addEdge(2, 3, 3)
	if got := g.maxFlow(0, 3); math.Abs(got-5) > 1e-12 {
		t.Fatalf("max flow = %v, want 5", got)
	}
}
