// Package local runs the whole grid in one process: an embedded NATS server
// with JetStream (or an external one), the registry, planner, router and
// settlement, and several executors, each service with its own connection
// exactly as if it ran alone. `tessera run` and the end-to-end tests use it;
// tests stop and restart single services through it.
package local

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor"
	"github.com/tessera-grid/tessera/services/planner"
	"github.com/tessera-grid/tessera/services/registry"
	"github.com/tessera-grid/tessera/services/router"
	"github.com/tessera-grid/tessera/services/settlement"
)

// Options configures a local grid.
type Options struct {
	// DataDir holds NATS data and executor state.
	DataDir string
	// NATS is how to reach NATS; an empty URL starts an embedded server.
	NATS config.NATS
	// NATSPort is the embedded server's port (-1: any free port).
	NATSPort int
	// Executors is how many executors to start.
	Executors int
	// Router, Registry, Planner, Settlement and Executor configure the services.
	Router     router.Config
	Registry   registry.Config
	Planner    planner.Config
	Settlement settlement.Config
	Executor   executor.Config
	// NoSettlement leaves settlement out (no ClickHouse needed).
	NoSettlement bool
	// SharedPool runs every executor's compute on one pool of the
	// machine's cores instead of a pool per executor.
	SharedPool bool
	Log        *slog.Logger
}

// Defaults returns Options with every service's documented defaults, as
// an empty environment gives them.
func Defaults(ctx context.Context) (Options, error) {
	var o Options
	for _, c := range []struct {
		prefix string
		target any
	}{
		{"", &o.NATS}, {router.EnvPrefix, &o.Router}, {registry.EnvPrefix, &o.Registry}, {planner.EnvPrefix, &o.Planner},
		{settlement.EnvPrefix, &o.Settlement}, {executor.EnvPrefix, &o.Executor},
	} {
		if err := config.LoadMap(ctx, c.prefix, c.target, nil); err != nil {
			return o, err
		}
	}
	o.Executors = 3
	o.DataDir = "var"
	return o, nil
}

// Grid is a running local grid.
type Grid struct {
	opts   Options
	Server *server.Server
	// Admin is a connection for the grid's own setup (imports, keys).
	Admin *bus.Conn
	log   *slog.Logger

	pool     *compute.Pool
	mu       sync.Mutex
	services map[string]*running
	httpAddr chan string
	addr     string
	// console receives the console's address each time the router starts.
	console     chan string
	consoleAddr string
}

type running struct {
	cancel context.CancelFunc
	done   chan error
	conn   *bus.Conn
}

// Start brings the grid up: NATS, streams and buckets, then every service.
func Start(ctx context.Context, o Options) (*Grid, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	g := &Grid{opts: o, log: o.Log, services: map[string]*running{}, httpAddr: make(chan string, 1), console: make(chan string, 1)}
	if o.SharedPool {
		g.pool = compute.NewPool(o.Executor.Threads)
	}
	if o.NATS.URL == "" {
		port := o.NATSPort
		s, err := bus.StartEmbedded(bus.EmbedOptions{StoreDir: filepath.Join(o.DataDir, "nats"), Port: port, Name: "tessera-local"})
		if err != nil {
			return nil, err
		}
		g.Server = s
	}
	admin, err := g.connect(ctx, "admin")
	if err != nil {
		g.Close()
		return nil, err
	}
	g.Admin = admin
	bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := bus.Bootstrap(bctx, admin.JS, max(o.NATS.Replicas, 1)); err != nil {
		g.Close()
		return nil, err
	}
	starts := []func() error{g.StartRegistry, g.StartPlanner, g.StartRouter}
	if !o.NoSettlement {
		starts = append(starts, g.StartSettlement)
	}
	for _, f := range starts {
		if err := f(); err != nil {
			g.Close()
			return nil, err
		}
	}
	for i := 1; i <= o.Executors; i++ {
		if err := g.StartExecutor(i); err != nil {
			g.Close()
			return nil, err
		}
	}
	return g, nil
}

func (g *Grid) connect(ctx context.Context, name string) (*bus.Conn, error) {
	return bus.Connect(ctx, g.opts.NATS, g.Server, "tessera-"+name)
}

// start runs one service with its own connection under name.
func (g *Grid) start(name string, run func(ctx context.Context, c *bus.Conn, log *slog.Logger) error) error {
	g.mu.Lock()
	if _, ok := g.services[name]; ok {
		g.mu.Unlock()
		return fmt.Errorf("%s already running", name)
	}
	g.mu.Unlock()
	c, err := g.connect(context.Background(), name)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1), conn: c}
	log := g.log.With("service", name)
	go func() {
		err := run(ctx, c, log)
		if err != nil && ctx.Err() == nil {
			log.Error("service stopped", "err", err)
		}
		c.Close()
		r.done <- err
	}()
	g.mu.Lock()
	g.services[name] = r
	g.mu.Unlock()
	return nil
}

// Stop stops the service called name and waits for it to finish.
func (g *Grid) Stop(name string) error {
	g.mu.Lock()
	r := g.services[name]
	delete(g.services, name)
	g.mu.Unlock()
	if r == nil {
		return fmt.Errorf("%s is not running", name)
	}
	r.cancel()
	err := <-r.done
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// Kill stops the service called name abruptly: its connection closes at
// once, as if the process died, and nothing is drained.
func (g *Grid) Kill(name string) error {
	g.mu.Lock()
	r := g.services[name]
	delete(g.services, name)
	g.mu.Unlock()
	if r == nil {
		return fmt.Errorf("%s is not running", name)
	}
	r.conn.NC.Close()
	r.cancel()
	// A dead process does not wind down: leave the goroutine to fail on its
	// closed connection without waiting for it.
	return nil
}

// StartRegistry starts the registry.
func (g *Grid) StartRegistry() error {
	return g.start("registry", func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return registry.Run(ctx, g.opts.Registry, registry.Deps{Bus: c, Log: log})
	})
}

// StartPlanner starts the planner.
func (g *Grid) StartPlanner() error {
	return g.start("planner", func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return planner.Run(ctx, g.opts.Planner, planner.Deps{Bus: c, Log: log})
	})
}

// StartRouter starts the router.
func (g *Grid) StartRouter() error {
	return g.start("router", func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return router.Run(ctx, g.opts.Router, router.Deps{Bus: c, Log: log, Listening: func(a string) {
			select {
			case g.httpAddr <- a:
			default:
			}
		}, ConsoleListening: func(a string) {
			select {
			case g.console <- a:
			default:
			}
		}})
	})
}

// StartSettlement starts settlement.
func (g *Grid) StartSettlement() error {
	return g.start("settlement", func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return settlement.Run(ctx, g.opts.Settlement, settlement.Deps{Bus: c, Log: log})
	})
}

// ExecutorName is the service name (and node id) of executor i.
func ExecutorName(i int) string { return fmt.Sprintf("exec-%d", i) }

// StartExecutor starts executor i (node id exec-i).
func (g *Grid) StartExecutor(i int) error {
	cfg := g.opts.Executor
	cfg.NodeID = ExecutorName(i)
	cfg.StateDir = filepath.Join(g.opts.DataDir, "executors", cfg.NodeID)
	return g.start(cfg.NodeID, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return executor.Run(ctx, cfg, executor.Deps{Bus: c, Log: log, Pool: g.pool})
	})
}

// HTTPAddr waits for the router's HTTP address.
func (g *Grid) HTTPAddr(ctx context.Context) (string, error) {
	return g.waitAddr(ctx, g.httpAddr, &g.addr)
}

// ConsoleAddr waits for the address of the router's console (the router
// must be configured with a ConsoleAddr).
func (g *Grid) ConsoleAddr(ctx context.Context) (string, error) {
	return g.waitAddr(ctx, g.console, &g.consoleAddr)
}

// waitAddr returns *known, or waits for an address on ch and keeps it there.
func (g *Grid) waitAddr(ctx context.Context, ch <-chan string, known *string) (string, error) {
	g.mu.Lock()
	a := *known
	g.mu.Unlock()
	if a != "" {
		return a, nil
	}
	select {
	case a := <-ch:
		g.mu.Lock()
		*known = a
		g.mu.Unlock()
		return a, nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// Import imports a llama2.c checkpoint and tokenizer as model id.
func (g *Grid) Import(ctx context.Context, id, checkpoint, tokenizer string, progress fragstore.Progress) (wire.ModelManifest, error) {
	st, err := fragstore.Open(ctx, g.Admin.JS)
	if err != nil {
		return wire.ModelManifest{}, err
	}
	return st.ImportCheckpoint(ctx, id, checkpoint, tokenizer, progress)
}

// Close stops every service, then NATS.
func (g *Grid) Close() {
	g.mu.Lock()
	var names []string
	for n := range g.services {
		names = append(names, n)
	}
	g.mu.Unlock()
	// Executors first (they publish usage on the way out), then the rest.
	for _, n := range names {
		if len(n) > 5 && n[:5] == "exec-" {
			_ = g.Stop(n)
		}
	}
	for _, n := range []string{"router", "planner", "registry", "settlement"} {
		_ = g.Stop(n)
	}
	if g.Admin != nil {
		g.Admin.Close()
	}
	if g.pool != nil {
		g.pool.Close()
	}
	if g.Server != nil {
		g.Server.Shutdown()
		g.Server.WaitForShutdown()
	}
}
