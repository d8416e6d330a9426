package compute

import (
	"fmt"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// TrunkLayer runs the trunk of layer first (attention with a fresh cache,
// the residual, the FFN norm) on rows hidden states at positions
// 0..rows-1 and returns the residual and the normalized rows, one after
// the other (2×rows×dim): what a node holding the layer but not all its
// experts computes of it. The registry's challenges of such nodes and the
// nodes' answers both compute with it, as ForwardLayers for whole layers.
func TrunkLayer(cfg wire.ModelConfig, first int, layer *Layer, hidden []float32, rows int, pool *Pool) ([]float32, error) {
	if rows <= 0 || len(hidden) != rows*cfg.Dim {
		return nil, fmt.Errorf("%w: %d hidden values for %d rows of %d", ErrInput, len(hidden), rows, cfg.Dim)
	}
	st, err := NewStage(cfg, first, first+1, nil, []*Layer{layer}, nil, pool)
	if err != nil {
		return nil, err
	}
	it := &Item{Cache: NewCache(cfg, 1), Pos: 0, N: rows, Hidden: append([]float32(nil), hidden...)}
	p, err := st.Begin([]*Item{it})
	if err != nil {
		return nil, err
	}
	if err := p.Trunk(first); err != nil {
		return nil, err
	}
	return append(append(make([]float32, 0, 2*rows*cfg.Dim), p.Residual...), p.Normed...), nil
}
