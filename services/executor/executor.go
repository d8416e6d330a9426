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
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/usagesig"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor/internal/device"
	"github.com/tessera-grid/tessera/services/executor/internal/identity"
	"github.com/tessera-grid/tessera/services/executor/internal/node"
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
	// StateDir keeps the node's identity seed.
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
}

// Deps are what Run needs from its host process.
type Deps struct {
	Bus *bus.Conn
	Log *slog.Logger
}

// Run serves as one executor node until ctx ends.
func Run(ctx context.Context, cfg Config, deps Deps) error {
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
	n, err := node.New(node.Options{
		ID: cfg.NodeID, Supplier: cfg.Supplier, Region: cfg.Region, DeviceType: deviceType(devices),
		Threads: cfg.Threads, MaxBatch: cfg.MaxBatch, SessionIdle: cfg.SessionIdle, MemoryBudget: budget,
		Signer: signer,
	}, deps.Bus, log)
	if err != nil {
		return err
	}
	hb := &heartbeater{cfg: cfg, bus: deps.Bus, node: n, id: id, backend: backend, budget: budget, log: log}
	var wg sync.WaitGroup
	wg.Add(1)
	hbCtx, stopHB := context.WithCancel(context.Background())
	go func() { defer wg.Done(); hb.run(hbCtx) }()
	log.Info("executor started", "node", cfg.NodeID, "devices", len(devices), "budget_bytes", budget)
	err = n.Run(ctx)
	// A last heartbeat tells the registry the node is gone at once.
	stopHB()
	wg.Wait()
	hb.send(wire.NodeDraining)
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
	seq     uint64
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

func (h *heartbeater) send(state string) {
	st := h.node.Status()
	h.seq++
	if state == "" {
		state = wire.NodeReady
		if st.Draining {
			state = wire.NodeDraining
		}
	}
	free := uint64(0)
	if used := st.WeightBytes + st.CacheBytes; used < h.budget {
		free = h.budget - used
	}
	devices, err := h.backend.Devices(context.Background())
	if err != nil {
		h.log.Warn("device snapshot failed", "err", err)
	}
	hb := wire.Heartbeat{
		Node: h.cfg.NodeID, Supplier: h.cfg.Supplier, Region: h.cfg.Region,
		Seq: h.seq, Time: time.Now().UTC(), IntervalMS: h.cfg.HeartbeatInterval.Milliseconds(),
		State: state, Devices: devices, MemoryBudget: h.budget, MemoryFree: free,
		Models: st.Models, Fragments: st.Fragments, Fetch: st.Fetch,
		KVTokensFree: st.KVTokensFree, QueueDepth: st.QueueDepth,
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
