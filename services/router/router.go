// Package router is the grid's front door: an OpenAI-compatible HTTP API and
// the same operations over NATS. It tokenizes, picks a route through live
// replicas of the model's plan, drives every token through the stages,
// samples, and recovers from failed nodes mid-generation.
package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/services/router/internal/admission"
	"github.com/tessera-grid/tessera/services/router/internal/api"
	"github.com/tessera-grid/tessera/services/router/internal/auth"
	"github.com/tessera-grid/tessera/services/router/internal/console"
	"github.com/tessera-grid/tessera/services/router/internal/generate"
	"github.com/tessera-grid/tessera/services/router/internal/grid"
)

// EnvPrefix is the prefix of the router's environment variables.
const EnvPrefix = "TESSERA_ROUTER_"

// Version is reported by the router's micro service.
const Version = "0.1.0"

// Config is the router's configuration, read from TESSERA_ROUTER_*.
type Config struct {
	// HTTPAddr is where the OpenAI-compatible API listens (empty: no HTTP).
	HTTPAddr string `env:"HTTP_ADDR, default=127.0.0.1:8080"`
	// AnonymousCustomer, when set, serves requests without an API key as
	// this customer (development grids); otherwise a key is required.
	AnonymousCustomer string `env:"ANONYMOUS_CUSTOMER"`
	// StageTimeout bounds one pass through the route before failover.
	StageTimeout time.Duration `env:"STAGE_TIMEOUT, default=10s"`
	// FailoverWait is how long a request whose route broke waits for a new
	// route (a replica, or the re-plan after a node left).
	FailoverWait time.Duration `env:"FAILOVER_WAIT, default=30s"`
	// Region is where this router runs; nodes in other regions cost
	// RegionLatency more per hop when routes are chosen.
	Region        string        `env:"REGION, default=local"`
	RegionLatency time.Duration `env:"REGION_LATENCY, default=20ms"`
	// RequestTimeout bounds a whole request.
	RequestTimeout time.Duration `env:"REQUEST_TIMEOUT, default=5m"`
	// DefaultMaxTokens applies when a request gives none.
	DefaultMaxTokens int `env:"DEFAULT_MAX_TOKENS, default=16"`
	// CustomerConcurrency caps each customer's requests running at once
	// (0: unlimited); an API key may override it.
	CustomerConcurrency int `env:"CUSTOMER_CONCURRENCY, default=16"`
	// CustomerTokensPerMinute caps each customer's prompt plus completion
	// tokens per minute (0: unlimited); an API key may override it.
	CustomerTokensPerMinute int `env:"CUSTOMER_TOKENS_PER_MINUTE, default=0"`
	// QueueSize bounds the requests waiting for a concurrency slot.
	QueueSize int `env:"QUEUE_SIZE, default=256"`
	// QueueWait is the longest a request waits in the queue before a 429.
	QueueWait time.Duration `env:"QUEUE_WAIT, default=30s"`
	// MaxBody caps HTTP request bodies, in bytes.
	MaxBody int64 `env:"MAX_BODY, default=1048576"`
	// ConsoleAddr is where the operator console listens (GET /console/;
	// empty: no console). It shows the whole grid: keep it on a private
	// address, apart from the API.
	ConsoleAddr string `env:"CONSOLE_ADDR"`
	// ExpertLoadInterval is how often the router adds the expert-use counts
	// it gathered (per model, layer and expert) to KV expertload, for the
	// planner.
	ExpertLoadInterval time.Duration `env:"EXPERT_LOAD_INTERVAL, default=10s"`
	// ExpertLoadSample makes one pass in this many pause at every layer
	// with experts, also those whose stage node holds all their experts
	// and would run them whole, so that the counts cover every such layer
	// (each of these counts weighs ExpertLoadSample); layers whose experts
	// are spread are counted on every pass. 0 (the default) counts spread
	// layers only: a sampled pass waits for one more round trip per layer
	// with experts, and the counts of spread layers are what the planner
	// balances by once it spreads them.
	ExpertLoadSample int `env:"EXPERT_LOAD_SAMPLE, default=0"`
}

// Deps are what Run needs from its host process.
type Deps struct {
	Bus *bus.Conn
	Log *slog.Logger
	// Listening, if set, receives the HTTP address once it accepts requests.
	Listening func(addr string)
	// ConsoleListening, if set, receives the console's address once it
	// accepts requests.
	ConsoleListening func(addr string)
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	log := deps.Log
	if log == nil {
		log = slog.Default()
	}
	if cfg.ExpertLoadSample < 0 {
		return fmt.Errorf("%sEXPERT_LOAD_SAMPLE=%d: want 0 or a number of passes", EnvPrefix, cfg.ExpertLoadSample)
	}
	view := grid.New(deps.Bus, log)
	viewDone := make(chan error, 1)
	vctx, stopView := context.WithCancel(ctx)
	defer stopView()
	go func() { viewDone <- view.Run(vctx) }()
	keys, err := auth.Open(ctx, deps.Bus.JS, cfg.AnonymousCustomer)
	if err != nil {
		return err
	}
	engine := generate.New(deps.Bus, view, log, cfg.StageTimeout, cfg.FailoverWait, generate.RouteCosts{Region: cfg.Region, RegionLatency: cfg.RegionLatency}, cfg.ExpertLoadSample)
	srv := &api.Server{
		Engine: engine, View: view, Auth: keys, Log: log,
		MaxBody: cfg.MaxBody, DefaultMaxTokens: cfg.DefaultMaxTokens, RequestTimeout: cfg.RequestTimeout,
		Admission: admission.New(admission.Limits{Concurrent: cfg.CustomerConcurrency, TokensPerMinute: cfg.CustomerTokensPerMinute}, cfg.QueueSize, cfg.QueueWait),
	}
	if cfg.ExpertLoadInterval > 0 {
		lctx, stopLoad := context.WithCancel(ctx)
		loadDone := make(chan struct{})
		go func() {
			defer close(loadDone)
			if err := engine.PublishExpertLoad(lctx, cfg.ExpertLoadInterval); err != nil {
				log.Error("expert load not published", "err", err)
			}
		}()
		defer func() { stopLoad(); <-loadDone }()
	}
	ms, err := srv.AddNATS(deps.Bus.NC, Version)
	if err != nil {
		return fmt.Errorf("micro service: %w", err)
	}
	defer ms.Stop()
	if cfg.ConsoleAddr != "" {
		stop, err := serveConsole(ctx, cfg.ConsoleAddr, console.New(deps.Bus, view, engine.Activity(), log), log, deps.ConsoleListening)
		if err != nil {
			return err
		}
		defer stop()
	}
	if cfg.HTTPAddr == "" {
		<-ctx.Done()
		return nil
	}
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("%sHTTP_ADDR=%s: %w", EnvPrefix, cfg.HTTPAddr, err)
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	log.Info("router listening", "http", ln.Addr().String())
	if deps.Listening != nil {
		deps.Listening(ln.Addr().String())
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// serveConsole serves the console on addr until the returned function is
// called.
func serveConsole(ctx context.Context, addr string, c *console.Console, log *slog.Logger, listening func(string)) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%sCONSOLE_ADDR=%s: %w", EnvPrefix, addr, err)
	}
	cctx, cancel := context.WithCancel(ctx)
	tails := make(chan struct{})
	go func() { c.Run(cctx); close(tails) }()
	hs := &http.Server{Handler: c.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("console", "err", err)
		}
	}()
	log.Info("console listening", "url", "http://"+ln.Addr().String()+"/console/")
	if listening != nil {
		listening(ln.Addr().String())
	}
	return func() {
		sctx, stop := context.WithTimeout(context.Background(), 5*time.Second)
		defer stop()
		_ = hs.Shutdown(sctx)
		cancel()
		<-tails
	}, nil
}

// HdrFailovers, on a completion response that is not streamed, says how
// many times the request changed route after a stage failed.
const HdrFailovers = api.HdrFailovers

// Limits are a customer's quotas (zero fields: unlimited).
type Limits = admission.Limits

// AddKey stores an API key for customer in the grid b connects to, with
// optional quota overrides.
func AddKey(ctx context.Context, b *bus.Conn, key, customer, label string, limits *Limits) error {
	s, err := auth.Open(ctx, b.JS, "")
	if err != nil {
		return err
	}
	return s.Add(ctx, key, customer, label, limits)
}

// NewKey returns a fresh random API key.
func NewKey() string { return auth.NewKey() }
