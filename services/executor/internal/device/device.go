// Package device is the executor's view of the compute devices it offers to
// the grid. One interface, Backend, has one implementation per file: NVML
// GPUs (nvml.go) and CPU devices (cpu.go). Discover picks the backend: GPUs
// when NVML finds any, CPU devices when the machine has no NVIDIA library,
// driver or GPU.
package device

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Device kinds, as reported in wire.Device.Kind.
const (
	KindGPU = "gpu"
	KindCPU = "cpu"
)

// Backend is one source of compute devices.
type Backend interface {
	// Name says which backend this is: "nvml" or "cpu".
	Name() string
	// Devices returns a snapshot of every selected device with live
	// telemetry. A device that cannot be queried is still listed, with its
	// Error set and no memory offered; only a failure of the whole backend
	// (closed, context done) returns an error.
	Devices(ctx context.Context) ([]wire.Device, error)
	// Close releases the backend; Devices fails afterwards.
	Close() error
}

// Options say which devices to offer and how much of their memory.
type Options struct {
	// Node is the node id; CPU devices are named "cpu-<node>-<index>".
	Node string
	// GPUs selects the GPUs to offer by NVML index ("0") or UUID
	// ("GPU-..."); empty offers all of them.
	GPUs []string
	// MemoryBudget caps the memory offered by all healthy devices together,
	// in bytes; when it is below their sum each device offers a share in
	// proportion to its own memory. 0 means no cap.
	MemoryBudget uint64
	// CPUDevices is how many CPU devices to offer where there is no GPU;
	// 0 means 1. Each gets an equal share of the machine's RAM.
	CPUDevices int
	// Logger receives discovery decisions; nil means slog.Default().
	Logger *slog.Logger
}

func (o Options) logger() *slog.Logger {
	if o.Logger == nil {
		return slog.Default()
	}
	return o.Logger
}

// Discover opens the NVML backend, or a CPU backend when the machine has no
// NVIDIA library, no running driver or no GPU. Any other NVML failure is an
// error, and so is a missing NVML when Options.GPUs names GPUs explicitly.
func Discover(ctx context.Context, opts Options) (Backend, error) {
	return discover(ctx, opts, nvml.New())
}

// discover is Discover over any NVML library, so tests can pass a mock.
func discover(ctx context.Context, opts Options, lib nvmlLibrary) (Backend, error) {
	if opts.CPUDevices < 0 {
		return nil, fmt.Errorf("discover devices: CPU device count %d is negative", opts.CPUDevices)
	}
	log := opts.logger()
	gpus, err := openNVML(ctx, lib, opts)
	if err == nil {
		log.Info("offering GPUs", "backend", gpus.Name(), "gpus", len(gpus.gpus))
		return gpus, nil
	}
	if !errors.Is(err, ErrLibraryNotFound) && !errors.Is(err, ErrDriverNotLoaded) && !errors.Is(err, ErrNoGPU) {
		return nil, fmt.Errorf("discover devices: %w", err)
	}
	if len(opts.GPUs) > 0 {
		return nil, fmt.Errorf("discover devices: %w: GPUs %q: %w", ErrGPUUnavailable, opts.GPUs, err)
	}
	cpus, cerr := newCPU(opts)
	if cerr != nil {
		return nil, fmt.Errorf("discover devices: %w", cerr)
	}
	log.Info("no GPU available, offering CPU devices", "reason", err.Error(), "cpu_devices", cpus.count)
	return cpus, nil
}

// applyBudget caps the memory of the healthy devices in devs so that together
// they offer at most budget bytes, giving each a share in proportion to its
// own memory; devices with an Error offer nothing.
func applyBudget(devs []wire.Device, budget uint64) {
	var sum uint64
	for i := range devs {
		if devs[i].Error != "" {
			devs[i].MemoryTotal, devs[i].MemoryFree = 0, 0
			continue
		}
		sum += devs[i].MemoryTotal
	}
	if budget == 0 || sum <= budget {
		return
	}
	for i := range devs {
		d := &devs[i]
		if d.Error != "" {
			continue
		}
		// budget*total/sum in 128 bits: the product overflows 64 bits for
		// terabyte budgets; budget < sum keeps the quotient below total.
		hi, lo := bits.Mul64(budget, d.MemoryTotal)
		share, _ := bits.Div64(hi, lo, sum)
		d.MemoryTotal = share
		d.MemoryFree = min(d.MemoryFree, share)
	}
}

// OfferedMemory sums the memory that the healthy devices in devs offer, for
// a heartbeat's memory figures.
func OfferedMemory(devs []wire.Device) (total, free uint64) {
	for _, d := range devs {
		if d.Error != "" {
			continue
		}
		total += d.MemoryTotal
		free += d.MemoryFree
	}
	return total, free
}
