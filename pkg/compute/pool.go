package compute

import (
	"runtime"
	"sync"
)

// Pool runs data-parallel loops on a fixed set of worker goroutines, so the
// hot loop starts no goroutines and allocates nothing per call.
type Pool struct {
	workers int
	jobs    chan poolJob
	once    sync.Once
}

type poolJob struct {
	fn     func(w, lo, hi int)
	w      int
	lo, hi int
	wg     *sync.WaitGroup
}

// NewPool returns a pool of n workers (n <= 0: GOMAXPROCS).
func NewPool(n int) *Pool {
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	p := &Pool{workers: n, jobs: make(chan poolJob, n)}
	for i := 1; i < n; i++ {
		go p.work()
	}
	return p
}

// Workers is the pool's parallelism.
func (p *Pool) Workers() int { return p.workers }

// Close stops the workers; the pool must not be used afterwards.
func (p *Pool) Close() { p.once.Do(func() { close(p.jobs) }) }

func (p *Pool) work() {
	for j := range p.jobs {
		j.fn(j.w, j.lo, j.hi)
		j.wg.Done()
	}
}

// For calls fn over [0, n) split into contiguous chunks of at least grain
// items, one chunk per worker, the caller's goroutine taking the first.
func (p *Pool) For(n, grain int, fn func(lo, hi int)) {
	p.ForW(n, grain, func(_, lo, hi int) { fn(lo, hi) })
}

// ForW is For whose fn also receives the chunk's index (below Workers()),
// so that each chunk can use its own scratch space.
func (p *Pool) ForW(n, grain int, fn func(w, lo, hi int)) {
	if n <= 0 {
		return
	}
	if grain < 1 {
		grain = 1
	}
	parts := p.workers
	if max := (n + grain - 1) / grain; parts > max {
		parts = max
	}
	if parts <= 1 {
		fn(0, 0, n)
		return
	}
	var wg sync.WaitGroup
	wg.Add(parts - 1)
	chunk := (n + parts - 1) / parts
	for i := 1; i < parts; i++ {
		lo := i * chunk
		hi := min(lo+chunk, n)
		if lo >= hi {
			wg.Done()
			continue
		}
		p.jobs <- poolJob{fn: fn, w: i, lo: lo, hi: hi, wg: &wg}
	}
	fn(0, 0, min(chunk, n))
	wg.Wait()
}
