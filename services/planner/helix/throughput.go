package helix

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// MixEntry is one machine type of a mix and how many machines of it exist.
type MixEntry struct {
	Type  string
	Count int
}

// Mix is a cluster's machine count by type. Its order matters: Helix's
// throughput model sums over it in this order.
type Mix []MixEntry

// ParseMix reads "A100:4,L4:8,T4:12".
func ParseMix(s string) (Mix, error) {
	var mix Mix
	for _, part := range strings.Split(s, ",") {
		t, c, ok := strings.Cut(strings.TrimSpace(part), ":")
		n, err := strconv.Atoi(c)
		if !ok || err != nil || n <= 0 || t == "" {
			return nil, fmt.Errorf("%w: machine mix %q", ErrSyntax, s)
		}
		mix = append(mix, MixEntry{Type: t, Count: n})
	}
	return mix, nil
}

// String writes the mix as ParseMix reads it.
func (m Mix) String() string {
	parts := make([]string, len(m))
	for i, e := range m {
		parts[i] = fmt.Sprintf("%s:%d", e.Type, e.Count)
	}
	return strings.Join(parts, ",")
}

// Typical is Helix's typical operating point of a machine holding k layers.
type Typical struct {
	// TokensPerS is the typical token throughput (prompt + decode tokens).
	TokensPerS float64
	// PromptRequests is the typical number of prompt requests per batch (≤ 1).
	PromptRequests float64
	// PromptTokens and DecodeTokens are the typical batch composition.
	PromptTokens, DecodeTokens int
	// KVCapacity is the KV cache in token·layer entries.
	KVCapacity int
	// PromptMaxRequests, PromptMaxTokens, DecodeMaxTokens, DecodeMaxContext
	// bound the batches the machine accepts.
	PromptMaxRequests, PromptMaxTokens, DecodeMaxTokens, DecodeMaxContext int
}

// Throughput is Helix's typical-throughput model for one model and machine
// mix: the token rate of a machine holding k layers, when the rest of the
// pipeline is made of the mix's machines at their typical layer counts.
type Throughput struct {
	model *Model
	mix   Mix
	// layers and perf are the typical layer count and normalised
	// performance of each type after the fixed point.
	layers map[string]int
	perf   map[string]float64
}

// NewThroughput runs Helix's fixed point for the mix and returns the model.
func NewThroughput(m *Model, mix Mix) (*Throughput, error) {
	t := &Throughput{model: m, mix: mix, layers: map[string]int{}, perf: map[string]float64{}}
	capacity := 0
	for _, e := range mix {
		if _, ok := m.Machines[e.Type]; !ok {
			return nil, fmt.Errorf("%w: %q for %s", ErrUnknownMachine, e.Type, m.Name)
		}
		t.layers[e.Type] = m.TypicalLayers[e.Type]
		t.perf[e.Type] = m.PerfSeed[e.Type]
		capacity += e.Count * m.TypicalLayers[e.Type]
	}
	if float64(capacity) < 1.2*float64(m.Layers) {
		for _, e := range mix {
			t.layers[e.Type] = m.TypicalLayersSparse[e.Type]
		}
	}
	for range m.Globals.FixedPointIterations {
		next := map[string]float64{}
		for _, e := range mix {
			typ, err := t.typical(e.Type, t.layers[e.Type])
			if err != nil {
				return nil, err
			}
			next[e.Type] = typ.TokensPerS * float64(t.layers[e.Type])
		}
		t.perf = next
	}
	return t, nil
}

// Mix returns the machine mix the model was built for.
func (t *Throughput) Mix() Mix { return t.mix }

// Typical returns the typical operating point of machine type typ holding k
// layers (1 ≤ k ≤ the type's max layers).
func (t *Throughput) Typical(typ string, k int) (Typical, error) {
	if _, ok := t.perf[typ]; !ok {
		return Typical{}, fmt.Errorf("%w: %q is not in the mix %s", ErrUnknownMachine, typ, t.mix)
	}
	return t.typical(typ, k)
}

// TokensPerS is Typical(typ, k).TokensPerS.
func (t *Throughput) TokensPerS(typ string, k int) (float64, error) {
	v, err := t.Typical(typ, k)
	return v.TokensPerS, err
}

// typical evaluates Helix's formula with the current perf. The expressions
// are evaluated in the order Helix writes them, so results match bit for bit.
func (t *Throughput) typical(typ string, k int) (Typical, error) {
	m := t.model
	mp := m.Machines[typ]
	if k < 1 || k > mp.MaxLayers {
		return Typical{}, fmt.Errorf("%w: %s holds 1..%d layers of %s, not %d", ErrOutOfRange, typ, mp.MaxLayers, m.Name, k)
	}
	key := strconv.Itoa(k)
	num, den := 0.0, 0.0
	for _, e := range t.mix {
		w := float64(e.Count * t.layers[e.Type])
		num += w * (1 / t.perf[e.Type])
		den += w
	}
	avg := num / den
	lt := 1 / t.perf[typ]
	fk := float64(k)
	rtt := float64(m.Layers-k)*avg + fk*lt
	ratio := fk * lt / rtt
	g := m.Globals
	kv := g.BlockSizeTokens * mp.KVBlocks[key] * k
	avail := math.Trunc(g.KVCacheHWM * float64(kv) / fk)
	seq := float64(g.AvgInputTokens + g.AvgOutputTokens)
	ptr := avail / seq * ratio / float64(g.AvgOutputTokens)
	pt := int(math.RoundToEven(ptr * float64(g.AvgInputTokens)))
	dt := int(math.RoundToEven(avail / seq * ratio))
	if ptr > 1 {
		ptr, pt, dt = 1, g.AvgInputTokens, g.AvgOutputTokens
	}
	out := Typical{
		PromptRequests: ptr, PromptTokens: pt, DecodeTokens: dt, KVCapacity: kv,
		PromptMaxRequests: mp.PromptMaxRequests[key],
		PromptMaxTokens:   mp.PromptMaxRequests[key] * g.MaxInputTokens,
		DecodeMaxTokens:   mp.DecodeMaxTokens[key],
		DecodeMaxContext:  mp.DecodeMaxTokens[key] * g.DecodeMaxContext,
	}
	prompt, decode := m.Prompt[typ], m.Decode[typ]
	if ptr >= 1 {
		p, err := prompt.At(float64(pt))
		if err != nil {
			return out, err
		}
		d, err := decode.At(float64(dt))
		if err != nil {
			return out, err
		}
		out.TokensPerS = float64(pt+dt) / (fk * (p + d))
		return out, nil
	}
	r := 1 / ptr
	p, err := prompt.At(math.Trunc(float64(pt) * r))
	if err != nil {
		return out, err
	}
	d, err := decode.At(float64(dt))
	if err != nil {
		return out, err
	}
	out.TokensPerS = r * float64(pt+dt) / (fk * (p + d*r))
	return out, nil
}
