package helix

import (
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/tessera-grid/tessera/services/planner/placement"
)

// NodeID is the placement node ID of ComputeNode-i: "i".
func NodeID(i int) string { return strconv.Itoa(i) }

// RegionName is the placement region name of region number r.
func RegionName(r int) string { return "region-" + strconv.Itoa(r) }

// Problem turns the cluster into a placement problem for model m: node
// capacities from the typical-throughput model built for mix (nil: the
// cluster's own mix), memory and NICs from the machine profiles, and every
// link of the file (source and sink links as Coordinator links).
func (c *Cluster) Problem(m *Model, profiles map[string]MachineProfile, mix Mix) (*placement.Problem, error) {
	if mix == nil {
		mix = c.Mix()
	}
	tables, err := Tables(m, mix)
	if err != nil {
		return nil, err
	}
	p := &placement.Problem{Model: ModelSpec(m)}
	regions := c.Regions()
	for _, n := range c.Nodes {
		prof, ok := profiles[n.Type]
		if !ok {
			return nil, fmt.Errorf("%w: no machine profile for %q (node %d)", ErrUnknownMachine, n.Type, n.Index)
		}
		table, ok := tables[n.Type]
		if !ok {
			return nil, fmt.Errorf("%w: node %d is a %s, which the mix %s lacks", ErrUnknownMachine, n.Index, n.Type, mix)
		}
		p.Nodes = append(p.Nodes, placement.Node{
			ID:                NodeID(n.Index),
			Device:            n.Type,
			Region:            RegionName(regions[n.Index]),
			MemoryBytes:       int64(prof.VRAM),
			MaxLayers:         m.Machines[n.Type].MaxLayers,
			InboundBytesPerS:  max(prof.InboundNIC, 0),
			OutboundBytesPerS: max(prof.OutboundNIC, 0),
			Throughput:        table,
		})
		if n.Source != nil {
			p.Network.NodeLinks = append(p.Network.NodeLinks, link(placement.Coordinator, NodeID(n.Index), *n.Source))
		}
		if n.Sink != nil {
			p.Network.NodeLinks = append(p.Network.NodeLinks, link(NodeID(n.Index), placement.Coordinator, *n.Sink))
		}
	}
	for a := range c.Nodes {
		for b := a + 1; b < len(c.Nodes); b++ {
			if l, ok := c.Links[[2]int{a, b}]; ok {
				p.Network.NodeLinks = append(p.Network.NodeLinks,
					link(NodeID(a), NodeID(b), l), link(NodeID(b), NodeID(a), l))
			}
		}
	}
	return p, nil
}

func link(from, to string, l Link) placement.Link {
	return placement.Link{From: from, To: to, BandwidthBytesPerS: l.Bandwidth,
		Latency: time.Duration(math.Round(l.Latency * float64(time.Second)))}
}

// ModelSpec is the placement model of a Helix model.
func ModelSpec(m *Model) placement.Model {
	return placement.Model{
		Name:                    m.Name,
		Layers:                  m.Layers,
		LayerBytes:              int64(m.LayerBytes),
		KVBytesPerTokenLayer:    kvBytesPerTokenLayer(m.Name),
		ActivationBytesPerToken: m.ActivationBytes,
		TokenBytes:              m.TokenBytes,
	}
}

// Tables runs the throughput model of m for mix and tabulates every type of
// the mix for 1..max layers.
func Tables(m *Model, mix Mix) (map[string]placement.ThroughputTable, error) {
	tp, err := NewThroughput(m, mix)
	if err != nil {
		return nil, err
	}
	tables := map[string]placement.ThroughputTable{}
	for _, e := range mix {
		if tables[e.Type], err = Table(tp, e.Type); err != nil {
			return nil, err
		}
	}
	return tables, nil
}

// Table is the typical throughput of machine type typ for 1..max layers.
func Table(tp *Throughput, typ string) (placement.ThroughputTable, error) {
	maxK := tp.model.Machines[typ].MaxLayers
	table := make(placement.ThroughputTable, maxK+1)
	for k := 1; k <= maxK; k++ {
		v, err := tp.TokensPerS(typ, k)
		if err != nil {
			return nil, err
		}
		table[k] = v
	}
	return table, nil
}

// Assignments turns a stored solution into placement assignments.
func (s Solution) Assignments() []placement.Assignment {
	nodes := slices.Sorted(maps.Keys(s))
	out := make([]placement.Assignment, 0, len(s))
	for _, i := range nodes {
		out = append(out, placement.Assignment{Node: NodeID(i), First: s[i].First, End: s[i].End})
	}
	return out
}
