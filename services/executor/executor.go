// Package executor is the service suppliers run next to their GPUs: it
// announces the node and its devices, loads the fragments the plan assigns
// to it, serves stage requests, and publishes signed usage events.
package executor

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
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
	key, err := loadIdentity(cfg.StateDir)
	if err != nil {
		return err
	}
	pub, err := key.PublicKey()
	if err != nil {
		return err
	}
	if cfg.NodeID == "" {
		cfg.NodeID = "node-" + strings.ToLower(pub[1:9])
	}
	budget, err := ParseBytes(cfg.MemoryBudget)
	if err != nil {
		return fmt.Errorf("%sMEMORY_BUDGET: %w", EnvPrefix, err)
	}
	devices := cpuDevices(cfg.NodeID, max(cfg.CPUDevices, 1), budget)
	if budget == 0 {
		for _, d := range devices {
			budget += d.MemoryTotal
		}
	}
	n, err := node.New(node.Options{
		ID: cfg.NodeID, Supplier: cfg.Supplier, Region: cfg.Region, DeviceType: devices[0].Kind,
		Threads: cfg.Threads, MaxBatch: cfg.MaxBatch, SessionIdle: cfg.SessionIdle, MemoryBudget: budget,
	}, deps.Bus, log)
	if err != nil {
		return err
	}
	hb := &heartbeater{cfg: cfg, bus: deps.Bus, node: n, pub: pub, devices: devices, budget: budget, log: log}
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
	pub     string
	devices []wire.Device
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
	hb := wire.Heartbeat{
		Node: h.cfg.NodeID, Supplier: h.cfg.Supplier, Region: h.cfg.Region, PublicKey: h.pub,
		Seq: h.seq, Time: time.Now().UTC(), IntervalMS: h.cfg.HeartbeatInterval.Milliseconds(),
		State: state, Devices: h.devices, MemoryBudget: h.budget, MemoryFree: free,
		Models: st.Models, Fragments: st.Fragments, Fetch: st.Fetch,
		KVTokensFree: st.KVTokensFree, QueueDepth: st.QueueDepth,
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

// loadIdentity loads the node's nkey seed from dir, creating it on first start.
func loadIdentity(dir string) (nkeys.KeyPair, error) {
	path := dir + "/node.nk"
	if b, err := os.ReadFile(path); err == nil {
		return nkeys.FromSeed([]byte(strings.TrimSpace(string(b))))
	}
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if err := os.WriteFile(path, seed, 0o600); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	return kp, nil
}

// cpuDevices describes n CPU devices sharing the machine's memory.
func cpuDevices(nodeID string, n int, budget uint64) []wire.Device {
	total := memTotal()
	per := total / uint64(n)
	if budget > 0 && budget/uint64(n) < per {
		per = budget / uint64(n)
	}
	out := make([]wire.Device, n)
	for i := range out {
		out[i] = wire.Device{Index: i, Kind: "cpu", Name: "cpu", UUID: fmt.Sprintf("cpu-%s-%d", nodeID, i), MemoryTotal: per, MemoryFree: per}
	}
	return out
}

func memTotal() uint64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 8 << 30
	}
	for _, line := range strings.Split(string(b), "\n") {
		var kb uint64
		if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
			return kb << 10
		}
	}
	return 8 << 30
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
	if err != nil || v < 0 {
		return 0, fmt.Errorf("bad size %q (want e.g. 8GiB)", s)
	}
	return uint64(v * mult), nil
}
