package helix

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"time"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

// FleetSpec describes a synthetic fleet built from Helix machine types, in
// the manner of Helix's cluster generator: regions with a machine mix each,
// fast links inside a region and slow, jittered links between regions.
type FleetSpec struct {
	// Regions gives each region's machine count by type.
	Regions []map[string]int
	// IntraBandwidth is bytes/s between two nodes of one region (0: 1.25e9).
	IntraBandwidth float64
	// CrossBandwidth is the mean bytes/s between two regions (0: 12.5e6),
	// drawn uniformly within ±CrossJitter per region pair.
	CrossBandwidth, CrossJitter float64
	// Seed draws the jitter.
	Seed uint64
}

// Defaults of FleetSpec, from Helix's geo-distributed generator settings.
const (
	DefaultIntraBandwidth = 1.25e9
	DefaultCrossBandwidth = 12.5e6
)

// RandomFleetSpec spreads `nodes` machines of the given types over
// `regions` regions, each region with its own random mix (seeded).
func RandomFleetSpec(nodes, regions int, types []string, seed uint64) FleetSpec {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	spec := FleetSpec{Seed: seed, CrossJitter: 2.5e6}
	for r := range regions {
		n := nodes / regions
		if r < nodes%regions {
			n++
		}
		weights := make([]float64, len(types))
		total := 0.0
		for k := range weights {
			weights[k] = 0.2 + rng.Float64()
			total += weights[k]
		}
		mix := map[string]int{}
		for range n {
			x := rng.Float64() * total
			k := 0
			for ; k < len(types)-1 && x >= weights[k]; k++ {
				x -= weights[k]
			}
			mix[types[k]]++
		}
		spec.Regions = append(spec.Regions, mix)
	}
	return spec
}

// SyntheticProblem builds the placement problem of a synthetic fleet for
// model m. Links are per region (no per-node links), so that fleets of
// thousands of nodes stay small; node throughput uses the whole fleet's mix.
func SyntheticProblem(m *Model, profiles map[string]MachineProfile, spec FleetSpec) (*placement.Problem, error) {
	counts := map[string]int{}
	for _, r := range spec.Regions {
		for t, n := range r {
			counts[t] += n
		}
	}
	tables, err := Tables(m, mixOf(counts))
	if err != nil {
		return nil, err
	}
	intra, cross := spec.IntraBandwidth, spec.CrossBandwidth
	if intra == 0 {
		intra = DefaultIntraBandwidth
	}
	if cross == 0 {
		cross = DefaultCrossBandwidth
	}
	rng := rand.New(rand.NewPCG(spec.Seed, 0x11a5))
	p := &placement.Problem{Model: ModelSpec(m)}
	for r, regionMix := range spec.Regions {
		types := make([]string, 0, len(regionMix))
		for t := range regionMix {
			types = append(types, t)
		}
		slices.SortFunc(types, compareTypes)
		for _, t := range types {
			prof, ok := profiles[t]
			if !ok {
				return nil, fmt.Errorf("%w: no machine profile for %q", ErrUnknownMachine, t)
			}
			for range regionMix[t] {
				p.Nodes = append(p.Nodes, placement.Node{
					ID:                "r" + strconv.Itoa(r) + "-" + strconv.Itoa(len(p.Nodes)),
					Device:            t,
					Region:            RegionName(r),
					MemoryBytes:       int64(prof.VRAM),
					MaxLayers:         m.Machines[t].MaxLayers,
					InboundBytesPerS:  prof.InboundNIC,
					OutboundBytesPerS: prof.OutboundNIC,
					Throughput:        tables[t],
				})
			}
		}
		p.Network.RegionLinks = append(p.Network.RegionLinks, placement.Link{
			From: RegionName(r), To: RegionName(r), BandwidthBytesPerS: intra, Latency: time.Millisecond})
		for s := range r {
			bw := cross + (2*rng.Float64()-1)*spec.CrossJitter
			p.Network.RegionLinks = append(p.Network.RegionLinks, placement.Link{
				From: RegionName(s), To: RegionName(r), BandwidthBytesPerS: bw,
				Latency: time.Duration(40+rng.IntN(21)) * time.Millisecond})
		}
	}
	return p, nil
}
