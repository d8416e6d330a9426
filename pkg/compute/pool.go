package compute

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Pool runs data-parallel loops on a fixed set of worker goroutines, so the
// hot loop starts no goroutines and allocates nothing per call. Workers
// take chunks of a loop from a shared counter (a busy core simply takes
// fewer), spin briefly between loops so that the next one of the same
// token starts without a wake-up, and then park.
type Pool struct {
	workers int
	// mu serialises loops: stages sharing a pool take turns, each loop
	// using every worker.
	mu sync.Mutex

	seq     atomic.Uint64 // loop number; a change tells workers to join
	task    task          // the current loop, written before seq moves
	n       int
	grain   int
	next    atomic.Int64 // next chunk start
	pending atomic.Int32 // workers still inside the current loop

	parked []atomic.Bool
	wake   []chan struct{}
	quit   chan struct{}
	once   sync.Once
}

// task is a loop body: run handles items [lo, hi) on worker w (< Workers()).
type task interface {
	run(w, lo, hi int)
}

// funcTask adapts a closure (For, ForW) to a task.
type funcTask func(w, lo, hi int)

func (f funcTask) run(w, lo, hi int) { f(w, lo, hi) }

// spinTime is how long an idle worker polls for the next loop, yielding
// its thread in between, before it parks. The gap between two loops of one
// token is microseconds; a quarter millisecond also bridges a hop between
// stages on one machine, where waking a parked thread costs tens of
// microseconds each time.
const spinTime = 250 * time.Microsecond

// NewPool returns a pool of n workers (n <= 0: GOMAXPROCS).
func NewPool(n int) *Pool {
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	p := &Pool{workers: n, parked: make([]atomic.Bool, n), wake: make([]chan struct{}, n), quit: make(chan struct{})}
	for i := 1; i < n; i++ {
		p.wake[i] = make(chan struct{}, 1)
		go p.work(i)
	}
	return p
}

// Workers is the pool's parallelism.
func (p *Pool) Workers() int { return p.workers }

// Close stops the workers; the pool must not be used afterwards.
func (p *Pool) Close() { p.once.Do(func() { close(p.quit) }) }

// For calls fn over [0, n) split into contiguous chunks of at least grain
// items, the caller's goroutine taking part.
func (p *Pool) For(n, grain int, fn func(lo, hi int)) {
	p.run(funcTask(func(_, lo, hi int) { fn(lo, hi) }), n, grain)
}

// ForW is For whose fn also receives the worker's index (below Workers()),
// so that each chunk can use that worker's scratch space.
func (p *Pool) ForW(n, grain int, fn func(w, lo, hi int)) {
	p.run(funcTask(fn), n, grain)
}

// run executes t over [0, n) in chunks of grain items and returns when
// every chunk is done.
func (p *Pool) run(t task, n, grain int) {
	if n <= 0 {
		return
	}
	grain = max(grain, 1)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.workers == 1 || n <= grain {
		t.run(0, 0, n)
		return
	}
	p.task, p.n, p.grain = t, n, grain
	p.next.Store(0)
	p.pending.Store(int32(p.workers - 1))
	p.seq.Add(1)
	for i := 1; i < p.workers; i++ {
		if p.parked[i].CompareAndSwap(true, false) {
			p.wake[i] <- struct{}{}
		}
	}
	p.chunks(0)
	// Wait for the workers to leave the loop (they may still be finishing
	// a chunk, or only now waking to find nothing left).
	for i := 0; p.pending.Load() != 0; i++ {
		if i > 64 {
			runtime.Gosched()
		}
	}
	p.task = nil
}

// chunks takes chunks of the current loop until none are left.
func (p *Pool) chunks(w int) {
	t, n, grain := p.task, p.n, p.grain
	for {
		lo := int(p.next.Add(int64(grain))) - grain
		if lo >= n {
			return
		}
		t.run(w, lo, min(lo+grain, n))
	}
}

func (p *Pool) work(w int) {
	var seen uint64
	for {
		s := p.seq.Load()
		idle := time.Now()
		for i := 0; s == seen; i++ {
			if i%16 != 0 || time.Since(idle) < spinTime {
				runtime.Gosched()
				s = p.seq.Load()
				continue
			}
			// Park; a loop started in between is noticed on the re-check.
			p.parked[w].Store(true)
			if s = p.seq.Load(); s != seen {
				if !p.parked[w].CompareAndSwap(true, false) {
					<-p.wake[w] // the caller claimed us: take its token
				}
				break
			}
			select {
			case <-p.wake[w]:
			case <-p.quit:
				return
			}
			s = p.seq.Load()
			idle = time.Now()
		}
		seen = s
		p.chunks(w)
		p.pending.Add(-1)
	}
}
