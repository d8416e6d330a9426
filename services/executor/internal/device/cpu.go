package device

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/tessera-grid/tessera/pkg/wire"
)

var _ Backend = (*cpuBackend)(nil)

// cpuBackend offers the machine's CPU as count equal devices, each with an
// equal share of its RAM.
type cpuBackend struct {
	node   string
	count  int
	budget uint64
	// proc is the procfs root, "/proc" except in tests.
	proc string
	name string

	mu     sync.Mutex
	closed bool
	// prev is the previous /proc/stat sample; utilization is the busy share
	// of the time since it (since boot on the first snapshot).
	prev cpuTimes
	util float64
}

// cpuTimes is the aggregate CPU time from /proc/stat, in clock ticks.
type cpuTimes struct {
	busy, total uint64
}

// newCPU builds the CPU backend over the real /proc.
func newCPU(opts Options) (*cpuBackend, error) {
	return newCPUAt(opts, "/proc")
}

// newCPUAt builds the CPU backend over the procfs at proc, and reads it once
// so that an unusable /proc fails at start rather than on the first snapshot.
func newCPUAt(opts Options, proc string) (*cpuBackend, error) {
	if opts.Node == "" {
		return nil, fmt.Errorf("cpu devices: node id is empty; it names the devices")
	}
	count := opts.CPUDevices
	if count == 0 {
		count = 1
	}
	b := &cpuBackend{node: opts.Node, count: count, budget: opts.MemoryBudget, proc: proc}
	name, err := readCPUModel(filepath.Join(proc, "cpuinfo"))
	if err != nil {
		return nil, fmt.Errorf("cpu devices: %w", err)
	}
	b.name = name
	if _, err := b.Devices(context.Background()); err != nil {
		return nil, err
	}
	return b, nil
}

// Name reports "cpu".
func (b *cpuBackend) Name() string { return "cpu" }

// Devices reports the CPU devices with the machine's current memory and
// utilization (shared by all of them: they share the cores).
func (b *cpuBackend) Devices(ctx context.Context) ([]wire.Device, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("cpu devices: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("cpu devices: %w", ErrClosed)
	}
	memTotal, memAvail, err := readMeminfo(filepath.Join(b.proc, "meminfo"))
	if err != nil {
		return nil, fmt.Errorf("cpu devices: %w", err)
	}
	now, err := readCPUTimes(filepath.Join(b.proc, "stat"))
	if err != nil {
		return nil, fmt.Errorf("cpu devices: %w", err)
	}
	// Counters that did not move keep the last figure instead of dividing
	// by zero.
	if now.total > b.prev.total && now.busy >= b.prev.busy {
		b.util = 100 * float64(now.busy-b.prev.busy) / float64(now.total-b.prev.total)
	}
	b.prev = now

	n := uint64(b.count)
	devs := make([]wire.Device, b.count)
	for i := range devs {
		devs[i] = wire.Device{
			Index:       i,
			Kind:        KindCPU,
			Name:        b.name,
			UUID:        fmt.Sprintf("cpu-%s-%d", b.node, i),
			MemoryTotal: memTotal / n,
			MemoryFree:  memAvail / n,
			Utilization: b.util,
		}
	}
	applyBudget(devs, b.budget)
	return devs, nil
}

// Close marks the backend closed.
func (b *cpuBackend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	return nil
}

// readCPUModel returns the processor's model name from /proc/cpuinfo, or a
// name built from the architecture where the file has none (some ARM
// kernels).
func readCPUModel(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read cpu model: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(key) {
		case "model name", "Model", "cpu model":
			if v := strings.TrimSpace(value); v != "" {
				return v, nil
			}
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read cpu model from %s: %w", path, err)
	}
	return runtime.GOARCH + " CPU", nil
}

// readMeminfo returns MemTotal and MemAvailable from /proc/meminfo in bytes;
// kernels without MemAvailable (before 3.14) report MemFree instead.
func readMeminfo(path string) (total, avail uint64, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, fmt.Errorf("read meminfo: %w", err)
	}
	fields := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		parts := strings.Fields(rest)
		if len(parts) == 0 {
			continue
		}
		v, perr := strconv.ParseUint(parts[0], 10, 64)
		if perr != nil {
			return 0, 0, fmt.Errorf("%w: %s: %s: %w", ErrBadProcFile, path, key, perr)
		}
		if len(parts) > 1 && parts[1] == "kB" {
			v *= 1024
		}
		fields[key] = v
	}
	if err := sc.Err(); err != nil {
		return 0, 0, fmt.Errorf("read meminfo: %w", err)
	}
	total, ok := fields["MemTotal"]
	if !ok || total == 0 {
		return 0, 0, fmt.Errorf("%w: %s has no MemTotal", ErrBadProcFile, path)
	}
	avail, ok = fields["MemAvailable"]
	if !ok {
		avail = fields["MemFree"]
	}
	return total, min(avail, total), nil
}

// readCPUTimes sums the aggregate "cpu" line of /proc/stat: idle and iowait
// are idle time, user, nice, system, irq, softirq and steal are busy (guest
// time is already inside user and nice).
func readCPUTimes(path string) (cpuTimes, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return cpuTimes{}, fmt.Errorf("read cpu times: %w", err)
	}
	line, _, _ := bytes.Cut(data, []byte("\n"))
	fields := strings.Fields(string(line))
	if len(fields) < 5 || fields[0] != "cpu" {
		return cpuTimes{}, fmt.Errorf("%w: %s does not start with an aggregate cpu line", ErrBadProcFile, path)
	}
	var t cpuTimes
	for i, f := range fields[1:min(len(fields), 9)] {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return cpuTimes{}, fmt.Errorf("%w: %s: cpu field %d: %w", ErrBadProcFile, path, i+1, err)
		}
		t.total += v
		if i != 3 && i != 4 { // idle, iowait
			t.busy += v
		}
	}
	return t, nil
}
