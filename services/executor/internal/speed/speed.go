// Package speed measures how fast this node runs one layer of each model it
// may serve: decode (one new position per step) and prefill (a block of
// positions at once) tokens per second, on a synthetic layer of the model's
// shape. Results are cached on disk by device, model, dtype and shape, so a
// restart does not measure again; the registry checks the claims with its
// challenges.
package speed

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tessera-grid/tessera/pkg/compute"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// ErrUnsupported means the compute backend cannot run the model's dtype or
// shape, so no speed is claimed for it.
var ErrUnsupported = errors.New("model not measurable")

// MaxLayerBytes bounds the synthetic layer a measurement allocates.
const MaxLayerBytes = 2 << 30

// Result is one measurement of one layer.
type Result struct {
	DecodeTokS  float64
	PrefillTokS float64
}

// Measure times one synthetic layer of cfg's shape: decode steps of one
// position each, then prefills of up to 128 positions, each for about
// budget/2.
func Measure(cfg wire.ModelConfig, dtype string, pool *compute.Pool, budget time.Duration) (Result, error) {
	if dtype != "f32" {
		return Result{}, fmt.Errorf("%w: dtype %s (the compute backend runs f32)", ErrUnsupported, dtype)
	}
	if cfg.Dim <= 0 || cfg.Heads <= 0 || cfg.KVHeads <= 0 || cfg.HiddenDim <= 0 || cfg.SeqLen <= 0 || cfg.Dim%cfg.Heads != 0 {
		return Result{}, fmt.Errorf("%w: shape %+v", ErrUnsupported, cfg)
	}
	cfg = denseEquivalent(cfg)
	if b := LayerBytes(cfg); b > MaxLayerBytes {
		return Result{}, fmt.Errorf("%w: one layer needs %d bytes, more than %d", ErrUnsupported, b, MaxLayerBytes)
	}
	one := cfg
	one.Layers = 1
	st, err := compute.NewStage(one, 0, 1, nil, []*compute.Layer{syntheticLayer(cfg)}, nil, pool)
	if err != nil {
		return Result{}, err
	}
	row := make([]float32, cfg.Dim)
	for i := range row {
		row[i] = float32(rand.NormFloat64())
	}
	var res Result
	// Decode: one position per step, as a generation does.
	cache := compute.NewCache(one, 1)
	steps, start := 0, time.Now()
	for pos := 0; pos < cfg.SeqLen && (steps < 4 || time.Since(start) < budget/2); pos++ {
		it := &compute.Item{Cache: cache, Pos: pos, N: 1, Hidden: append([]float32(nil), row...)}
		if err := st.Forward([]*compute.Item{it}); err != nil {
			return Result{}, err
		}
		steps++
	}
	res.DecodeTokS = float64(steps) / time.Since(start).Seconds()
	// Prefill: a block of positions in one pass.
	rows := min(128, cfg.SeqLen)
	block := make([]float32, 0, rows*cfg.Dim)
	for range rows {
		block = append(block, row...)
	}
	passes, start := 0, time.Now()
	for passes < 2 || time.Since(start) < budget/2 {
		it := &compute.Item{Cache: compute.NewCache(one, 1), Pos: 0, N: rows, Hidden: append([]float32(nil), block...)}
		if err := st.Forward([]*compute.Item{it}); err != nil {
			return Result{}, err
		}
		passes++
	}
	res.PrefillTokS = float64(passes*rows) / time.Since(start).Seconds()
	return res, nil
}

// LayerBytes is the f32 weight bytes of one layer of cfg.
func LayerBytes(cfg wire.ModelConfig) int64 {
	d, kv, h := int64(cfg.Dim), int64(compute.KVDim(cfg)), int64(cfg.HiddenDim)
	return 4 * (2*d*d + 2*kv*d + 3*h*d + 2*d)
}

// denseEquivalent is the dense layer shape that does a token's arithmetic
// in a layer of cfg: a mixture of experts' or a grouped FFN's active
// experts' neurons as one feed-forward network.
func denseEquivalent(cfg wire.ModelConfig) wire.ModelConfig {
	if k := compute.ActiveExperts(cfg); k > 0 {
		if cfg.Experts > 0 {
			cfg.HiddenDim *= k
		} else {
			cfg.HiddenDim = max(1, cfg.HiddenDim*k/cfg.FFNGroups)
		}
	}
	cfg.Experts, cfg.TopK, cfg.FFNGroups = 0, 0, 0
	return cfg
}

// syntheticLayer is a layer of cfg's shape with small random weights.
func syntheticLayer(cfg wire.ModelConfig) *compute.Layer {
	d, kv, h := cfg.Dim, compute.KVDim(cfg), cfg.HiddenDim
	vec := func(n int, v float32) []float32 {
		out := make([]float32, n)
		for i := range out {
			out[i] = v
		}
		return out
	}
	mat := func(rows, cols int) *compute.Matrix {
		v := make([]float32, rows*cols)
		for i := range v {
			v[i] = float32(rand.NormFloat64() * 0.02)
		}
		return compute.NewMatrixF32(rows, cols, v)
	}
	return &compute.Layer{
		AttnNorm: vec(d, 1), Wq: mat(d, d), Wk: mat(kv, d), Wv: mat(kv, d), Wo: mat(d, d),
		FFNNorm: vec(d, 1), W1: mat(h, d), W2: mat(d, h), W3: mat(h, d),
	}
}

// Cache holds measured speeds, saved as JSON in one file.
type Cache struct {
	path string

	mu      sync.Mutex
	samples map[string]wire.SpeedSample
}

// OpenCache loads the cache file at path (missing: empty).
func OpenCache(path string) (*Cache, error) {
	c := &Cache{path: path, samples: map[string]wire.SpeedSample{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, fmt.Errorf("speed cache: %w", err)
	}
	if err := json.Unmarshal(b, &c.samples); err != nil {
		return nil, fmt.Errorf("speed cache %s: %w", path, err)
	}
	return c, nil
}

// key names a measurement: device, model, dtype and the shape it ran.
func key(device string, man wire.ModelManifest) string {
	c := man.Config
	return fmt.Sprintf("%s|%s|%s|%dx%dx%dx%d/%d", device, man.ID, man.DType, c.Dim, c.HiddenDim, c.SeqLen, c.Heads, c.KVHeads)
}

// Ensure measures the model on every device that lacks a cached result
// (one measurement serves them all: the compute backend is the same) and
// saves the cache.
func (c *Cache) Ensure(man wire.ModelManifest, devices []wire.Device, pool *compute.Pool, budget time.Duration) error {
	c.mu.Lock()
	var missing []wire.Device
	for _, d := range devices {
		if d.Error != "" {
			continue
		}
		if _, ok := c.samples[key(d.UUID, man)]; !ok {
			missing = append(missing, d)
		}
	}
	c.mu.Unlock()
	if len(missing) == 0 {
		return nil
	}
	res, err := Measure(man.Config, man.DType, pool, budget)
	if err != nil {
		return fmt.Errorf("speed of %s: %w", man.ID, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range missing {
		c.samples[key(d.UUID, man)] = wire.SpeedSample{Model: man.ID, DType: man.DType, Device: d.UUID, DecodeTokS: res.DecodeTokS, PrefillTokS: res.PrefillTokS}
	}
	return c.save()
}

// save writes the cache file atomically. Called with c.mu held.
func (c *Cache) save() error {
	b, err := json.MarshalIndent(c.samples, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(c.path), 0o700); err != nil {
		return fmt.Errorf("speed cache: %w", err)
	}
	tmp := c.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("speed cache: %w", err)
	}
	return os.Rename(tmp, c.path)
}

// Samples returns the cached speeds of the given devices and models.
func (c *Cache) Samples(devices []wire.Device, models []wire.ModelManifest) []wire.SpeedSample {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []wire.SpeedSample
	for _, m := range models {
		for _, d := range devices {
			if s, ok := c.samples[key(d.UUID, m)]; ok {
				out = append(out, s)
			}
		}
	}
	slices.SortFunc(out, func(a, b wire.SpeedSample) int {
		return strings.Compare(a.Model+"|"+a.Device, b.Model+"|"+b.Device)
	})
	return out
}
