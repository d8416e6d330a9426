package device

import (
	"slices"
	"testing"

	"github.com/tessera-grid/tessera/pkg/wire"
)

func TestApplyBudget(t *testing.T) {
	const tib = 1024 * gib
	tests := []struct {
		name   string
		budget uint64
		devs   []wire.Device
		// want is each device's offered total and free, in order.
		want [][2]uint64
	}{
		{
			name: "no budget leaves memory alone",
			devs: []wire.Device{{MemoryTotal: 80 * gib, MemoryFree: 70 * gib}},
			want: [][2]uint64{{80 * gib, 70 * gib}},
		},
		{
			name:   "shares follow each device's memory",
			budget: 60 * gib,
			devs:   []wire.Device{{MemoryTotal: 80 * gib, MemoryFree: 80 * gib}, {MemoryTotal: 40 * gib, MemoryFree: 10 * gib}},
			want:   [][2]uint64{{40 * gib, 40 * gib}, {20 * gib, 10 * gib}},
		},
		{
			name:   "failing devices offer nothing",
			budget: 40 * gib,
			devs: []wire.Device{
				{MemoryTotal: 80 * gib, MemoryFree: 80 * gib, Error: "lost"},
				{MemoryTotal: 80 * gib, MemoryFree: 80 * gib},
			},
			want: [][2]uint64{{0, 0}, {40 * gib, 40 * gib}},
		},
		{
			name:   "terabyte figures do not overflow",
			budget: 3 * tib,
			devs:   []wire.Device{{MemoryTotal: 4 * tib, MemoryFree: 4 * tib}, {MemoryTotal: 2 * tib, MemoryFree: tib}},
			want:   [][2]uint64{{2 * tib, 2 * tib}, {tib, tib}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			devs := slices.Clone(tt.devs)
			applyBudget(devs, tt.budget)
			for i, d := range devs {
				if got := [2]uint64{d.MemoryTotal, d.MemoryFree}; got != tt.want[i] {
					t.Errorf("device %d offers %v, want %v", i, got, tt.want[i])
				}
			}
		})
	}
}

func TestOfferedMemory(t *testing.T) {
	devs := []wire.Device{
		{MemoryTotal: 10, MemoryFree: 5},
		{MemoryTotal: 100, MemoryFree: 100, Error: "lost"},
		{MemoryTotal: 20, MemoryFree: 1},
	}
	if total, free := OfferedMemory(devs); total != 30 || free != 6 {
		t.Errorf("offered %d/%d, want 30/6", total, free)
	}
}
