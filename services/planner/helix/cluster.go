package helix

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Link is one connection of a cluster file.
type Link struct {
	// Bandwidth is bytes per second in each direction.
	Bandwidth float64
	// Latency is seconds.
	Latency float64
}

// ClusterNode is one [ComputeNode-i] section.
type ClusterNode struct {
	// Index is i of ComputeNode-i.
	Index int
	// Type is the machine type, a key of the machine profiles.
	Type string
	// Source and Sink are the coordinator's links to and from the node
	// (nil when the node is not connected to it).
	Source, Sink *Link
}

// Cluster is a complete Helix cluster file: nodes and the links between them.
type Cluster struct {
	// Nodes are indexed by ComputeNode number.
	Nodes []ClusterNode
	// Links holds each bidirectional node link once, keyed by (a, b) with a < b.
	Links map[[2]int]Link
}

// LoadCluster reads a cluster file from disk.
func LoadCluster(path string) (*Cluster, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseCluster(f, path)
}

// ParseCluster reads a complete cluster file ([NodeNames], [SourceNode],
// [SinkNode], [ComputeNode-i], [Link-...] sections); name labels errors.
func ParseCluster(r io.Reader, name string) (*Cluster, error) {
	ini, err := parseINI(r, name)
	if err != nil {
		return nil, err
	}
	wrap := func(err error) error { return fmt.Errorf("%s: %w", name, err) }
	v, err := ini.get("NodeNames", "total_compute_nodes")
	if err != nil {
		return nil, wrap(err)
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return nil, wrap(fmt.Errorf("%w: total_compute_nodes = %q", ErrSyntax, v))
	}
	c := &Cluster{Nodes: make([]ClusterNode, n), Links: map[[2]int]Link{}}
	for i := range c.Nodes {
		typ, err := ini.get(fmt.Sprintf("ComputeNode-%d", i), "type")
		if err != nil {
			return nil, wrap(err)
		}
		c.Nodes[i] = ClusterNode{Index: i, Type: parseString(typ)}
	}
	for _, sec := range ini.order {
		rest, ok := strings.CutPrefix(sec, "Link-")
		if !ok {
			continue
		}
		l, err := parseLink(ini, sec)
		if err != nil {
			return nil, wrap(err)
		}
		a, b, ok := strings.Cut(rest, "-")
		if !ok {
			return nil, wrap(fmt.Errorf("%w: link section [%s]", ErrSyntax, sec))
		}
		switch {
		case a == "source":
			i, err := c.nodeIndex(b, sec)
			if err != nil {
				return nil, wrap(err)
			}
			c.Nodes[i].Source = &l
		case b == "sink":
			i, err := c.nodeIndex(a, sec)
			if err != nil {
				return nil, wrap(err)
			}
			c.Nodes[i].Sink = &l
		default:
			i, err := c.nodeIndex(a, sec)
			if err != nil {
				return nil, wrap(err)
			}
			j, err := c.nodeIndex(b, sec)
			if err != nil {
				return nil, wrap(err)
			}
			if i == j {
				return nil, wrap(fmt.Errorf("%w: link [%s] joins a node to itself", ErrSyntax, sec))
			}
			c.Links[[2]int{min(i, j), max(i, j)}] = l
		}
	}
	return c, nil
}

func (c *Cluster) nodeIndex(s, sec string) (int, error) {
	i, err := strconv.Atoi(s)
	if err != nil || i < 0 || i >= len(c.Nodes) {
		return 0, fmt.Errorf("%w: link [%s] names node %q", ErrSyntax, sec, s)
	}
	return i, nil
}

func parseLink(ini *iniFile, sec string) (Link, error) {
	var l Link
	bw, err := ini.get(sec, "bandwidth")
	if err != nil {
		return l, err
	}
	lat, err := ini.get(sec, "latency")
	if err != nil {
		return l, err
	}
	if l.Bandwidth, err = parseQuantity(bw); err != nil {
		return l, err
	}
	if l.Latency, err = parseQuantity(lat); err != nil {
		return l, err
	}
	if l.Bandwidth <= 0 {
		return l, fmt.Errorf("%w: link [%s] has bandwidth %v", ErrSyntax, sec, l.Bandwidth)
	}
	return l, nil
}

// LocalLatency is the latency at or below which two nodes count as one
// region: Helix's generators draw 1 ms inside a region and 40–60 ms between
// regions, and no region field exists in the files.
const LocalLatency = 0.002

// Regions assigns each node a region number: nodes joined by links of
// latency ≤ LocalLatency share a region. Regions are numbered by their
// lowest node index.
func (c *Cluster) Regions() []int {
	parent := make([]int, len(c.Nodes))
	for i := range parent {
		parent[i] = i
	}
	var find func(int) int
	find = func(i int) int {
		for parent[i] != i {
			parent[i] = parent[parent[i]]
			i = parent[i]
		}
		return i
	}
	for ab, l := range c.Links {
		if l.Latency <= LocalLatency {
			ra, rb := find(ab[0]), find(ab[1])
			parent[max(ra, rb)] = min(ra, rb)
		}
	}
	number := map[int]int{}
	out := make([]int, len(c.Nodes))
	for i := range c.Nodes {
		r := find(i)
		if _, ok := number[r]; !ok {
			number[r] = len(number)
		}
		out[i] = number[r]
	}
	return out
}

// Mix counts the cluster's machines by type, in the canonical type order.
func (c *Cluster) Mix() Mix {
	counts := map[string]int{}
	for _, n := range c.Nodes {
		counts[n.Type]++
	}
	return mixOf(counts)
}

// mixOf orders machine counts by type into a Mix (types without machines
// left out).
func mixOf(counts map[string]int) Mix {
	var mix Mix
	for t, k := range counts {
		if k > 0 {
			mix = append(mix, MixEntry{Type: t, Count: k})
		}
	}
	slices.SortFunc(mix, func(a, b MixEntry) int { return compareTypes(a.Type, b.Type) })
	return mix
}
