package device

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// nvmlLibrary is the part of nvml.Interface the backend uses; tests pass
// go-nvml's mock through it.
type nvmlLibrary interface {
	Init() nvml.Return
	Shutdown() nvml.Return
	DeviceGetCount() (int, nvml.Return)
	DeviceGetHandleByIndex(index int) (nvml.Device, nvml.Return)
}

// nvmlDevice is the part of nvml.Device the backend uses.
type nvmlDevice interface {
	GetName() (string, nvml.Return)
	GetUUID() (string, nvml.Return)
	GetCudaComputeCapability() (int, int, nvml.Return)
	GetMemoryInfo() (nvml.Memory, nvml.Return)
	GetUtilizationRates() (nvml.Utilization, nvml.Return)
	GetTemperature(sensor nvml.TemperatureSensors) (uint32, nvml.Return)
	GetPowerUsage() (uint32, nvml.Return)
}

var (
	_ nvmlLibrary = nvml.Interface(nil)
	_ nvmlDevice  = nvml.Device(nil)
	_ Backend     = (*nvmlBackend)(nil)
)

// nvmlBackend offers the selected GPUs that NVML found.
type nvmlBackend struct {
	lib    nvmlLibrary
	budget uint64
	log    *slog.Logger

	// mu keeps Close from shutting NVML down under a running snapshot.
	mu     sync.Mutex
	closed bool
	gpus   []gpu
	// lastErr is each GPU's Error in the previous snapshot, so that a GPU
	// failing or recovering is logged once, not on every heartbeat.
	lastErr []string
}

// gpu is one GPU as found when the backend opened. Its name, UUID and compute
// capability do not change, so they are read once; err records why they
// could not be, and marks the GPU as failed in every snapshot.
type gpu struct {
	index int
	dev   nvmlDevice
	name  string
	uuid  string
	cc    string
	err   error
}

// openNVML initialises NVML, finds its GPUs and keeps those opts selects.
func openNVML(ctx context.Context, lib nvmlLibrary, opts Options) (*nvmlBackend, error) {
	if err := nvmlError("init", lib.Init()); err != nil {
		return nil, err
	}
	gpus, err := findGPUs(ctx, lib)
	if err == nil {
		gpus, err = selectGPUs(gpus, opts.GPUs)
	}
	if err != nil {
		if serr := nvmlError("shutdown", lib.Shutdown()); serr != nil {
			err = errors.Join(err, serr)
		}
		return nil, err
	}
	return &nvmlBackend{
		lib:     lib,
		budget:  opts.MemoryBudget,
		log:     opts.logger(),
		gpus:    gpus,
		lastErr: make([]string, len(gpus)),
	}, nil
}

// findGPUs lists every GPU NVML sees, reading each one's fixed properties.
func findGPUs(ctx context.Context, lib nvmlLibrary) ([]gpu, error) {
	count, ret := lib.DeviceGetCount()
	if err := nvmlError("device count", ret); err != nil {
		return nil, err
	}
	if count == 0 {
		return nil, fmt.Errorf("nvml device count: %w", ErrNoGPU)
	}
	gpus := make([]gpu, count)
	for i := range gpus {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("find GPUs: %w", err)
		}
		gpus[i] = openGPU(lib, i)
	}
	return gpus, nil
}

// openGPU reads GPU index's handle, name, UUID and compute capability.
func openGPU(lib nvmlLibrary, index int) gpu {
	g := gpu{index: index}
	dev, ret := lib.DeviceGetHandleByIndex(index)
	if g.err = nvmlError("device handle", ret); g.err != nil {
		return g
	}
	g.dev = dev
	name, ret := dev.GetName()
	if g.err = nvmlError("name", ret); g.err != nil {
		return g
	}
	g.name = name
	uuid, ret := dev.GetUUID()
	if g.err = nvmlError("uuid", ret); g.err != nil {
		return g
	}
	g.uuid = uuid
	major, minor, ret := dev.GetCudaComputeCapability()
	if g.err = nvmlError("compute capability", ret); g.err != nil {
		return g
	}
	g.cc = fmt.Sprintf("%d.%d", major, minor)
	return g
}

// selectGPUs keeps the GPUs named by selectors (indices or UUIDs), in index
// order; no selectors keeps all.
func selectGPUs(gpus []gpu, selectors []string) ([]gpu, error) {
	if len(selectors) == 0 {
		return gpus, nil
	}
	keep := make([]bool, len(gpus))
	for _, sel := range selectors {
		sel = strings.TrimSpace(sel)
		i := slices.IndexFunc(gpus, func(g gpu) bool { return g.matches(sel) })
		if i < 0 {
			return nil, fmt.Errorf("select GPU %q: %w (have %s)", sel, ErrUnknownGPU, describeGPUs(gpus))
		}
		keep[i] = true
	}
	var kept []gpu
	for i, g := range gpus {
		if keep[i] {
			kept = append(kept, g)
		}
	}
	return kept, nil
}

// matches says whether sel is this GPU's index or UUID.
func (g gpu) matches(sel string) bool {
	if n, err := strconv.Atoi(sel); err == nil {
		return n == g.index
	}
	return g.uuid != "" && strings.EqualFold(sel, g.uuid)
}

// describeGPUs lists GPUs as "index=uuid" for error messages.
func describeGPUs(gpus []gpu) string {
	parts := make([]string, len(gpus))
	for i, g := range gpus {
		uuid := g.uuid
		if uuid == "" {
			uuid = "unreadable"
		}
		parts[i] = fmt.Sprintf("%d=%s", g.index, uuid)
	}
	return strings.Join(parts, ", ")
}

// Name reports "nvml".
func (b *nvmlBackend) Name() string { return "nvml" }

// Devices queries every selected GPU's memory and telemetry now.
func (b *nvmlBackend) Devices(ctx context.Context) ([]wire.Device, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("nvml devices: %w", ErrClosed)
	}
	devs := make([]wire.Device, len(b.gpus))
	for i, g := range b.gpus {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("nvml devices: %w", err)
		}
		devs[i] = g.snapshot()
		b.noteError(i, devs[i].Error)
	}
	applyBudget(devs, b.budget)
	return devs, nil
}

// noteError logs when the i-th selected GPU starts or stops failing; b.mu
// is held.
func (b *nvmlBackend) noteError(i int, msg string) {
	g := b.gpus[i]
	if b.lastErr[i] == msg {
		return
	}
	b.lastErr[i] = msg
	if msg != "" {
		b.log.Warn("GPU failing; it is reported but not offered", "index", g.index, "uuid", g.uuid, "error", msg)
	} else {
		b.log.Info("GPU answering again", "index", g.index, "uuid", g.uuid)
	}
}

// Close shuts NVML down; later calls do nothing.
func (b *nvmlBackend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	return nvmlError("shutdown", b.lib.Shutdown())
}

// snapshot reports the GPU now, with Error set when a query failed.
func (g gpu) snapshot() wire.Device {
	d := wire.Device{
		Index:             g.index,
		Kind:              KindGPU,
		Name:              g.name,
		UUID:              g.uuid,
		ComputeCapability: g.cc,
	}
	if err := g.query(&d); err != nil {
		d.Error = err.Error()
	}
	return d
}

// query fills d's memory and telemetry. Memory must be readable; telemetry
// the GPU does not support stays zero.
func (g gpu) query(d *wire.Device) error {
	if g.err != nil {
		return g.err
	}
	mem, ret := g.dev.GetMemoryInfo()
	if err := nvmlError("memory info", ret); err != nil {
		return err
	}
	d.MemoryTotal, d.MemoryFree = mem.Total, mem.Free

	util, ret := g.dev.GetUtilizationRates()
	if ok, err := telemetry("utilization", ret); err != nil {
		return err
	} else if ok {
		d.Utilization = float64(util.Gpu)
	}
	temp, ret := g.dev.GetTemperature(nvml.TEMPERATURE_GPU)
	if ok, err := telemetry("temperature", ret); err != nil {
		return err
	} else if ok {
		d.TemperatureC = float64(temp)
	}
	milliwatts, ret := g.dev.GetPowerUsage()
	if ok, err := telemetry("power usage", ret); err != nil {
		return err
	} else if ok {
		d.PowerW = float64(milliwatts) / 1000
	}
	return nil
}

// telemetry says whether an optional query succeeded; ErrNotSupported is no
// error, just no value.
func telemetry(op string, ret nvml.Return) (bool, error) {
	err := nvmlError(op, ret)
	if errors.Is(err, ErrNotSupported) {
		return false, nil
	}
	return err == nil, err
}
