// Package node is the executor's core: it holds the fragments the plan
// assigns to this node, serves stage requests (batching concurrent decode
// steps) and expert requests (feed-forward experts of layers split over
// nodes), keeps each request's KV cache, and accounts usage per request.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/spool"
)

// Options configures a Node.
type Options struct {
	// ID is the node id (a subject token).
	ID       string
	Supplier string
	Region   string
	// DeviceType names the device class computing (e.g. "cpu", "NVIDIA A100").
	DeviceType string
	// Threads is the compute parallelism (0: GOMAXPROCS).
	Threads int
	// Pool, when set, runs this node's compute instead of a pool of its
	// own: nodes sharing a process (the all-in-one grid, benchmarks) then
	// share its cores without oversubscribing them.
	Pool *compute.Pool
	// MaxBatch caps how many queued requests one forward pass takes.
	MaxBatch int
	// QueueLimit caps queued requests per stage before "overloaded".
	QueueLimit int
	// SessionIdle frees a request's caches when it sees no traffic this long.
	SessionIdle time.Duration
	// MemoryBudget caps weights plus caches, in bytes (0: no cap).
	MemoryBudget uint64
	// Signer signs usage events; nil publishes them unsigned.
	Signer UsageSigner
	// Spool keeps usage events on disk until the stream acknowledges them;
	// nil publishes them from memory only.
	Spool *spool.Spool
	// PublishTimeout is how long a release keeps retrying its usage events
	// before it leaves them to the spool (default 30s).
	PublishTimeout time.Duration
	// SpoolRetry is how often events a release could not publish are
	// tried again (default 10s).
	SpoolRetry time.Duration
	// TamperChallenge, when set, alters every challenge answer before it is
	// sent: tests use it to play a node that computes wrongly.
	TamperChallenge func(out []float32)
}

// UsageSigner signs usage events before they are published.
type UsageSigner interface {
	// PublicKey is the signer's nkey.
	PublicKey() string
	// SignUsage fills the signature fields of the events.
	SignUsage(events []*wire.UsageEvent) error
}

// Node is one executor's serving state.
type Node struct {
	opts  Options
	bus   *bus.Conn
	log   *slog.Logger
	store *fragstore.Store
	pool  *compute.Pool

	metrics *metrics

	mu       sync.Mutex
	models   map[string]*modelState
	sessions map[sessionKey]*session
	// released remembers finished requests for a while, so that a stage
	// request still in flight when its release came cannot open a session
	// that nobody would release.
	released map[string]time.Time
	draining bool

	queued   atomic.Int64
	inflight sync.WaitGroup
	// publishing counts releases whose usage is spooled and still being
	// published: a release hands it over, so that a slow stream never
	// holds up the releases behind it.
	publishing sync.WaitGroup
	fetch      struct {
		done, total atomic.Int64
	}
}

// New returns a node; Run starts it.
func New(opts Options, b *bus.Conn, log *slog.Logger) (*Node, error) {
	if err := subjects.Token(opts.ID); err != nil {
		return nil, fmt.Errorf("node id: %w", err)
	}
	if opts.MaxBatch <= 0 {
		opts.MaxBatch = 32
	}
	if opts.QueueLimit <= 0 {
		opts.QueueLimit = 1024
	}
	if opts.SessionIdle <= 0 {
		opts.SessionIdle = 2 * time.Minute
	}
	if opts.DeviceType == "" {
		opts.DeviceType = "cpu"
	}
	if opts.PublishTimeout <= 0 {
		opts.PublishTimeout = 30 * time.Second
	}
	if opts.SpoolRetry <= 0 {
		opts.SpoolRetry = 10 * time.Second
	}
	pool := opts.Pool
	if pool == nil {
		pool = compute.NewPool(opts.Threads)
	}
	return &Node{
		opts: opts, bus: b, log: log.With("node", opts.ID),
		pool:     pool,
		metrics:  newMetrics(opts.ID),
		models:   map[string]*modelState{},
		sessions: map[sessionKey]*session{},
		released: map[string]time.Time{},
	}, nil
}

// ID is the node's id.
func (n *Node) ID() string { return n.opts.ID }

// Run serves until ctx ends: it watches plans, loads fragments, and answers
// stage and control requests. On return, in-flight work has finished and
// every open request's usage has been published.
func (n *Node) Run(ctx context.Context) error {
	st, err := fragstore.Open(ctx, n.bus.JS)
	if err != nil {
		return err
	}
	n.store = st
	sub, err := n.bus.NC.Subscribe(subjects.Stage(n.opts.ID), n.onStage)
	if err != nil {
		return fmt.Errorf("subscribe stage: %w", err)
	}
	sub.SetPendingLimits(-1, -1)
	exp, err := n.bus.NC.Subscribe(subjects.Expert(n.opts.ID), n.onExpert)
	if err != nil {
		return fmt.Errorf("subscribe expert: %w", err)
	}
	exp.SetPendingLimits(-1, -1)
	rel, err := n.bus.NC.Subscribe(subjects.SessionRelease, n.onRelease)
	if err != nil {
		return fmt.Errorf("subscribe release: %w", err)
	}
	ctl, err := n.bus.NC.Subscribe(subjects.Control(n.opts.ID), n.onControl)
	if err != nil {
		return fmt.Errorf("subscribe control: %w", err)
	}
	chal, err := n.bus.NC.Subscribe(subjects.Challenge(n.opts.ID), n.onChallenge)
	if err != nil {
		return fmt.Errorf("subscribe challenge: %w", err)
	}
	unregister := n.metrics.register(n)
	defer unregister()
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); n.watchPlans(ctx) }()
	go func() { defer wg.Done(); n.reapIdle(ctx) }()
	go func() { defer wg.Done(); n.replaySpool(ctx, n.opts.SpoolRetry) }()
	<-ctx.Done()
	// Stop taking work, finish what is queued, then account for it.
	_ = sub.Drain()
	_ = exp.Drain()
	_ = ctl.Unsubscribe()
	_ = chal.Unsubscribe()
	n.waitSubDrained(sub)
	n.waitSubDrained(exp)
	n.inflight.Wait()
	_ = rel.Unsubscribe()
	n.stopRunners()
	wg.Wait()
	n.releaseAll("executor stopping")
	n.publishing.Wait()
	// What earlier releases could not publish gets a last chance, so that a
	// node stopped in good order leaves nothing in its spool if it can help
	// it (what stays is published at the next start).
	fctx, cancel := context.WithTimeout(context.Background(), n.opts.PublishTimeout)
	defer cancel()
	n.replay(fctx, 0)
	return nil
}

func (n *Node) waitSubDrained(sub *nats.Subscription) {
	for i := 0; i < 500 && sub.IsValid(); i++ {
		time.Sleep(10 * time.Millisecond)
	}
}

// SetDraining marks the node as draining: it finishes requests it has
// sessions for but refuses new ones.
func (n *Node) SetDraining() {
	n.mu.Lock()
	n.draining = true
	n.mu.Unlock()
}

// Status is a snapshot for heartbeats.
type Status struct {
	Draining     bool
	Fragments    []string
	Models       []string
	Fetch        wire.FetchProgress
	QueueDepth   int
	Sessions     int
	WeightBytes  uint64
	CacheBytes   uint64
	KVTokensFree int64
}

// Status reports what the node holds and how busy it is.
func (n *Node) Status() Status {
	n.mu.Lock()
	defer n.mu.Unlock()
	s := Status{Draining: n.draining, QueueDepth: int(n.queued.Load()), Sessions: len(n.sessions)}
	for id, m := range n.models {
		s.Models = append(s.Models, id)
		s.Fragments = append(s.Fragments, m.fragmentIDs()...)
		s.WeightBytes += uint64(m.bytes)
	}
	var cacheBytes int64
	for _, se := range n.sessions {
		cacheBytes += se.cacheBytes.Load()
	}
	s.CacheBytes = uint64(cacheBytes)
	s.Fetch = wire.FetchProgress{BytesDone: n.fetch.done.Load(), BytesTotal: n.fetch.total.Load()}
	if b := n.opts.MemoryBudget; b > 0 {
		free := int64(b) - int64(s.WeightBytes) - cacheBytes
		per := int64(0)
		for _, m := range n.models {
			per += m.manifest.KVBytesPerToken * int64(m.end-m.first)
		}
		if per > 0 && free > 0 {
			s.KVTokensFree = free / per
		}
	}
	return s
}

// errReply is an error that goes back to the requester with a code.
type errReply struct {
	code string
	err  error
}

func (e *errReply) Error() string { return e.code + ": " + e.err.Error() }
func (e *errReply) Unwrap() error { return e.err }

func replyErr(code string, format string, args ...any) error {
	return &errReply{code: code, err: fmt.Errorf(format, args...)}
}

// respondError sends an error reply for msg to its requester.
func (n *Node) respondError(reply string, req string, err error) {
	if reply == "" {
		return
	}
	code := wire.ErrCodeInternal
	var er *errReply
	if errors.As(err, &er) {
		code = er.code
	}
	if errors.Is(err, compute.ErrCacheMiss) {
		code = wire.ErrCodeKVMiss
	}
	m := nats.NewMsg(reply)
	m.Header.Set(wire.HdrError, code+": "+err.Error())
	m.Header.Set(wire.HdrNode, n.opts.ID)
	m.Header.Set(wire.HdrRequest, req)
	if perr := n.bus.NC.PublishMsg(m); perr != nil {
		n.log.Warn("error reply not sent", "err", perr)
	}
}
