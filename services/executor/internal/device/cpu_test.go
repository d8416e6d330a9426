package device

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/tessera-grid/tessera/pkg/wire"
)

const (
	cpuinfoEPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
	meminfo32G  = "MemTotal:       33554432 kB\nMemFree:         1048576 kB\nMemAvailable:   25165824 kB\nHugePages_Total:       0\n"
	statBoot    = "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\nintr 1\n"
)

// fakeProc writes a procfs with the given files into a temporary directory.
func fakeProc(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestCPUDevices(t *testing.T) {
	tests := []struct {
		name    string
		opts    Options
		meminfo string
		want    []wire.Device
	}{
		{
			name:    "one device by default",
			opts:    Options{Node: "n1"},
			meminfo: meminfo32G,
			want: []wire.Device{
				{Index: 0, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-n1-0", MemoryTotal: 32 * gib, MemoryFree: 24 * gib, Utilization: 20},
			},
		},
		{
			name:    "four devices share the RAM",
			opts:    Options{Node: "edge-7", CPUDevices: 4},
			meminfo: meminfo32G,
			want: []wire.Device{
				{Index: 0, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-edge-7-0", MemoryTotal: 8 * gib, MemoryFree: 6 * gib, Utilization: 20},
				{Index: 1, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-edge-7-1", MemoryTotal: 8 * gib, MemoryFree: 6 * gib, Utilization: 20},
				{Index: 2, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-edge-7-2", MemoryTotal: 8 * gib, MemoryFree: 6 * gib, Utilization: 20},
				{Index: 3, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-edge-7-3", MemoryTotal: 8 * gib, MemoryFree: 6 * gib, Utilization: 20},
			},
		},
		{
			name:    "budget caps the shares",
			opts:    Options{Node: "n1", CPUDevices: 2, MemoryBudget: 4 * gib},
			meminfo: meminfo32G,
			want: []wire.Device{
				{Index: 0, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-n1-0", MemoryTotal: 2 * gib, MemoryFree: 2 * gib, Utilization: 20},
				{Index: 1, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-n1-1", MemoryTotal: 2 * gib, MemoryFree: 2 * gib, Utilization: 20},
			},
		},
		{
			name:    "old kernel without MemAvailable",
			opts:    Options{Node: "n1"},
			meminfo: "MemTotal: 1024 kB\nMemFree: 512 kB\n",
			want: []wire.Device{
				{Index: 0, Kind: KindCPU, Name: "AMD EPYC 7B13", UUID: "cpu-n1-0", MemoryTotal: 1 << 20, MemoryFree: 1 << 19, Utilization: 20},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proc := fakeProc(t, map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": tt.meminfo, "stat": statBoot})
			b, err := newCPUAt(tt.opts, proc)
			if err != nil {
				t.Fatalf("new: %v", err)
			}
			devs, err := b.Devices(t.Context())
			if err != nil {
				t.Fatalf("devices: %v", err)
			}
			if len(devs) != len(tt.want) {
				t.Fatalf("got %d devices, want %d: %+v", len(devs), len(tt.want), devs)
			}
			for i := range devs {
				if devs[i] != tt.want[i] {
					t.Errorf("device %d:\n got %+v\nwant %+v", i, devs[i], tt.want[i])
				}
			}
		})
	}
}

func TestCPUUtilizationFromStatDeltas(t *testing.T) {
	proc := fakeProc(t, map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": meminfo32G, "stat": statBoot})
	b, err := newCPUAt(Options{Node: "n1"}, proc)
	if err != nil {
		t.Fatalf("new: %v", err)
	}
	for _, step := range []struct {
		stat string
		want float64
	}{
		// 300 busy of 400 ticks since the last sample (iowait counts as idle).
		{stat: "cpu  300 50 150 850 50 0 0 0 0 0\n", want: 75},
		// Counters that did not move keep the last figure.
		{stat: "cpu  300 50 150 850 50 0 0 0 0 0\n", want: 75},
		// 0 busy of 100 ticks.
		{stat: "cpu  300 50 150 950 50 0 0 0 0 0\n", want: 0},
		// steal, irq and softirq are busy: 40 of 50 ticks.
		{stat: "cpu  300 50 150 960 50 10 10 20 0 0\n", want: 80},
	} {
		if err := os.WriteFile(filepath.Join(proc, "stat"), []byte(step.stat), 0o644); err != nil {
			t.Fatal(err)
		}
		devs, err := b.Devices(t.Context())
		if err != nil {
			t.Fatalf("devices: %v", err)
		}
		if devs[0].Utilization != step.want {
			t.Errorf("after %q: utilization %v, want %v", step.stat, devs[0].Utilization, step.want)
		}
	}
}

func TestCPUBadInput(t *testing.T) {
	tests := []struct {
		name    string
		opts    Options
		files   map[string]string
		wantErr error
	}{
		{
			name:  "no node id",
			opts:  Options{},
			files: map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": meminfo32G, "stat": statBoot},
		},
		{
			name:    "meminfo without MemTotal",
			opts:    Options{Node: "n1"},
			files:   map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": "MemFree: 1 kB\n", "stat": statBoot},
			wantErr: ErrBadProcFile,
		},
		{
			name:    "meminfo with a bad number",
			opts:    Options{Node: "n1"},
			files:   map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": "MemTotal: lots kB\n", "stat": statBoot},
			wantErr: ErrBadProcFile,
		},
		{
			name:    "stat without the cpu line",
			opts:    Options{Node: "n1"},
			files:   map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": meminfo32G, "stat": "intr 1\n"},
			wantErr: ErrBadProcFile,
		},
		{
			name:    "stat with a bad counter",
			opts:    Options{Node: "n1"},
			files:   map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": meminfo32G, "stat": "cpu 1 2 x 4 5\n"},
			wantErr: ErrBadProcFile,
		},
		{
			name:    "no meminfo",
			opts:    Options{Node: "n1"},
			files:   map[string]string{"cpuinfo": cpuinfoEPYC, "stat": statBoot},
			wantErr: fs.ErrNotExist,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newCPUAt(tt.opts, fakeProc(t, tt.files))
			if err == nil {
				t.Fatal("want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestCPUModelWithoutModelName(t *testing.T) {
	proc := fakeProc(t, map[string]string{"cpuinfo": "processor\t: 0\nBogoMIPS\t: 50.00\n", "meminfo": meminfo32G, "stat": statBoot})
	b, err := newCPUAt(Options{Node: "n1"}, proc)
	if err != nil {
		t.Fatalf("new: %v", err)
	}
	devs, err := b.Devices(t.Context())
	if err != nil {
		t.Fatalf("devices: %v", err)
	}
	if want := runtime.GOARCH + " CPU"; devs[0].Name != want {
		t.Errorf("name = %q, want %q", devs[0].Name, want)
	}
}

func TestCPUClose(t *testing.T) {
	proc := fakeProc(t, map[string]string{"cpuinfo": cpuinfoEPYC, "meminfo": meminfo32G, "stat": statBoot})
	b, err := newCPUAt(Options{Node: "n1"}, proc)
	if err != nil {
		t.Fatalf("new: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if _, err := b.Devices(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("devices after close: %v, want ErrClosed", err)
	}
}

// TestDiscoverOnThisMachine runs the real discovery: CPU devices on a machine
// without an NVIDIA library, the GPUs where there is one.
func TestDiscoverOnThisMachine(t *testing.T) {
	opts := quietOptions()
	opts.CPUDevices = 2
	b, err := Discover(t.Context(), opts)
	if err != nil {
		t.Fatalf("discover: %v", err)
	}
	defer b.Close()
	devs, err := b.Devices(t.Context())
	if err != nil {
		t.Fatalf("devices: %v", err)
	}
	if len(devs) == 0 {
		t.Fatal("no devices")
	}
	wantKind := KindCPU
	if b.Name() == "nvml" {
		wantKind = KindGPU
		t.Logf("NVML found %d GPUs", len(devs))
	} else if len(devs) != 2 {
		t.Fatalf("got %d CPU devices, want 2", len(devs))
	}
	for _, d := range devs {
		if d.Kind != wantKind || d.Name == "" || d.UUID == "" || d.Error != "" {
			t.Errorf("bad device %+v", d)
		}
		if d.MemoryTotal == 0 || d.MemoryFree > d.MemoryTotal {
			t.Errorf("device %d memory %d free of %d", d.Index, d.MemoryFree, d.MemoryTotal)
		}
		if d.Utilization < 0 || d.Utilization > 100 {
			t.Errorf("device %d utilization %v", d.Index, d.Utilization)
		}
	}
}
