package helix

import (
	"fmt"
	"io"
)

// MachineProfile is one machine type of a Helix machine-profile file.
type MachineProfile struct {
	Type string
	// InboundNIC and OutboundNIC are bytes/s (-1: not applicable).
	InboundNIC, OutboundNIC float64
	// Disk is bytes/s; Helix uses it only for model-load time.
	Disk float64
	// VRAM is the memory of all GPUs of the machine, in bytes.
	VRAM float64
}

// ParseMachineProfiles reads a machine-profile file: one section per type
// (and the SourceNode/SinkNode pseudo-types) with NIC, disk and VRAM sizes.
func ParseMachineProfiles(r io.Reader, name string) (map[string]MachineProfile, error) {
	ini, err := parseINI(r, name)
	if err != nil {
		return nil, err
	}
	out := map[string]MachineProfile{}
	for _, sec := range ini.order {
		if sec == "" {
			continue
		}
		mp := MachineProfile{Type: sec}
		for key, dst := range map[string]*float64{
			"inbound_nic_speed": &mp.InboundNIC, "outbound_nic_speed": &mp.OutboundNIC,
			"disk_speed": &mp.Disk, "vram_size": &mp.VRAM,
		} {
			v, err := ini.get(sec, key)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			if *dst, err = parseQuantity(v); err != nil {
				return nil, fmt.Errorf("%s: [%s] %s: %w", name, sec, key, err)
			}
		}
		out[sec] = mp
	}
	return out, nil
}
