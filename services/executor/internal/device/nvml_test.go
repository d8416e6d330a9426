package device

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"

	"github.com/tessera-grid/tessera/pkg/wire"
)

const gib = uint64(1) << 30

// faults are failure switches for the mock DGX A100: init and count replace
// what nvmlInit and nvmlDeviceGetCount return, the maps give the return code
// of one query on the GPU with that index.
type faults struct {
	init     nvml.Return
	count    *int
	countRet nvml.Return
	handle   map[int]nvml.Return
	uuid     map[int]nvml.Return
	memory   map[int]nvml.Return
	util     map[int]nvml.Return
	temp     map[int]nvml.Return
	power    map[int]nvml.Return
}

// mockDGX is go-nvml's DGX A100 mock with the queries it leaves unset filled
// in: GPU i has 40 GiB, (39-i) GiB free, utilization 10*i %, 30+i °C and
// 100+i W. shutdowns counts Shutdown calls.
type mockDGX struct {
	*dgxa100.Server
	shutdowns int
}

func newMockDGX(t *testing.T, f faults) *mockDGX {
	t.Helper()
	m := &mockDGX{Server: dgxa100.New()}
	m.InitFunc = func() nvml.Return { return f.init }
	m.ShutdownFunc = func() nvml.Return {
		m.shutdowns++
		return nvml.SUCCESS
	}
	if f.count != nil || f.countRet != nvml.SUCCESS {
		n := len(m.Devices)
		if f.count != nil {
			n = *f.count
		}
		m.DeviceGetCountFunc = func() (int, nvml.Return) { return n, f.countRet }
	}
	byIndex := m.DeviceGetHandleByIndexFunc
	m.DeviceGetHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
		if ret, ok := f.handle[i]; ok {
			return nil, ret
		}
		return byIndex(i)
	}
	for i, d := range m.Devices {
		dev := d.(*dgxa100.Device)
		dev.MemoryInfo = nvml.Memory{Total: 40 * gib, Free: uint64(39-i) * gib, Used: uint64(1+i) * gib}
		memory := dev.GetMemoryInfoFunc
		dev.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
			if ret, ok := f.memory[i]; ok {
				return nvml.Memory{}, ret
			}
			return memory()
		}
		uuid := dev.GetUUIDFunc
		dev.GetUUIDFunc = func() (string, nvml.Return) {
			if ret, ok := f.uuid[i]; ok {
				return "", ret
			}
			return uuid()
		}
		dev.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
			return nvml.Utilization{Gpu: uint32(10 * i), Memory: 5}, orSuccess(f.util, i)
		}
		dev.GetTemperatureFunc = func(sensor nvml.TemperatureSensors) (uint32, nvml.Return) {
			if sensor != nvml.TEMPERATURE_GPU {
				return 0, nvml.ERROR_INVALID_ARGUMENT
			}
			return uint32(30 + i), orSuccess(f.temp, i)
		}
		dev.GetPowerUsageFunc = func() (uint32, nvml.Return) {
			return uint32(100_000 + 1000*i), orSuccess(f.power, i)
		}
	}
	return m
}

// orSuccess is the switched return code for GPU i, SUCCESS when unset.
func orSuccess(rets map[int]nvml.Return, i int) nvml.Return {
	if ret, ok := rets[i]; ok {
		return ret
	}
	return nvml.SUCCESS
}

// uuidOf is the mock's UUID of GPU i.
func (m *mockDGX) uuidOf(i int) string { return m.Devices[i].(*dgxa100.Device).UUID }

// quietOptions are options whose logger discards.
func quietOptions() Options {
	return Options{Node: "n1", Logger: slog.New(slog.DiscardHandler)}
}

// snapshot discovers through m and returns one snapshot.
func snapshot(t *testing.T, m *mockDGX, opts Options) (Backend, []wire.Device) {
	t.Helper()
	b, err := discover(t.Context(), opts, m)
	if err != nil {
		t.Fatalf("discover: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	devs, err := b.Devices(t.Context())
	if err != nil {
		t.Fatalf("devices: %v", err)
	}
	return b, devs
}

func TestNVMLFindsEightGPUs(t *testing.T) {
	m := newMockDGX(t, faults{})
	b, devs := snapshot(t, m, quietOptions())
	if b.Name() != "nvml" {
		t.Fatalf("backend = %q, want nvml", b.Name())
	}
	if len(devs) != 8 {
		t.Fatalf("got %d devices, want 8", len(devs))
	}
	for i, d := range devs {
		want := wire.Device{
			Index:             i,
			Kind:              KindGPU,
			Name:              "Mock NVIDIA A100-SXM4-40GB",
			UUID:              m.uuidOf(i),
			MemoryTotal:       40 * gib,
			MemoryFree:        uint64(39-i) * gib,
			ComputeCapability: "8.0",
			Utilization:       float64(10 * i),
			TemperatureC:      float64(30 + i),
			PowerW:            100 + float64(i),
		}
		if d != want {
			t.Errorf("device %d:\n got %+v\nwant %+v", i, d, want)
		}
	}
	total, free := OfferedMemory(devs)
	if total != 320*gib || free != (39+38+37+36+35+34+33+32)*gib {
		t.Errorf("offered = %d/%d GiB, want 320/284", total/gib, free/gib)
	}
}

func TestNVMLFailingGPUs(t *testing.T) {
	tests := []struct {
		name string
		f    faults
		// failing maps a GPU index to a substring of its Error.
		failing map[int]string
		// check inspects the snapshot beyond the errors.
		check func(t *testing.T, devs []wire.Device)
	}{
		{
			name:    "memory of GPU 3 lost",
			f:       faults{memory: map[int]nvml.Return{3: nvml.ERROR_GPU_IS_LOST}},
			failing: map[int]string{3: "memory info: GPU is lost"},
			check: func(t *testing.T, devs []wire.Device) {
				if d := devs[3]; d.UUID == "" || d.Name == "" || d.MemoryTotal != 0 || d.MemoryFree != 0 {
					t.Errorf("lost GPU should keep its identity and offer no memory: %+v", d)
				}
				if total, _ := OfferedMemory(devs); total != 7*40*gib {
					t.Errorf("offered %d GiB, want 280", total/gib)
				}
			},
		},
		{
			name:    "no handle for GPU 2",
			f:       faults{handle: map[int]nvml.Return{2: nvml.ERROR_UNKNOWN}},
			failing: map[int]string{2: "device handle: NVML error"},
			check: func(t *testing.T, devs []wire.Device) {
				if devs[2].Index != 2 || devs[2].Kind != KindGPU {
					t.Errorf("GPU without handle misreported: %+v", devs[2])
				}
			},
		},
		{
			name:    "UUID of GPU 6 unreadable",
			f:       faults{uuid: map[int]nvml.Return{6: nvml.ERROR_NO_PERMISSION}},
			failing: map[int]string{6: "uuid: no permission"},
		},
		{
			name:    "power of GPU 5 needs reset",
			f:       faults{power: map[int]nvml.Return{5: nvml.ERROR_RESET_REQUIRED}},
			failing: map[int]string{5: "power usage: GPU needs a reset"},
		},
		{
			name: "telemetry not supported is no error",
			f: faults{
				util:  map[int]nvml.Return{0: nvml.ERROR_NOT_SUPPORTED},
				temp:  map[int]nvml.Return{1: nvml.ERROR_NOT_SUPPORTED},
				power: map[int]nvml.Return{7: nvml.ERROR_NOT_SUPPORTED},
			},
			check: func(t *testing.T, devs []wire.Device) {
				if devs[1].TemperatureC != 0 || devs[7].PowerW != 0 {
					t.Errorf("unsupported telemetry should stay zero: %+v / %+v", devs[1], devs[7])
				}
				if devs[1].MemoryTotal != 40*gib || devs[1].Utilization != 10 {
					t.Errorf("supported queries lost: %+v", devs[1])
				}
			},
		},
		{
			name: "two GPUs failing differently",
			f: faults{
				memory: map[int]nvml.Return{0: nvml.ERROR_GPU_IS_LOST},
				temp:   map[int]nvml.Return{4: nvml.ERROR_UNKNOWN},
			},
			failing: map[int]string{0: "GPU is lost", 4: "temperature: NVML error"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, devs := snapshot(t, newMockDGX(t, tt.f), quietOptions())
			if len(devs) != 8 {
				t.Fatalf("got %d devices, want all 8 listed", len(devs))
			}
			for i, d := range devs {
				want, failing := tt.failing[i]
				switch {
				case failing && !strings.Contains(d.Error, want):
					t.Errorf("GPU %d error = %q, want it to contain %q", i, d.Error, want)
				case !failing && d.Error != "":
					t.Errorf("GPU %d should work, has error %q", i, d.Error)
				case !failing && d.MemoryTotal != 40*gib:
					t.Errorf("GPU %d offers %d bytes, want 40 GiB", i, d.MemoryTotal)
				}
			}
			if tt.check != nil {
				tt.check(t, devs)
			}
		})
	}
}

func TestNVMLErrorDecoding(t *testing.T) {
	tests := []struct {
		ret  nvml.Return
		want error
	}{
		{nvml.ERROR_LIBRARY_NOT_FOUND, ErrLibraryNotFound},
		{nvml.ERROR_DRIVER_NOT_LOADED, ErrDriverNotLoaded},
		{nvml.ERROR_NO_PERMISSION, ErrNoPermission},
		{nvml.ERROR_GPU_IS_LOST, ErrGPULost},
		{nvml.ERROR_RESET_REQUIRED, ErrResetRequired},
		{nvml.ERROR_NOT_SUPPORTED, ErrNotSupported},
		{nvml.ERROR_UNKNOWN, ErrNVML},
		{nvml.ERROR_INVALID_ARGUMENT, ErrNVML},
	}
	for _, tt := range tests {
		t.Run(tt.ret.String(), func(t *testing.T) {
			err := nvmlError("probe", tt.ret)
			if !errors.Is(err, tt.want) {
				t.Errorf("nvmlError(%v) = %v, want %v", tt.ret, err, tt.want)
			}
			if !errors.Is(err, tt.ret) {
				t.Errorf("nvmlError(%v) = %v does not wrap the return code", tt.ret, err)
			}
			if !strings.HasPrefix(err.Error(), "nvml probe: ") {
				t.Errorf("error %q does not name the operation", err)
			}
		})
	}
	if err := nvmlError("probe", nvml.SUCCESS); err != nil {
		t.Errorf("SUCCESS decoded as %v", err)
	}
}

func TestDiscoverFallsBackToCPU(t *testing.T) {
	zero := 0
	tests := []struct {
		name    string
		f       faults
		gpus    []string
		wantErr error
		// shutdowns is how often NVML must be shut down again.
		shutdowns int
	}{
		{name: "library missing", f: faults{init: nvml.ERROR_LIBRARY_NOT_FOUND}},
		{name: "driver not loaded", f: faults{init: nvml.ERROR_DRIVER_NOT_LOADED}},
		{name: "no GPU", f: faults{count: &zero}, shutdowns: 1},
		{
			name:    "library missing but GPUs selected",
			f:       faults{init: nvml.ERROR_LIBRARY_NOT_FOUND},
			gpus:    []string{"0"},
			wantErr: ErrGPUUnavailable,
		},
		{name: "no permission", f: faults{init: nvml.ERROR_NO_PERMISSION}, wantErr: ErrNoPermission},
		{name: "count fails", f: faults{countRet: nvml.ERROR_UNKNOWN}, wantErr: ErrNVML, shutdowns: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMockDGX(t, tt.f)
			opts := quietOptions()
			opts.GPUs = tt.gpus
			opts.CPUDevices = 2
			b, err := discover(t.Context(), opts, m)
			if m.shutdowns != tt.shutdowns {
				t.Errorf("NVML shut down %d times, want %d", m.shutdowns, tt.shutdowns)
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("discover error = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("discover: %v", err)
			}
			defer b.Close()
			if b.Name() != "cpu" {
				t.Fatalf("backend = %q, want cpu", b.Name())
			}
			devs, err := b.Devices(t.Context())
			if err != nil {
				t.Fatalf("devices: %v", err)
			}
			if len(devs) != 2 || devs[1].Kind != KindCPU || devs[1].UUID != "cpu-n1-1" {
				t.Errorf("want 2 CPU devices of node n1, got %+v", devs)
			}
		})
	}
}

func TestSelectGPUs(t *testing.T) {
	m := newMockDGX(t, faults{})
	tests := []struct {
		name    string
		sel     []string
		want    []int
		wantErr error
	}{
		{name: "all", want: []int{0, 1, 2, 3, 4, 5, 6, 7}},
		{name: "by index", sel: []string{"3", "1"}, want: []int{1, 3}},
		{name: "by UUID", sel: []string{m.uuidOf(5)}, want: []int{5}},
		{name: "UUID in upper case", sel: []string{strings.ToUpper(m.uuidOf(6))}, want: []int{6}},
		{name: "same GPU twice", sel: []string{"5", " " + m.uuidOf(5)}, want: []int{5}},
		{name: "mixed with spaces", sel: []string{" 0 ", m.uuidOf(7)}, want: []int{0, 7}},
		{name: "index out of range", sel: []string{"8"}, wantErr: ErrUnknownGPU},
		{name: "negative index", sel: []string{"-1"}, wantErr: ErrUnknownGPU},
		{name: "unknown UUID", sel: []string{"GPU-00000000-0000-0000-0000-000000000000"}, wantErr: ErrUnknownGPU},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m.shutdowns = 0
			opts := quietOptions()
			opts.GPUs = tt.sel
			if tt.wantErr != nil {
				if _, err := discover(t.Context(), opts, m); !errors.Is(err, tt.wantErr) {
					t.Fatalf("discover error = %v, want %v", err, tt.wantErr)
				}
				if m.shutdowns != 1 {
					t.Errorf("NVML shut down %d times after a bad selection, want 1", m.shutdowns)
				}
				return
			}
			_, devs := snapshot(t, m, opts)
			var got []int
			for _, d := range devs {
				got = append(got, d.Index)
				if d.UUID != m.uuidOf(d.Index) {
					t.Errorf("GPU %d has UUID %s, want %s", d.Index, d.UUID, m.uuidOf(d.Index))
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("offered GPUs %v, want %v", got, tt.want)
			}
		})
	}
}

func TestNVMLMemoryBudget(t *testing.T) {
	tests := []struct {
		name   string
		budget uint64
		f      faults
		// wantTotal is what each healthy GPU offers.
		wantTotal uint64
	}{
		{name: "no budget", wantTotal: 40 * gib},
		{name: "budget above the GPUs", budget: 1 << 50, wantTotal: 40 * gib},
		{name: "budget of 80 GiB", budget: 80 * gib, wantTotal: 10 * gib},
		{
			name:      "failing GPUs leave the budget to the others",
			budget:    60 * gib,
			f:         faults{memory: map[int]nvml.Return{0: nvml.ERROR_GPU_IS_LOST, 1: nvml.ERROR_GPU_IS_LOST}},
			wantTotal: 10 * gib,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := quietOptions()
			opts.MemoryBudget = tt.budget
			_, devs := snapshot(t, newMockDGX(t, tt.f), opts)
			var sum uint64
			for _, d := range devs {
				if d.Error != "" {
					continue
				}
				if d.MemoryTotal != tt.wantTotal {
					t.Errorf("GPU %d offers %d bytes, want %d", d.Index, d.MemoryTotal, tt.wantTotal)
				}
				if d.MemoryFree > d.MemoryTotal {
					t.Errorf("GPU %d: free %d above offered %d", d.Index, d.MemoryFree, d.MemoryTotal)
				}
				sum += d.MemoryTotal
			}
			if tt.budget > 0 && sum > tt.budget {
				t.Errorf("GPUs offer %d bytes, above the budget %d", sum, tt.budget)
			}
		})
	}
}

func TestNVMLClose(t *testing.T) {
	m := newMockDGX(t, faults{})
	b, err := discover(t.Context(), quietOptions(), m)
	if err != nil {
		t.Fatalf("discover: %v", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := b.Devices(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("devices with a cancelled context: %v, want context.Canceled", err)
	}
	for range 2 {
		if err := b.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
	}
	if m.shutdowns != 1 {
		t.Errorf("NVML shut down %d times, want 1", m.shutdowns)
	}
	if _, err := b.Devices(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("devices after close: %v, want ErrClosed", err)
	}
}

func TestNVMLLogsFailureOnce(t *testing.T) {
	lost := false
	m := newMockDGX(t, faults{})
	dev := m.Devices[2].(*dgxa100.Device)
	memory := dev.GetMemoryInfoFunc
	dev.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		if lost {
			return nvml.Memory{}, nvml.ERROR_GPU_IS_LOST
		}
		return memory()
	}
	var logs bytes.Buffer
	opts := quietOptions()
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	b, err := discover(t.Context(), opts, m)
	if err != nil {
		t.Fatalf("discover: %v", err)
	}
	defer b.Close()

	for _, step := range []struct {
		lost             bool
		failing, healthy int
	}{
		{lost: false, failing: 0, healthy: 0},
		{lost: true, failing: 1, healthy: 0},
		{lost: true, failing: 1, healthy: 0},
		{lost: false, failing: 1, healthy: 1},
		{lost: false, failing: 1, healthy: 1},
	} {
		lost = step.lost
		devs, err := b.Devices(t.Context())
		if err != nil {
			t.Fatalf("devices: %v", err)
		}
		if (devs[2].Error != "") != step.lost {
			t.Fatalf("GPU 2 error = %q with lost=%v", devs[2].Error, step.lost)
		}
		out := logs.String()
		if n := strings.Count(out, "GPU failing"); n != step.failing {
			t.Errorf("after lost=%v: %d failure lines, want %d:\n%s", step.lost, n, step.failing, out)
		}
		if n := strings.Count(out, "GPU answering again"); n != step.healthy {
			t.Errorf("after lost=%v: %d recovery lines, want %d:\n%s", step.lost, n, step.healthy, out)
		}
	}
}
