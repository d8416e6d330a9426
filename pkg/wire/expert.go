package wire

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// SchemaExpertLoad names the schema of ExpertLoad.
const SchemaExpertLoad = "expert_load"

// A layer whose feed-forward experts (or a dense FFN's neuron groups) lie
// on other executors runs in three steps, each driven by the router:
//
//  1. The stage node runs its layers until the first one listed in the
//     request's HdrSplit header, computes that layer's attention and the
//     residual, normalizes the rows for the feed-forward network, lets the
//     gate (or the group predictor) choose each row's experts, and answers
//     with HdrTrunk set to the layer and a Routed payload. It keeps the
//     residual in the request's session.
//     The stage node computes the chosen experts it holds itself, adds
//     them to the residual and names them in HdrHeld (FormatHeld).
//  2. The router sends every expert holder, on subjects.Expert(node), the
//     rows that chose one of its other experts (a Routed payload holding only
//     those rows and experts; header HdrLayer). The holder answers with one
//     F32 frame, rows×dim: per row the weighted sum of its experts' outputs.
//  3. The router sums the answers per row and sends them back to the stage
//     node with HdrOp = OpResume; it adds them to the residual and goes on
//     with its next layer (pausing again at the next split layer), or ends
//     as a plain stage request does, with the hidden state or the logits.

// Routed is a batch of normalized rows with each row's chosen experts and
// their gate weights. A row with fewer experts than K pads with expert -1
// and weight 0.
type Routed struct {
	Rows, Dim, K int
	// X is the rows' normalized hidden states (Rows×Dim).
	X []float32
	// Experts and Weights are Rows×K.
	Experts []int32
	Weights []float32
}

// AppendRouted appends r as three frames: X (F32 Rows×Dim), Experts
// (I32 Rows×K) and Weights (F32 Rows×K).
func AppendRouted(dst []byte, r Routed) []byte {
	dst = AppendF32(dst, r.Rows, r.Dim, r.X)
	dst = AppendI32Rows(dst, r.Rows, r.K, r.Experts)
	return AppendF32(dst, r.Rows, r.K, r.Weights)
}

// DecodeRouted parses a Routed payload whose rows are dim wide and whose
// experts lie in [0, experts) (or are -1 padding with weight 0).
func DecodeRouted(b []byte, dim, experts int) (Routed, error) {
	fs, err := DecodeFrames(b, 3)
	if err != nil {
		return Routed{}, err
	}
	x, ids, ws := fs[0], fs[1], fs[2]
	if x.DType != F32 || x.Cols != dim || x.Rows == 0 {
		return Routed{}, fmt.Errorf("%w: routed rows: want f32 rows×%d, have dtype %d %d×%d", ErrFrame, dim, x.DType, x.Rows, x.Cols)
	}
	if ids.DType != I32 || ws.DType != F32 || ids.Rows != x.Rows || ws.Rows != x.Rows || ids.Cols != ws.Cols || ids.Cols == 0 {
		return Routed{}, fmt.Errorf("%w: routed choices: want i32 and f32 frames of %d×k, have %d×%d and %d×%d", ErrFrame, x.Rows, ids.Rows, ids.Cols, ws.Rows, ws.Cols)
	}
	r := Routed{Rows: x.Rows, Dim: dim, K: ids.Cols}
	if r.X, err = x.F32(nil); err != nil {
		return Routed{}, err
	}
	if r.Experts, err = ids.I32(nil); err != nil {
		return Routed{}, err
	}
	if r.Weights, err = ws.F32(nil); err != nil {
		return Routed{}, err
	}
	for i, e := range r.Experts {
		if e < -1 || int(e) >= experts || (e == -1 && r.Weights[i] != 0) {
			return Routed{}, fmt.Errorf("%w: routed choice %d (row %d): expert %d weight %g, want an expert in [0,%d) or -1 with weight 0", ErrFrame, i, i/r.K, e, r.Weights[i], experts)
		}
	}
	return r, nil
}

// ExpertGroups is the number of expert groups per layer that m stores as
// fragments of their own ("layer.<l>.expert.<e>"), which a plan may spread
// over several nodes; 0 when m's feed-forward layers are stored whole.
func (m *ModelManifest) ExpertGroups() int {
	if m.ExpertLayout == nil || m.ExpertLayout.Groups < 2 {
		return 0
	}
	for _, f := range m.Fragments {
		if f.Expert >= 0 {
			return m.ExpertLayout.Groups
		}
	}
	return 0
}

// DecodeFrames parses exactly n frames laid end to end in b.
func DecodeFrames(b []byte, n int) ([]Frame, error) {
	out := make([]Frame, 0, n)
	off := 0
	for i := 0; i < n; i++ {
		if len(b)-off < FrameHeaderSize {
			return nil, fmt.Errorf("%w: frame %d of %d: %d bytes left at offset %d, shorter than a header", ErrFrame, i+1, n, len(b)-off, off)
		}
		size, err := frameSize(b[off:])
		if err != nil {
			return nil, fmt.Errorf("frame %d of %d at offset %d: %w", i+1, n, off, err)
		}
		if size > len(b)-off {
			return nil, fmt.Errorf("%w: frame %d of %d at offset %d needs %d bytes, %d left", ErrFrame, i+1, n, off, size, len(b)-off)
		}
		f, err := DecodeFrame(b[off : off+size])
		if err != nil {
			return nil, fmt.Errorf("frame %d of %d at offset %d: %w", i+1, n, off, err)
		}
		out = append(out, f)
		off += size
	}
	if off != len(b) {
		return nil, fmt.Errorf("%w: %d bytes after the last of %d frames", ErrFrame, len(b)-off, n)
	}
	return out, nil
}

// ExpertLoad is the value of a model's key in KV expertload: how often the
// routers saw each expert chosen, summed over all routers since the counts
// began (each router adds what it counted with compare-and-set). The
// planner reads it to balance and replicate experts.
type ExpertLoad struct {
	Model string `json:"model"`
	// Layers and Experts give Counts' shape.
	Layers  int `json:"layers"`
	Experts int `json:"experts"`
	// Counts[l][e] is how many token rows chose expert e in layer l.
	Counts [][]int64 `json:"counts"`
	// Tokens is how many token rows were routed per layer (each chose up to
	// top-k experts).
	Tokens  int64     `json:"tokens"`
	Updated time.Time `json:"updated"`
}

// Validate checks the counts' shape and signs.
func (l *ExpertLoad) Validate() error {
	if l.Layers < 1 || l.Experts < 1 || len(l.Counts) != l.Layers {
		return fmt.Errorf("expert load %q: counts for %d layers, want %d (>0) of %d (>0) experts", l.Model, len(l.Counts), l.Layers, l.Experts)
	}
	for i, row := range l.Counts {
		if len(row) != l.Experts {
			return fmt.Errorf("expert load %q: layer %d has %d counts, want %d", l.Model, i, len(row), l.Experts)
		}
		for e, c := range row {
			if c < 0 {
				return fmt.Errorf("expert load %q: layer %d expert %d: negative count %d", l.Model, i, e, c)
			}
		}
	}
	if l.Tokens < 0 {
		return fmt.Errorf("expert load %q: negative tokens %d", l.Model, l.Tokens)
	}
	return nil
}

// Add adds other's counts (of the same shape) to l.
func (l *ExpertLoad) Add(other *ExpertLoad) error {
	if other.Layers != l.Layers || other.Experts != l.Experts {
		return fmt.Errorf("expert load %q: adding %d×%d counts to %d×%d", l.Model, other.Layers, other.Experts, l.Layers, l.Experts)
	}
	for i := range l.Counts {
		for e := range l.Counts[i] {
			l.Counts[i][e] = satAdd(l.Counts[i][e], other.Counts[i][e])
		}
	}
	l.Tokens = satAdd(l.Tokens, other.Tokens)
	return nil
}

func satAdd(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// FormatHeld is the HdrHeld value naming the experts e with held[e] set.
func FormatHeld(held []bool) string {
	var b strings.Builder
	for e, h := range held {
		if !h {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Itoa(e))
	}
	return b.String()
}

// ParseHeld parses an HdrHeld value for a layer of experts experts: which
// experts the stage node computed ("" is none).
func ParseHeld(v string, experts int) ([]bool, error) {
	held := make([]bool, experts)
	if v == "" {
		return held, nil
	}
	for _, f := range strings.Split(v, ",") {
		e, err := strconv.Atoi(f)
		if err != nil || e < 0 || e >= experts || held[e] {
			return nil, fmt.Errorf("%w: %s %q: %q is not a distinct expert in [0,%d)", ErrFrame, HdrHeld, v, f, experts)
		}
		held[e] = true
	}
	return held, nil
}
