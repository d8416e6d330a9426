package helix

import (
	"bufio"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// TimingTable is a Helix per-layer timing table: the time one layer takes on
// a machine for a batch of a given size (tokens for prompts, requests for
// decoding).
type TimingTable struct {
	// Batch holds the batch sizes in increasing order.
	Batch []float64
	// Seconds holds the per-layer time at each batch size.
	Seconds []float64
}

// ParseTimingTable reads a headerless two-column CSV of batch size and
// milliseconds per layer.
func ParseTimingTable(r io.Reader, name string) (*TimingTable, error) {
	t := &TimingTable{}
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" {
			continue
		}
		a, b, ok := strings.Cut(s, ",")
		if !ok {
			return nil, fmt.Errorf("%w: %s:%d: want batch,ms got %q", ErrSyntax, name, line, s)
		}
		x, err1 := strconv.ParseFloat(strings.TrimSpace(a), 64)
		ms, err2 := strconv.ParseFloat(strings.TrimSpace(b), 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%w: %s:%d: numbers in %q", ErrSyntax, name, line, s)
		}
		if n := len(t.Batch); n > 0 && x <= t.Batch[n-1] {
			return nil, fmt.Errorf("%w: %s:%d: batch %v not above %v", ErrSyntax, name, line, x, t.Batch[n-1])
		}
		t.Batch = append(t.Batch, x)
		t.Seconds = append(t.Seconds, ms*0.001)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(t.Batch) == 0 {
		return nil, fmt.Errorf("%w: %s is empty", ErrSyntax, name)
	}
	return t, nil
}

// At interpolates linearly between the nearest batch sizes at or below and
// at or above x; it is exact on a table entry and refuses to extrapolate.
func (t *TimingTable) At(x float64) (float64, error) {
	n := len(t.Batch)
	if x < t.Batch[0] || x > t.Batch[n-1] {
		return 0, fmt.Errorf("%w: batch %v outside [%v, %v]", ErrOutOfRange, x, t.Batch[0], t.Batch[n-1])
	}
	hi := sort.SearchFloat64s(t.Batch, x)
	if t.Batch[hi] == x {
		return t.Seconds[hi], nil
	}
	lo := hi - 1
	x0, x1, y0, y1 := t.Batch[lo], t.Batch[hi], t.Seconds[lo], t.Seconds[hi]
	return y0 + (y1-y0)*(x-x0)/(x1-x0), nil
}
