package helix

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Range is a contiguous layer range [First, End).
type Range struct {
	First, End int
}

// Solution is a stored Helix placement: the layer range of each node, keyed
// by ComputeNode index. Nodes holding nothing are absent.
type Solution map[int]Range

// LoadSolution reads a placement file (ilp_sol.ini, petals_sol.ini, ...).
func LoadSolution(path string) (Solution, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseSolution(f, path)
}

// ParseSolution reads [Settings] offset and [Solution] compute_node_<i+offset>
// = [layer, ...] lines; each list must be a contiguous range.
func ParseSolution(r io.Reader, name string) (Solution, error) {
	ini, err := parseINI(r, name)
	if err != nil {
		return nil, err
	}
	off, err := ini.get("Settings", "offset")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	offset, err := strconv.Atoi(off)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: offset %q", ErrSyntax, name, off)
	}
	sec, ok := ini.sections["Solution"]
	if !ok {
		return nil, fmt.Errorf("%w: %s: no [Solution] section", ErrSyntax, name)
	}
	sol := Solution{}
	for key, v := range sec {
		id, ok := strings.CutPrefix(key, "compute_node_")
		n, err := strconv.Atoi(id)
		if !ok || err != nil || n < offset {
			return nil, fmt.Errorf("%w: %s: key %q", ErrSyntax, name, key)
		}
		layers, err := parseIntList(v)
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", name, key, err)
		}
		if len(layers) == 0 {
			continue
		}
		slices.Sort(layers)
		for i := 1; i < len(layers); i++ {
			if layers[i] != layers[i-1]+1 {
				return nil, fmt.Errorf("%w: %s: %s holds %v, not a contiguous range", ErrSyntax, name, key, layers)
			}
		}
		sol[n-offset] = Range{First: layers[0], End: layers[len(layers)-1] + 1}
	}
	return sol, nil
}
