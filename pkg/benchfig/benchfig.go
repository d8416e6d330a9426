// Package benchfig records benchmark figures into one JSON file
// (bench/results.json), so that every benchmark of every module adds its named
// figures to the same object. Names carry their units (decode_tok_s_single,
// hop_overhead_p50_us).
package benchfig

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
)

// EnvPath names the environment variable that points at the results file;
// `make bench` sets it. When it is unset, Record does nothing, so that a
// plain `go test -bench` never writes into the tree.
const EnvPath = "TESSERA_BENCH_RESULTS"

// Record merges figures into the file named by $TESSERA_BENCH_RESULTS,
// replacing figures of the same name. It locks the file so that benchmarks
// of several modules can record at once.
func Record(figures map[string]float64) error {
	path := os.Getenv(EnvPath)
	if path == "" {
		return nil
	}
	return RecordTo(path, figures)
}

// RecordTo merges figures into the JSON object in path.
func RecordTo(path string, figures map[string]float64) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock %s: %w", path, err)
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	all := map[string]float64{}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() > 0 {
		if err := json.NewDecoder(f).Decode(&all); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	for k, v := range figures {
		all[k] = v
	}
	keys := make([]string, 0, len(all))
	for k := range all {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	// Write keys in order so that diffs of the results file stay readable.
	buf := []byte("{\n")
	for i, k := range keys {
		kb, _ := json.Marshal(k)
		vb, _ := json.Marshal(all[k])
		buf = append(buf, "  "...)
		buf = append(buf, kb...)
		buf = append(buf, ": "...)
		buf = append(buf, vb...)
		if i < len(keys)-1 {
			buf = append(buf, ',')
		}
		buf = append(buf, '\n')
	}
	buf = append(buf, "}\n"...)
	if err := f.Truncate(0); err != nil {
		return err
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		return err
	}
	return nil
}

// Best records the best value each figure has had in this process, so that
// a benchmark run several times (go test -count N) leaves its best run in
// the results file: on a shared machine that is the least disturbed one.
// The zero value is ready to use.
type Best struct {
	mu   sync.Mutex
	seen map[string]float64
}

// Higher records the figures that exceed (or first set) their best so far.
func (b *Best) Higher(figures map[string]float64) error {
	return b.record(figures, func(v, best float64) bool { return v > best })
}

// Lower records the figures that fall below (or first set) their best so far.
func (b *Best) Lower(figures map[string]float64) error {
	return b.record(figures, func(v, best float64) bool { return v < best })
}

func (b *Best) record(figures map[string]float64, better func(v, best float64) bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.seen == nil {
		b.seen = map[string]float64{}
	}
	out := map[string]float64{}
	for k, v := range figures {
		if best, ok := b.seen[k]; !ok || better(v, best) {
			b.seen[k] = v
			out[k] = v
		}
	}
	if len(out) == 0 {
		return nil
	}
	return Record(out)
}
