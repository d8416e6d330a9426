// Package executor is the service suppliers run next to their GPUs: it
// announces the node and its devices, loads the fragments the plan assigns
// to it, serves stage requests, and publishes signed usage events.
package executor

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/device"
	"github.com/tessera-grid/tessera/services/executor/internal/identity"
	"github.com/tessera-grid/tessera/services/executor/internal/node"
	"github.com/tessera-grid/tessera/services/executor/internal/speed"
	"github.com/tessera-grid/tessera/services/executor/internal/spool"
)

// EnvPrefix is the prefix of the executor's environment variables.
const EnvPrefix = "TESSERA_EXECUTOR_"

// Config is the executor's configuration, read from TESSERA_EXECUTOR_*.
type Config struct {
	// NodeID names this node in the grid (letters, digits, '-', '_').
	// Default: "node-" and the start of its public key.
	NodeID string `env:"NODE_ID"`
	// Supplier is the supplier that is paid for this node's work.
	Supplier string `env:"SUPPLIER, default=local"`
	// Region is where the node runs (used for placement and routing).
	Region string `env:"REGION, default=local"`
	// StateDir keeps the node's identity seed, its measured speeds and its
	// usage spool (usage.spool: signed usage events not yet acknowledged
	// by the stream, published again at start).
	StateDir string `env:"STATE_DIR, default=var/executor"`
	// IdentitySeed is the path of the node's nkey seed (or a .creds file);
	// created on first start. Default: STATE_DIR/node.seed.
	IdentitySeed string `env:"IDENTITY_SEED"`
	// HeartbeatInterval is how often the node reports itself.
	HeartbeatInterval time.Duration `env:"HEARTBEAT_INTERVAL, default=2s"`
	// MemoryBudget caps weights and caches, e.g. "8GiB" (empty: device memory).
	MemoryBudget string `env:"MEMORY_BUDGET"`
	// CPUDevices is the number of CPU devices offered where no GPU is found.
	CPUDevices int `env:"CPU_DEVICES, default=1"`
	// GPUs lists the GPUs to offer by index or UUID, comma-separated (empty: all).
	GPUs string `env:"GPUS"`
	// Threads is the compute parallelism (0: all cores).
	Threads int `env:"THREADS, default=0"`
	// MaxBatch caps the requests batched into one forward pass.
	MaxBatch int `env:"MAX_BATCH, default=32"`
	// SessionIdle frees a request's caches after this long without traffic.
	SessionIdle time.Duration `env:"SESSION_IDLE, default=2m"`
	// DrainTimeout bounds the graceful drain on SIGTERM: the node announces
	// it is draining, finishes the requests it takes part in, then stops.
	DrainTimeout time.Duration `env:"DRAIN_TIMEOUT, default=2m"`
	// DrainIdle is how long a request may go without traffic before a
	// draining node counts it as finished (its requester went away).
	DrainIdle time.Duration `env:"DRAIN_IDLE, default=10s"`
	// SpeedTest is how long the speed test of one model may run (decode and
	// prefill through one layer); a negative value skips the test and
	// claims no speed.
	SpeedTest time.Duration `env:"SPEED_TEST, default=1s"`
}

// withDefaults fills the fields a zero Config leaves unset.
func (c Config) withDefaults() Config {
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = 2 * time.Second
	}
	if c.StateDir == "" {
		c.StateDir = "var/executor"
	}
	if c.Supplier == "" {
		c.Supplier = "local"
	}
	if c.Region == "" {
		c.Region = "local"
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = 2 * time.Minute
	}
	if c.DrainIdle <= 0 {
		c.DrainIdle = 10 * time.Second
	}
	if c.SpeedTest == 0 {
		c.SpeedTest = time.Second
	}
	return c
}

// Deps are what Run needs from its host process.
type Deps struct {
	Bus *bus.Conn
	Log *slog.Logger
	// Pool, when set, runs the node's compute: executors hosted in one
	// process (the all-in-one grid) share the machine's cores through one
	// pool instead of each spinning up its own.
	Pool *compute.Pool
	// TamperChallenge, when set, alters the node's answers to the
	// registry's challenges: tests use it to play a node that computes
	// wrongly. Production leaves it nil.
	TamperChallenge func(out []float32)
}

// Run serves as one executor node until ctx ends, then drains: it
// announces that it is draining, finishes the requests it takes part in
// (bounded by DrainTimeout), publishes their usage, and sends a last
// heartbeat with state stopped so that the registry marks it left at once.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	cfg = cfg.withDefaults()
	log := deps.Log
	if log == nil {
		log = slog.Default()
	}
	for name, v := range map[string]string{"SUPPLIER": cfg.Supplier, "REGION": cfg.Region} {
		if err := subjects.Token(v); err != nil {
			return fmt.Errorf("%s%s: %w", EnvPrefix, name, err)
		}
	}
	if cfg.HeartbeatInterval <= 0 {
		return fmt.Errorf("%sHEARTBEAT_INTERVAL must be positive, got %v", EnvPrefix, cfg.HeartbeatInterval)
	}
	seed := cfg.IdentitySeed
	if seed == "" {
		seed = filepath.Join(cfg.StateDir, "node.seed")
	}
	id, err := identity.LoadOrCreate(seed)
	if err != nil {
		return err
	}
	pub := id.PublicKey()
	if cfg.NodeID == "" {
		cfg.NodeID = "node-" + strings.ToLower(pub[1:9])
	}
	budget, err := ParseBytes(cfg.MemoryBudget)
	if err != nil {
		return fmt.Errorf("%sMEMORY_BUDGET: %w", EnvPrefix, err)
	}
	backend, err := device.Discover(ctx, device.Options{
		Node: cfg.NodeID, GPUs: splitList(cfg.GPUs), MemoryBudget: budget, CPUDevices: cfg.CPUDevices, Logger: log,
	})
	if err != nil {
		return err
	}
	defer backend.Close()
	devices, err := backend.Devices(ctx)
	if err != nil {
		return err
	}
	if budget == 0 {
		budget, _ = device.OfferedMemory(devices)
	}
	signer, err := usagesig.NewSigner(id)
	if err != nil {
		return err
	}
	speeds, err := speed.OpenCache(filepath.Join(cfg.StateDir, "speed.json"))
	if err != nil {
		return err
	}
	usage, err := spool.Open(filepath.Join(cfg.StateDir, "usage.spool"))
	if err != nil {
		return err
	}
	defer usage.Close()
	if pending := usage.Len(); pending > 0 {
		log.Info("usage spool holds events not yet acknowledged; publishing them", "events", pending)
	}
	n, err := node.New(node.Options{
		ID: cfg.NodeID, Supplier: cfg.Supplier, Region: cfg.Region, DeviceType: deviceType(devices),
		Threads: cfg.Threads, MaxBatch: cfg.MaxBatch, SessionIdle: cfg.SessionIdle, MemoryBudget: budget,
		Signer:          signer,
		Spool:           usage,
		TamperChallenge: deps.TamperChallenge,
	}, deps.Bus, log)
	if err != nil {
		return err
	}
	hb := &heartbeater{cfg: cfg, bus: deps.Bus, node: n, id: id, backend: backend, budget: budget, log: log,
		speeds: speeds, measured: make(chan struct{}), devices: devices}
	if unregister, err := registerDeviceGauges(cfg.NodeID, hb.lastDevices); err != nil {
		log.Warn("device gauges not registered", "err", err)
	} else {
		defer unregister()
	}
	// The node serves on a context of its own, so that it keeps serving
	// while it drains after ctx ends.
	nodeCtx, stopNode := context.WithCancel(context.WithoutCancel(ctx))
	defer stopNode()
	nodeDone := make(chan error, 1)
	go func() { nodeDone <- n.Run(nodeCtx) }()
	var wg sync.WaitGroup
	hbCtx, stopHB := context.WithCancel(context.WithoutCancel(ctx))
	defer stopHB()
	wg.Go(func() { hb.run(hbCtx) })
	wg.Go(func() { hb.measure(hbCtx, devices) })
	log.Info("executor started", "node", cfg.NodeID, "devices", len(devices), "budget_bytes", budget)

	select {
	case <-ctx.Done():
		err = nil
	case err = <-nodeDone:
		nodeDone <- err
	}
	n.SetDraining()
	hb.send("")
	log.Info("draining", "node", cfg.NodeID, "timeout", cfg.DrainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	// A node whose connection is gone cannot finish anything: stop at once.
	go func() {
		for dctx.Err() == nil && !deps.Bus.NC.IsClosed() {
			time.Sleep(20 * time.Millisecond)
		}
		cancel()
	}()
	if derr := n.WaitIdle(dctx, cfg.DrainIdle); derr != nil {
		log.Warn("drain cut short; stopping", "err", derr)
	}
	cancel()
	stopNode()
	if nerr := <-nodeDone; err == nil {
		err = nerr
	}
	stopHB()
	wg.Wait()
	// The last heartbeat tells the registry the node is gone at once.
	hb.send(wire.NodeStopped)
	_ = deps.Bus.NC.Flush()
	log.Info("executor stopped", "node", cfg.NodeID)
	return err
}

// heartbeater publishes the node's heartbeat every interval.
type heartbeater struct {
	cfg     Config
	bus     *bus.Conn
	node    *node.Node
	id      *identity.Identity
	backend device.Backend
	budget  uint64
	log     *slog.Logger
	speeds  *speed.Cache
	// measured is closed once the models known at start are measured: the
	// node reports "starting" until then.
	measured chan struct{}

	mu     sync.Mutex
	seq    uint64
	models []wire.ModelManifest
	// devices is the last device snapshot, for the device gauges.
	devices []wire.Device
}

// lastDevices returns the last device snapshot a heartbeat took.
func (h *heartbeater) lastDevices() []wire.Device {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.devices
}

func (h *heartbeater) run(ctx context.Context) {
	t := time.NewTicker(h.cfg.HeartbeatInterval)
	defer t.Stop()
	h.send("")
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			h.send("")
		}
	}
}

// measure runs the speed test of every model in the grid at start, and of
// every model imported later, so that heartbeats claim a speed for each
// model the node may serve.
func (h *heartbeater) measure(ctx context.Context, devices []wire.Device) {
	defer func() {
		select {
		case <-h.measured:
		default:
			close(h.measured)
		}
	}()
	if h.cfg.SpeedTest <= 0 {
		return
	}
	kv, err := h.bus.JS.KeyValue(ctx, subjects.BucketModels)
	if err != nil {
		h.log.Warn("no speed test: models bucket", "err", err)
		return
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		h.log.Warn("no speed test: models watch", "err", err)
		return
	}
	defer func() { _ = w.Stop() }()
	pool := compute.NewPool(h.cfg.Threads)
	defer pool.Close()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil {
				// Every model known at start is measured.
				close(h.measured)
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var man wire.ModelManifest
			if err := json.Unmarshal(e.Value(), &man); err != nil {
				continue
			}
			if err := h.speeds.Ensure(man, devices, pool, h.cfg.SpeedTest); err != nil {
				h.log.Warn("speed not measured", "model", man.ID, "err", err)
				continue
			}
			h.mu.Lock()
			h.models = append(slices.DeleteFunc(h.models, func(m wire.ModelManifest) bool { return m.ID == man.ID }), man)
			h.mu.Unlock()
			h.log.Info("speed measured", "model", man.ID, "samples", h.speeds.Samples(devices, []wire.ModelManifest{man}))
		}
	}
}

// send publishes one heartbeat; state "" reports the node's own state.
func (h *heartbeater) send(state string) {
	st := h.node.Status()
	devices, err := h.backend.Devices(context.Background())
	if err != nil {
		h.log.Warn("device snapshot failed", "err", err)
	}
	if state == "" {
		state = wire.NodeReady
		select {
		case <-h.measured:
		default:
			state = wire.NodeStarting
		}
		if slices.ContainsFunc(devices, func(d wire.Device) bool { return d.Error != "" }) {
			state = wire.NodeDegraded
		}
		if st.Draining {
			state = wire.NodeDraining
		}
	}
	free := uint64(0)
	if used := st.WeightBytes + st.CacheBytes; used < h.budget {
		free = h.budget - used
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		h.devices = devices
	}
	h.seq++
	hb := wire.Heartbeat{
		Node: h.cfg.NodeID, Supplier: h.cfg.Supplier, Region: h.cfg.Region,
		Seq: h.seq, Time: time.Now().UTC(), IntervalMS: h.cfg.HeartbeatInterval.Milliseconds(),
		State: state, Devices: devices, MemoryBudget: h.budget, MemoryFree: free,
		Models: st.Models, Fragments: st.Fragments, Fetch: st.Fetch,
		KVTokensFree: st.KVTokensFree, QueueDepth: st.QueueDepth, Sessions: st.Sessions,
		Speed: h.speeds.Samples(devices, h.models),
	}
	if err := h.id.SignHeartbeat(&hb); err != nil {
		h.log.Error("heartbeat not signed", "err", err)
		return
	}
	b, err := json.Marshal(hb)
	if err != nil {
		h.log.Error("heartbeat", "err", err)
		return
	}
	// Published under h.mu, so that heartbeats leave in sequence order.
	if err := h.bus.NC.Publish(subjects.Heartbeat(h.cfg.NodeID), b); err != nil {
		h.log.Warn("heartbeat not sent", "err", err)
	}
}

// splitList splits a comma-separated list, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// deviceType names the device class that computes, for usage and pricing:
// the first working GPU's product name, or "cpu".
func deviceType(devs []wire.Device) string {
	for _, d := range devs {
		if d.Kind == device.KindGPU && d.Error == "" {
			return d.Name
		}
	}
	return "cpu"
}

// ParseBytes parses sizes like "512MiB", "8GiB", "1.5GB" or a plain number
// of bytes; empty is 0.
func ParseBytes(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	units := []struct {
		suffix string
		mult   float64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1}}
	mult := 1.0
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			mult = u.mult
			s = strings.TrimSpace(strings.TrimSuffix(s, u.suffix))
			break
		}
	}
	v, err := strconv.ParseFloat(s, 64)
	// !(v >= 0) also refuses NaN; sizes must fit in 64 bits.
	if err != nil || !(v >= 0) || v*mult >= math.MaxUint64 {
		return 0, fmt.Errorf("bad size %q (want e.g. 8GiB)", s)
	}
	return uint64(v * mult), nil
}
