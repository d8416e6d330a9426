package compute

import (
	"fmt"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// ForwardLayers runs rows hidden states (rows×dim, positions 0..rows-1)
// through the layers [first, first+len(layers)) on a fresh cache and returns
// the output hidden states. The registry's challenges and the executor's
// answers to them both compute with it, so that they agree on every step.
func ForwardLayers(cfg wire.ModelConfig, first int, layers []*Layer, hidden []float32, rows int, pool *Pool) ([]float32, error) {
	if rows <= 0 || len(hidden) != rows*cfg.Dim {
		return nil, fmt.Errorf("%w: %d hidden values for %d rows of %d", ErrInput, len(hidden), rows, cfg.Dim)
	}
	st, err := NewStage(cfg, first, first+len(layers), nil, layers, nil, pool)
	if err != nil {
		return nil, err
	}
	it := &Item{Cache: NewCache(cfg, len(layers)), Pos: 0, N: rows, Hidden: append([]float32(nil), hidden...)}
	if err := st.Forward([]*Item{it}); err != nil {
		return nil, err
	}
	return it.Hidden, nil
}
