// Package registry keeps the grid's live inventory of nodes: it consumes
// heartbeats, checks them (shape, signature, the key the node joined with,
// freshness), keeps KV nodes current (each key with a TTL so that a record
// outlives no registry), records membership events, challenges nodes to
// prove their speed and correctness, and answers queries about nodes over
// NATS micro endpoints and HTTP.
//
// Liveness is kept in memory: a sweep marks a node left once it has been
// silent for MissedBeats of its intervals. KV nodes is written when a
// record changes materially (state, fragments, devices, speed, ...) and
// otherwise every RefreshBeats heartbeats, with asynchronous publishes, so
// that ten thousand nodes beating once a second cost a fraction of a core.
package registry

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/schemas"
)

// EnvPrefix is the prefix of the registry's environment variables.
const EnvPrefix = "TESSERA_REGISTRY_"

// Config is the registry's configuration, read from TESSERA_REGISTRY_*.
type Config struct {
	// MissedBeats is how many of its heartbeat intervals a node may stay
	// silent before it is marked left (2.5: two missed beats and half an
	// interval of grace, so a stopped node is gone within three intervals).
	MissedBeats float64 `env:"MISSED_BEATS, default=2.5"`
	// SweepInterval is how often silent nodes are looked for (more often
	// when a node's heartbeat interval is below twenty of these).
	SweepInterval time.Duration `env:"SWEEP_INTERVAL, default=50ms"`
	// RefreshBeats is how many heartbeats an unchanged record may go
	// without being rewritten into KV nodes (telemetry is at most this many
	// intervals old there; the registry's endpoints always have the latest).
	RefreshBeats int `env:"REFRESH_BEATS, default=4"`
	// Workers is how many goroutines check heartbeats (0: 4×GOMAXPROCS,
	// at least 16). More than there are cores keeps the cores busy while
	// some workers wait on the round trip that binds a new node's key, so
	// that a burst of joins becomes visible quickly.
	Workers int `env:"WORKERS, default=0"`
	// SchemaEvery validates every SchemaEvery-th heartbeat of a node against
	// the JSON Schema; all get the typed decoder's strict checks (unknown
	// members, types) and explicit checks of every rule the registry relies
	// on. Full validation costs more than the signature check.
	SchemaEvery int `env:"SCHEMA_EVERY, default=64"`
	// HTTPAddr serves the JSON view of the nodes (GET /nodes, /nodes/{id},
	// /stats) when set, e.g. "127.0.0.1:8091".
	HTTPAddr string `env:"HTTP_ADDR"`
	// ChallengeEvery is the mean time between challenges of a node after
	// the first; a negative value disables challenges.
	ChallengeEvery time.Duration `env:"CHALLENGE_EVERY, default=10m"`
	// ChallengeRetry is how soon a quarantined node is challenged again.
	ChallengeRetry time.Duration `env:"CHALLENGE_RETRY, default=1m"`
	// ChallengeTimeout bounds one challenge's answer.
	ChallengeTimeout time.Duration `env:"CHALLENGE_TIMEOUT, default=10s"`
	// ChallengeRows is the number of positions a challenge sends.
	ChallengeRows int `env:"CHALLENGE_ROWS, default=4"`
	// ChallengeTolerance is the largest difference allowed between an
	// answer and the expected output, relative to the output's magnitude
	// (summation order differs between machines).
	ChallengeTolerance float64 `env:"CHALLENGE_TOLERANCE, default=0.001"`
	// ChallengeSlowFactor and ChallengeSlack bound the time an answer may
	// take: SlowFactor × the time the node's claimed prefill speed implies,
	// plus Slack for the network.
	ChallengeSlowFactor float64       `env:"CHALLENGE_SLOW_FACTOR, default=4"`
	ChallengeSlack      time.Duration `env:"CHALLENGE_SLACK, default=250ms"`
	// ChallengeConcurrency caps challenges in flight.
	ChallengeConcurrency int `env:"CHALLENGE_CONCURRENCY, default=2"`
}

// withDefaults fills unset fields (a zero Config, as tests and the
// all-in-one grid pass, behaves like the documented defaults).
func (c Config) withDefaults() Config {
	if c.MissedBeats <= 0 {
		c.MissedBeats = 2.5
	}
	if c.SweepInterval <= 0 {
		c.SweepInterval = 50 * time.Millisecond
	}
	if c.RefreshBeats <= 0 {
		c.RefreshBeats = 4
	}
	if c.Workers <= 0 {
		c.Workers = max(16, 4*runtime.GOMAXPROCS(0))
	}
	if c.SchemaEvery <= 0 {
		c.SchemaEvery = 64
	}
	if c.ChallengeRetry <= 0 {
		c.ChallengeRetry = time.Minute
	}
	if c.ChallengeTimeout <= 0 {
		c.ChallengeTimeout = 10 * time.Second
	}
	if c.ChallengeRows <= 0 {
		c.ChallengeRows = 4
	}
	if c.ChallengeTolerance <= 0 {
		c.ChallengeTolerance = 1e-3
	}
	if c.ChallengeSlowFactor <= 0 {
		c.ChallengeSlowFactor = 4
	}
	if c.ChallengeSlack <= 0 {
		c.ChallengeSlack = 250 * time.Millisecond
	}
	if c.ChallengeConcurrency <= 0 {
		c.ChallengeConcurrency = 2
	}
	return c
}

// Deps are what Run needs from its host process.
type Deps struct {
	Bus *bus.Conn
	Log *slog.Logger
	// Listening, when set, is called with the HTTP view's address once it
	// listens.
	Listening func(addr string)
}

// Registry is the running service.
type Registry struct {
	cfg     Config
	bus     *bus.Conn
	log     *slog.Logger
	js      jetstream.JetStream // asynchronous publishes of records and events
	kv      jetstream.KeyValue
	keys    jetstream.KeyValue
	schema  *schemas.Set
	metrics *metrics
	deps    Deps

	mu    sync.Mutex
	nodes map[string]*entry
	bound map[string]boundKey
	// lastBeat is the time of each node's last accepted heartbeat, kept
	// after the node leaves.
	lastBeat map[string]time.Time
	// behind is set while the intake is too far behind to judge silence.
	behind bool

	challenges *challenger
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	r, err := New(ctx, cfg, deps)
	if err != nil {
		return err
	}
	return r.Run(ctx)
}

// New prepares a registry.
func New(ctx context.Context, cfg Config, deps Deps) (*Registry, error) {
	cfg = cfg.withDefaults()
	log := deps.Log
	if log == nil {
		log = slog.Default()
	}
	r := &Registry{cfg: cfg, bus: deps.Bus, log: log, deps: deps, nodes: map[string]*entry{}, bound: map[string]boundKey{}, lastBeat: map[string]time.Time{}}
	var err error
	if r.kv, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketNodes); err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketNodes, err)
	}
	if r.keys, err = deps.Bus.JS.KeyValue(ctx, subjects.BucketNodeKeys); err != nil {
		return nil, fmt.Errorf("bucket %s: %w", subjects.BucketNodeKeys, err)
	}
	r.js, err = jetstream.New(deps.Bus.NC,
		jetstream.WithPublishAsyncMaxPending(8192),
		jetstream.WithPublishAsyncErrHandler(func(_ jetstream.JetStream, m *nats.Msg, err error) { r.publishFailed(m, err) }))
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	if r.schema, err = schemas.Compile(); err != nil {
		return nil, err
	}
	if r.metrics, err = newMetrics(); err != nil {
		return nil, err
	}
	r.challenges = newChallenger(r)
	return r, nil
}

// Run consumes heartbeats, sweeps silent nodes, challenges nodes and
// answers queries until ctx ends.
func (r *Registry) Run(ctx context.Context) error {
	if err := r.loadRecords(ctx); err != nil {
		return err
	}
	in, err := r.startIntake(ctx)
	if err != nil {
		return err
	}
	defer in.stop()
	svc, err := r.startService()
	if err != nil {
		return err
	}
	defer func() { _ = svc.Stop() }()
	if r.cfg.HTTPAddr != "" {
		ln, err := net.Listen("tcp", r.cfg.HTTPAddr)
		if err != nil {
			return fmt.Errorf("registry http %s: %w", r.cfg.HTTPAddr, err)
		}
		srv := &http.Server{Handler: r.httpHandler(), ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
		r.log.Info("registry http view listening", "addr", ln.Addr().String())
		if r.deps.Listening != nil {
			r.deps.Listening(ln.Addr().String())
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	r.challenges.ctx = cctx
	defer r.challenges.stop()
	defer cancel()
	t := time.NewTimer(r.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			// Let queued record writes and events reach the stream.
			select {
			case <-r.js.PublishAsyncComplete():
			case <-time.After(2 * time.Second):
			}
			return nil
		case now := <-t.C:
			t.Reset(r.sweep(now))
			r.challenges.schedule(now)
		}
	}
}
