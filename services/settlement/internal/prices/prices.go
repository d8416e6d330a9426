// Package prices holds the versioned price book and computes what a usage
// event costs its customer and earns its supplier, in integer micro-units
// (millionths of the book's currency), rounding half up.
//
// A book is JSON:
//
//	{
//	  "version": 3,
//	  "currency": "USD",
//	  "models":  {"stories260k": {"prompt_per_1k_micros": 100, "generated_per_1k_micros": 200, "per_gflop_micros": 50}, "*": {...}},
//	  "devices": {"gpu": {"per_million_layer_tokens_micros": 40, "per_gpu_second_micros": 0, "per_gflop_micros": 20}, "*": {...}}
//	}
//
// A customer pays per 1,000 prompt and generated tokens of the model plus
// per 10⁹ floating-point operations computed for its requests (every
// node's usage event counts its own FLOPs, so a request that activates
// fewer experts or neuron groups costs less); a supplier earns per million
// layer-tokens its device class computed, per second of compute time
// (GPU-second) and per 10⁹ FLOPs. A device class is an event's
// device_type ("cpu", or the GPU's product name); "*" prices every model or
// device class without an entry of its own.
package prices

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"os"
	"sync/atomic"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Wildcard is the entry that prices every model or device class without
// its own entry.
const Wildcard = "*"

// Book is one version of the price book.
type Book struct {
	// Version increases with every change; each settled row records it.
	Version  uint64                 `json:"version"`
	Currency string                 `json:"currency"`
	Models   map[string]ModelPrice  `json:"models"`
	Devices  map[string]DevicePrice `json:"devices"`
}

// ModelPrice is what customers pay for a model, per 1,000 tokens.
type ModelPrice struct {
	PromptPer1K    int64 `json:"prompt_per_1k_micros"`
	GeneratedPer1K int64 `json:"generated_per_1k_micros"`
	// PerGFLOP is charged per 10⁹ FLOPs computed for the request.
	PerGFLOP int64 `json:"per_gflop_micros,omitempty"`
}

// DevicePrice is what suppliers earn on a device class.
type DevicePrice struct {
	PerMillionLayerTokens int64 `json:"per_million_layer_tokens_micros"`
	// PerGPUSecond is paid per second of compute time on one device.
	PerGPUSecond int64 `json:"per_gpu_second_micros"`
	// PerGFLOP is paid per 10⁹ FLOPs the device computed.
	PerGFLOP int64 `json:"per_gflop_micros,omitempty"`
}

// Parse decodes and checks a price book.
func Parse(data []byte) (*Book, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var b Book
	if err := dec.Decode(&b); err != nil {
		return nil, fmt.Errorf("price book: %w: %w", err, ErrInvalidBook)
	}
	if dec.More() {
		return nil, fmt.Errorf("price book: trailing data: %w", ErrInvalidBook)
	}
	if b.Version == 0 {
		return nil, fmt.Errorf("price book: version must be at least 1: %w", ErrInvalidBook)
	}
	if b.Currency == "" {
		return nil, fmt.Errorf("price book %d: currency is empty: %w", b.Version, ErrInvalidBook)
	}
	for m, p := range b.Models {
		if p.PromptPer1K < 0 || p.GeneratedPer1K < 0 || p.PerGFLOP < 0 {
			return nil, fmt.Errorf("price book %d: model %q: negative price: %w", b.Version, m, ErrInvalidBook)
		}
	}
	for d, p := range b.Devices {
		if p.PerMillionLayerTokens < 0 || p.PerGPUSecond < 0 || p.PerGFLOP < 0 {
			return nil, fmt.Errorf("price book %d: device class %q: negative price: %w", b.Version, d, ErrInvalidBook)
		}
	}
	return &b, nil
}

// Load reads a price book file.
func Load(path string) (*Book, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("price book: %w", err)
	}
	b, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

// Price is what one event costs and earns under one book.
type Price struct {
	Version       uint64
	ChargeMicros  int64
	EarningMicros int64
	// Priced is false when the book has no entry (nor "*") for the event's
	// model or device class; that side is then 0.
	Priced bool
}

// Price computes ev's charge and earning. A nil book (none loaded) prices
// everything at 0, version 0, not priced.
func (b *Book) Price(ev *wire.UsageEvent) (Price, error) {
	if b == nil {
		return Price{}, nil
	}
	p := Price{Version: b.Version, Priced: true}
	mp, ok := b.Models[ev.Model]
	if !ok {
		mp, ok = b.Models[Wildcard]
	}
	if ok {
		c, err := mulAddDiv(ev.PromptTokens, mp.PromptPer1K, ev.GeneratedTokens, mp.GeneratedPer1K, 1000)
		if err != nil {
			return p, fmt.Errorf("charge of %q: %w", ev.ID, err)
		}
		f, err := mulAddDiv(ev.FLOPs, mp.PerGFLOP, 0, 0, 1_000_000_000)
		if err != nil || c > math.MaxInt64-f {
			return p, fmt.Errorf("charge of %q: %w", ev.ID, ErrOverflow)
		}
		p.ChargeMicros = c + f
	} else {
		p.Priced = false
	}
	dp, ok := b.Devices[ev.DeviceType]
	if !ok {
		dp, ok = b.Devices[Wildcard]
	}
	if ok {
		// compute_us / 1e6 seconds, so both terms are per million.
		e, err := mulAddDiv(ev.LayerTokens, dp.PerMillionLayerTokens, ev.ComputeUS, dp.PerGPUSecond, 1_000_000)
		if err != nil {
			return p, fmt.Errorf("earning of %q: %w", ev.ID, err)
		}
		f, err := mulAddDiv(ev.FLOPs, dp.PerGFLOP, 0, 0, 1_000_000_000)
		if err != nil || e > math.MaxInt64-f {
			return p, fmt.Errorf("earning of %q: %w", ev.ID, ErrOverflow)
		}
		p.EarningMicros = e + f
	} else {
		p.Priced = false
	}
	return p, nil
}

// mulAddDiv returns round((a*x + b*y) / d) for non-negative operands, in
// 128-bit arithmetic, or ErrOverflow when the result exceeds int64.
func mulAddDiv(a, x, b, y, d int64) (int64, error) {
	if a < 0 || x < 0 || b < 0 || y < 0 || d <= 0 {
		return 0, fmt.Errorf("negative operand: %w", ErrOverflow)
	}
	h1, l1 := bits.Mul64(uint64(a), uint64(x))
	h2, l2 := bits.Mul64(uint64(b), uint64(y))
	lo, c := bits.Add64(l1, l2, 0)
	hi, c2 := bits.Add64(h1, h2, c)
	// Round half up: add d/2 before dividing.
	lo, c = bits.Add64(lo, uint64(d/2), 0)
	hi, c3 := bits.Add64(hi, 0, c)
	if c2 != 0 || c3 != 0 || hi >= uint64(d) {
		return 0, ErrOverflow
	}
	q, _ := bits.Div64(hi, lo, uint64(d))
	if q > math.MaxInt64 {
		return 0, ErrOverflow
	}
	return int64(q), nil
}

// Current is the book in force, swapped atomically when a new version
// arrives. The zero value holds no book.
type Current struct {
	book atomic.Pointer[Book]
}

// Load returns the book in force (nil when none).
func (c *Current) Load() *Book { return c.book.Load() }

// Store puts b in force.
func (c *Current) Store(b *Book) { c.book.Store(b) }
